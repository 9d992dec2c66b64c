"""The per-stage precision budget of the fused engine: for each stage whose precision the
competition's rule lets change (model/descriptor/precision, model/fitting_net/precision), the
same-weights error of that stage alone in float32 against float64, then both, then both with TF32
GEMMs (on CUDA the tensor cores'; elsewhere emulated: every float32 GEMM's inputs rounded to
TF32, DPH_TF32_EMULATE, patches/fused-mixed/enable_tf32.py) — energy, force and virial of a
validation batch and the training step's gradient and update, from the gate's own parity check (harness/judge/parity.py) on one baseline
checkpoint. It says which stage spends the error a reduced-precision variant must stay within,
before any variant is designed around it (the reduced-precision issue's "measured budget")."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEMA = "dpharness.precision-budget/1"
# (what runs reduced, the variant that runs it, whether it is a TF32 row); every row runs anywhere
STAGES = (
    ("descriptor float32 (env matrix, embedding, R~^T G)", "fused-desc32", False),
    ("fitting net float32", "fused-fit32", False),
    ("descriptor + fitting float32", "fused-fp32", False),
    ("descriptor float32, TF32 GEMMs", "fused-desc-tf32", True),
    ("fitting net float32, TF32 GEMMs", "fused-fit-tf32", True),
    ("descriptor + fitting float32, TF32 GEMMs", "fused-mixed", True),
    ("TF32 in the nets only, contractions float64", "fused-tf32-nets", True),
    ("nets + contractions float32 as three TF32 products (3xTF32)", "fused-3xtf32", True),
    ("3xTF32 split on chip by a Triton kernel (off CUDA: the row above)", "fused-3xtf32-kernel", True),
    ("descriptor bfloat16, fitting float32", "fused-bf16", False),
)
EMULATED = " [TF32 emulated]"  # a TF32 row measured off CUDA: the inputs rounded by hand
METRICS = ("max_rel_e", "max_rel_f", "max_rel_v", "rms_f", "step_grad_max_rel", "step_update_max_rel")


@dataclass
class BudgetRow:
    stage: str
    variant: str
    verdict: str  # pass | fail | not applicable
    detail: str
    accuracy_class: str | None = None
    tolerance: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)


@dataclass
class PrecisionBudget:
    schema: str
    system: str
    device: str
    card: str
    checkpoint: str
    rows: list[BudgetRow]
    created: str


def measure(system: str, checkpoint: Path, device: str, card: str,
            parity: Callable[..., dict[str, Any]], variants: list[str] | None = None, jobs: int = 1,
            on_row: Callable[[BudgetRow], None] | None = None) -> PrecisionBudget:
    """One row per stage; `parity(system, variant, checkpoint, device, emulate_tf32=...)` is the
    gate's check. A TF32 row off CUDA runs with its GEMM inputs rounded to TF32 by hand and says so.
    variants: only these stages' rows (STAGES' order kept); jobs: rows measured at once (each row is
    two parity children bound by start-up, so a GPU has room for several); on_row: called as each
    row finishes, so a call cut by its time limit still leaves in its log the rows it measured."""
    stages = [s for s in STAGES if variants is None or s[1] in variants]

    def one(stage: str, variant: str, tf32: bool) -> BudgetRow:
        emulate = tf32 and device != "cuda"
        res = parity(system, variant, checkpoint, device, emulate_tf32=emulate)
        par = res.get("parity") or {}
        row = BudgetRow(stage + (EMULATED if emulate else ""), variant, res.get("verdict", "-"),
                        res.get("detail", ""), par.get("class"), par.get("tolerance"),
                        {m: par.get(m) for m in METRICS})
        if on_row:
            on_row(row)
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(lambda s: one(*s), stages))
    return PrecisionBudget(SCHEMA, system, device, card, str(checkpoint), rows,
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def select(names: str) -> list[str]:
    """--stages' comma list of stage variants, each checked against STAGES (ValueError names the
    unknown one)."""
    known = [v for _, v, _ in STAGES]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for n in chosen:
        if n not in known:
            raise ValueError(f"{n!r} is not a budget stage (one of {', '.join(known)})")
    if not chosen:
        raise ValueError("no stage named")
    return chosen


def to_dict(b: PrecisionBudget) -> dict[str, Any]:
    return asdict(b)


def rel(x: float | None) -> str:
    """A relative error as the table and the report print it."""
    return "-" if x is None else f"{x:.2e}"


HEAD = f"{'stage':76} {'E rel':>9} {'F rel':>9} {'V rel':>9} {'grad rel':>9} {'update':>9}  verdict"


def row_line(r: BudgetRow) -> str:
    m = r.metrics
    return (f"{r.stage:76} {rel(m.get('max_rel_e')):>9} {rel(m.get('max_rel_f')):>9} {rel(m.get('max_rel_v')):>9} "
            f"{rel(m.get('step_grad_max_rel')):>9} {rel(m.get('step_update_max_rel')):>9}  {r.verdict}"
            + (f" (tolerance {r.tolerance:g}, {r.accuracy_class})" if r.tolerance is not None else "")
            + ("" if r.verdict == "pass" else f": {r.detail}"))


def table(b: PrecisionBudget) -> str:
    lines = [f"precision budget, {b.system} on {b.card} ({b.device}), same weights as {b.checkpoint}", HEAD,
             "-" * len(HEAD)]
    return "\n".join(lines + [row_line(r) for r in b.rows])
