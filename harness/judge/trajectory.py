"""How far one training's trajectory is from another's, from their full-precision learning curves
(the child's lcurve_full.jsonl: one row per display step with lr and the train/validation RMSEs)
and their final weights. Pure functions, no training and no I/O (docs/accuracy.md, "Same frames,
same trajectory").

relative difference of two numbers: |a - b| / max(|a|, |b|) (0 when both are 0).
horizon: the first display step at which any column's relative difference exceeds HORIZON_RTOL
(1e-3: lcurve.out's three significant digits stop agreeing); None when no row does."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

HORIZON_RTOL = 1e-3


def rel_diff(a: float, b: float) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return math.inf  # a value one side lost (NaN, inf, missing) is as far as it gets
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def columns(row: Mapping[str, Any]) -> dict[str, float | None]:
    """One lcurve_full row as flat columns: lr, trn:<metric>, val:<metric> (multi-task rows nest
    one dict per task: trn:<task>:<metric>)."""
    out: dict[str, float | None] = {"lr": row.get("lr")}

    def walk(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(f"{prefix}:{k}", v)
            else:
                out[f"{prefix}:{k}"] = v

    for part in ("trn", "val"):
        if isinstance(row.get(part), Mapping):
            walk(part, row[part])
    return out


@dataclass
class Divergence:
    """Per display step: the largest relative difference over the columns both curves have; per
    column: the same over the steps; the worst and where; the horizon."""

    steps: list[int] = field(default_factory=list)
    max_rel: list[float] = field(default_factory=list)
    by_column: dict[str, list[float]] = field(default_factory=dict)
    worst: float = 0.0
    worst_at: str = ""
    horizon: int | None = None
    problems: list[str] = field(default_factory=list)  # rows or columns one curve lacks

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "max_rel": [_finite(x) for x in self.max_rel],
                "by_column": {k: [_finite(x) for x in v] for k, v in self.by_column.items()},
                "worst": _finite(self.worst), "worst_at": self.worst_at, "horizon": self.horizon,
                "problems": self.problems}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf: null means "no comparable value"


def divergence(reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]],
               rtol: float = HORIZON_RTOL) -> Divergence:
    """`other`'s curve against `reference`'s, row by row (rows matched by step). A step or column
    that only one curve has is a problem (listed) and counts as diverged from there on."""
    ref = {int(r["step"]): columns(r) for r in reference}
    oth = {int(r["step"]): columns(r) for r in other}
    out = Divergence()
    for s in sorted(set(ref) - set(oth))[:3]:
        out.problems.append(f"step {s}: in the reference only")
    for s in sorted(set(oth) - set(ref))[:3]:
        out.problems.append(f"step {s}: in the other curve only")
    names = list(dict.fromkeys([*(k for r in ref.values() for k in r), *(k for r in oth.values() for k in r)]))
    out.by_column = {k: [] for k in names}
    for s in sorted(set(ref) | set(oth)):
        a, b = ref.get(s), oth.get(s)
        worst_here = 0.0
        for k in names:
            d = math.inf if a is None or b is None or k not in a or k not in b else rel_diff(a[k], b[k])
            out.by_column[k].append(d)
            if d > worst_here:
                worst_here = d
            if d > out.worst:
                out.worst = d
                out.worst_at = f"step {s} {k}: {None if a is None else a.get(k)!r} vs {None if b is None else b.get(k)!r}"
        out.steps.append(s)
        out.max_rel.append(worst_here)
        if out.horizon is None and worst_here > rtol:
            out.horizon = s
    return out


def weights_divergence(reference: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[float, str]:
    """(largest relative difference over parameter tensors, which): per tensor max|a - b| over
    max|a|, max|b|; arrays as anything with numpy's interface. A tensor one side lacks is inf."""
    import numpy as np

    worst, where = 0.0, ""
    for k in sorted(set(reference) | set(other)):
        if k not in reference or k not in other:
            return math.inf, f"{k}: in one model only"
        a, b = np.asarray(reference[k], dtype=np.float64), np.asarray(other[k], dtype=np.float64)
        if a.shape != b.shape:
            return math.inf, f"{k}: shape {a.shape} vs {b.shape}"
        scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
        d = 0.0 if scale == 0 else float(np.abs(a - b).max(initial=0.0)) / scale
        if not math.isfinite(d):
            return math.inf, f"{k}: not finite"
        if d > worst:
            worst, where = d, k
    return worst, where


def follows(variant: Divergence, floor: Divergence, last_step: int) -> bool:
    """Does the variant stay on the reference's trajectory at least as long as upstream stays on
    its own (the run-to-run floor)? No horizon means "beyond the last step"."""
    v = last_step + 1 if variant.horizon is None else variant.horizon
    f = last_step + 1 if floor.horizon is None else floor.horizon
    return not variant.problems and v >= f


def horizon_text(h: int | None, last_step: int) -> str:
    return f">= {last_step} (no row beyond {HORIZON_RTOL:g})" if h is None else f"step {h}"


def iter_rows(lines: Iterable[str]) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in lines if x.strip()]
