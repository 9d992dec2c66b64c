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

from typing import Any, Iterable

LEGAL_UPSTREAM = ("baseline", "fp32", "tos", "fp32-tos")
# records written before `upstream_only` existed: the variants that were upstream code only then
_UPSTREAM_ONLY_BEFORE_FIELD = frozenset(LEGAL_UPSTREAM + ("jax", "jax-tos", "tf"))
FAMILIES = ("legal", "native")


def _median(r: dict[str, Any]) -> float | None:
    m = (r.get("timing") or {}).get("step_s_median")
    return float(m) if isinstance(m, (int, float)) and m > 0 else None


def is_upstream_only(r: dict[str, Any]) -> bool:
    """The run trained upstream's code alone (its variant chain has no diffs and no modules)."""
    if "upstream_only" in r:
        return bool(r["upstream_only"])
    return r.get("variant") in _UPSTREAM_ONLY_BEFORE_FIELD


def in_family(r: dict[str, Any], family: str) -> bool:
    if family == "legal":
        return r.get("variant") in LEGAL_UPSTREAM
    if family == "native":
        return is_upstream_only(r)
    raise ValueError(f"unknown anchor family {family!r} (one of {FAMILIES})")


def gate_ok(r: dict[str, Any]) -> bool:
    return (r.get("accuracy") or {}).get("verdict") in ("baseline", "pass")


def best(runs: Iterable[dict[str, Any]], family: str, gated: bool = False) -> dict[str, Any] | None:
    """The fastest ok single-process run of `family` among `runs` (one sweep on one card), or None."""
    cands = [r for r in runs if r.get("status") == "ok" and int(r.get("world_size") or 1) == 1
             and _median(r) is not None and in_family(r, family) and (gate_ok(r) or not gated)]
    return min(cands, key=_median) if cands else None


def speedup(run: dict[str, Any], anchor: dict[str, Any] | None) -> float | None:
    """anchor median / run median: how many times faster `run` is than `anchor`."""
    m, a = _median(run), _median(anchor) if anchor else None
    return a / m if m and a and run.get("status") == "ok" else None


def anchors(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """{"legal", "legal_gated", "native", "native_gated"} -> the anchor run (or None)."""
    out: dict[str, dict[str, Any] | None] = {}
    for fam in FAMILIES:
        out[fam] = best(runs, fam)
        out[f"{fam}_gated"] = best(runs, fam, gated=True)
    return out


def judged(runs: Iterable[dict[str, Any]]) -> bool:
    """Whether the sweep's runs went through the accuracy gate at all (bench --no-accuracy: not)."""
    return any((r.get("accuracy") or {}).get("verdict") for r in runs)


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Per family, the anchor a sweep's speed-ups are quoted against: the gated best when the sweep
    was judged, else the raw best (said by "gated": False). What bench's table and records show."""
    runs = list(runs)
    gated = judged(runs)
    out: dict[str, dict[str, Any] | None] = {}
    for fam in FAMILIES:
        a = best(runs, fam, gated=gated)
        out[fam] = None if a is None else {"variant": a.get("variant"), "run_id": a.get("run_id"),
                                           "step_s_median": _median(a), "gated": gated}
    return out


def speedups(run: dict[str, Any], anchor_summary: dict[str, dict[str, Any] | None]) -> dict[str, float | None]:
    """{family: anchor median / run median} for one run against summary()'s anchors."""
    out: dict[str, float | None] = {}
    for fam in FAMILIES:
        a = anchor_summary.get(fam)
        out[fam] = speedup(run, {"timing": {"step_s_median": a["step_s_median"]}}) if a else None
    return out
