"""The denominators of every speed-up the harness publishes: the fastest *upstream* run of the
same sweep (same card, one process), in two families.

* legal: upstream's code with one of the four competition-legal settings (baseline, fp32, tos,
  fp32-tos): the ASC22 rule allows only those three input parameters to change.
* native: any run of upstream's code alone (no diffs, no patch modules), with the legal settings
  or upstream's own acceleration options (`--pt-expt` with `training.enable_compile`,
  `training.enable_tf32`, the JAX/TF backends). What a user gets without us.

Each family has a raw best (fastest that ran) and a gated best (fastest whose accuracy verdict
is the reference or a pass): a speed-up is honest against the gated one."""
from __future__ import annotations

from typing import Iterable

from harness.core.records import AnchorRef, Anchors, Speedups, StoredRun

LEGAL_UPSTREAM = ("baseline", "fp32", "tos", "fp32-tos")
# records written before `upstream_only` existed: the variants that were upstream code only then
_UPSTREAM_ONLY_BEFORE_FIELD = frozenset(LEGAL_UPSTREAM + ("jax", "jax-tos", "tf"))
FAMILIES = ("legal", "native")


def _positive(m: object) -> float | None:
    return float(m) if isinstance(m, (int, float)) and m > 0 else None


def _median(r: StoredRun) -> float | None:
    return _positive(r.timing.step_s_median)


def is_upstream_only(r: StoredRun) -> bool:
    """The run trained upstream's code alone (its variant chain has no diffs and no modules)."""
    if r.upstream_only is not None:
        return bool(r.upstream_only)
    return r.variant in _UPSTREAM_ONLY_BEFORE_FIELD


def in_family(r: StoredRun, family: str) -> bool:
    if family == "legal":
        return r.variant in LEGAL_UPSTREAM
    if family == "native":
        return is_upstream_only(r)
    raise ValueError(f"unknown anchor family {family!r} (one of {FAMILIES})")


def gate_ok(r: StoredRun) -> bool:
    return r.accuracy.verdict in ("baseline", "pass")


def best(runs: Iterable[StoredRun], family: str, gated: bool = False) -> StoredRun | None:
    """The fastest ok single-process run of `family` among `runs` (one sweep on one card), or None."""
    cands = [r for r in runs if r.status == "ok" and int(r.world_size or 1) == 1
             and _median(r) is not None and in_family(r, family) and (gate_ok(r) or not gated)]
    return min(cands, key=_median) if cands else None


def _ratio(run: StoredRun, anchor_median: float | None) -> float | None:
    m, a = _median(run), _positive(anchor_median)
    return a / m if m and a and run.status == "ok" else None


def speedup(run: StoredRun, anchor: StoredRun | None) -> float | None:
    """anchor median / run median: how many times faster `run` is than `anchor`."""
    return _ratio(run, _median(anchor) if anchor else None)


def anchors(runs: list[StoredRun]) -> dict[str, StoredRun | None]:
    """{"legal", "legal_gated", "native", "native_gated"} -> the anchor run (or None)."""
    out: dict[str, StoredRun | None] = {}
    for fam in FAMILIES:
        out[fam] = best(runs, fam)
        out[f"{fam}_gated"] = best(runs, fam, gated=True)
    return out


def judged(runs: Iterable[StoredRun]) -> bool:
    """Whether the sweep's runs went through the accuracy gate at all (bench --no-accuracy: not)."""
    return any(r.accuracy.verdict for r in runs)


def summary(runs: list[StoredRun]) -> Anchors:
    """Per family, the anchor a sweep's speed-ups are quoted against: the gated best when the sweep
    was judged, else the raw best (said by gated=False). What bench's table and records show."""
    runs = list(runs)
    gated = judged(runs)

    def ref(a: StoredRun | None) -> AnchorRef | None:
        return None if a is None else AnchorRef(variant=a.variant, run_id=a.run_id, step_s_median=_median(a),
                                                gated=gated)

    return Anchors(legal=ref(best(runs, "legal", gated=gated)), native=ref(best(runs, "native", gated=gated)))


def speedups(run: StoredRun, anchor_summary: Anchors) -> Speedups:
    """Per family, anchor median / run median for one run against summary()'s anchors."""
    return Speedups(**{fam: _ratio(run, a.step_s_median) if (a := anchor_summary.of(fam)) else None
                       for fam in FAMILIES})
