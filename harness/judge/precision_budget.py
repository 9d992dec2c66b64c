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
            parity: Callable[..., dict[str, Any]]) -> PrecisionBudget:
    """One row per stage; `parity(system, variant, checkpoint, device, emulate_tf32=...)` is the
    gate's check. A TF32 row off CUDA runs with its GEMM inputs rounded to TF32 by hand and says so."""
    rows = []
    for stage, variant, tf32 in STAGES:
        emulate = tf32 and device != "cuda"
        res = parity(system, variant, checkpoint, device, emulate_tf32=emulate)
        stage += EMULATED if emulate else ""
        par = res.get("parity") or {}
        rows.append(BudgetRow(stage, variant, res.get("verdict", "-"), res.get("detail", ""),
                              par.get("class"), par.get("tolerance"), {m: par.get(m) for m in METRICS}))
    return PrecisionBudget(SCHEMA, system, device, card, str(checkpoint), rows,
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def to_dict(b: PrecisionBudget) -> dict[str, Any]:
    return asdict(b)


def rel(x: float | None) -> str:
    """A relative error as the table and the report print it."""
    return "-" if x is None else f"{x:.2e}"


def table(b: PrecisionBudget) -> str:
    head = f"{'stage':60} {'E rel':>9} {'F rel':>9} {'V rel':>9} {'grad rel':>9} {'update':>9}  verdict"
    lines = [f"precision budget, {b.system} on {b.card} ({b.device}), same weights as {b.checkpoint}", head,
             "-" * len(head)]
    for r in b.rows:
        m = r.metrics
        lines.append(f"{r.stage:60} {rel(m.get('max_rel_e')):>9} {rel(m.get('max_rel_f')):>9} {rel(m.get('max_rel_v')):>9} "
                     f"{rel(m.get('step_grad_max_rel')):>9} {rel(m.get('step_update_max_rel')):>9}  {r.verdict}"
                     + (f" (tolerance {r.tolerance:g}, {r.accuracy_class})" if r.tolerance is not None else "")
                     + ("" if r.verdict == "pass" else f": {r.detail}"))
    return "\n".join(lines)
