"""The per-stage precision budget of the fused engine: for each stage whose precision the
competition's rule lets change (model/descriptor/precision, model/fitting_net/precision), the
same-weights error of that stage alone in float32 against float64, then both, then both with TF32
GEMMs (CUDA only) — energy, force and virial of a validation batch and the training step's
gradient and update, from the gate's own parity check (harness/judge/parity.py) on one baseline
checkpoint. It says which stage spends the error a reduced-precision variant must stay within,
before any variant is designed around it (the reduced-precision issue's "measured budget")."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEMA = "dpharness.precision-budget/1"
# (what runs reduced, the variant that runs it, where it can be measured)
STAGES = (
    ("descriptor float32 (env matrix, embedding, R~^T G)", "fused-desc32", ("cpu", "cuda")),
    ("fitting net float32", "fused-fit32", ("cpu", "cuda")),
    ("descriptor + fitting float32", "fused-fp32", ("cpu", "cuda")),
    ("descriptor float32, TF32 embedding GEMMs", "fused-desc-tf32", ("cuda",)),
    ("fitting net float32, TF32 GEMMs", "fused-fit-tf32", ("cuda",)),
    ("descriptor + fitting float32, TF32 GEMMs", "fused-mixed", ("cuda",)),
    ("descriptor bfloat16, fitting float32", "fused-bf16", ("cpu", "cuda")),
)
METRICS = ("max_rel_e", "max_rel_f", "max_rel_v", "rms_f", "step_grad_max_rel", "step_update_max_rel")


@dataclass
class BudgetRow:
    stage: str
    variant: str
    verdict: str  # pass | fail | not measured | not applicable
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
    """One row per stage; `parity(system, variant, checkpoint, device)` is the gate's check."""
    rows = []
    for stage, variant, where in STAGES:
        if device not in where:
            rows.append(BudgetRow(stage, variant, "not measured", f"needs {' or '.join(where)} (this run: {device})"))
            continue
        res = parity(system, variant, checkpoint, device)
        par = res.get("parity") or {}
        rows.append(BudgetRow(stage, variant, res.get("verdict", "-"), res.get("detail", ""),
                              par.get("class"), par.get("tolerance"), {m: par.get(m) for m in METRICS}))
    return PrecisionBudget(SCHEMA, system, device, card, str(checkpoint), rows,
                           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def to_dict(b: PrecisionBudget) -> dict[str, Any]:
    return asdict(b)


def table(b: PrecisionBudget) -> str:
    def g(x):
        return "-" if x is None else f"{x:.2e}"

    head = f"{'stage':52} {'E rel':>9} {'F rel':>9} {'V rel':>9} {'grad rel':>9} {'update':>9}  verdict"
    lines = [f"precision budget, {b.system} on {b.card} ({b.device}), same weights as {b.checkpoint}", head,
             "-" * len(head)]
    for r in b.rows:
        m = r.metrics
        lines.append(f"{r.stage:52} {g(m.get('max_rel_e')):>9} {g(m.get('max_rel_f')):>9} {g(m.get('max_rel_v')):>9} "
                     f"{g(m.get('step_grad_max_rel')):>9} {g(m.get('step_update_max_rel')):>9}  {r.verdict}"
                     + (f" (tolerance {r.tolerance:g}, {r.accuracy_class})" if r.tolerance is not None else "")
                     + ("" if r.verdict == "pass" else f": {r.detail}"))
    return "\n".join(lines)
