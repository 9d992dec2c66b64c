"""The answer the report leads with: per (system, card), each fast variant (one that runs more than
upstream's code, anchors.is_upstream_only false) against the upstream anchors of its OWN sweep
(harness.results.anchors): its newest sweep's ms/step and speed-ups, and the spread of the legal speed-up
over every bench sweep that holds both. Never a ratio across sweeps or cards."""
from __future__ import annotations

import statistics
from typing import Any

from harness.core.records import Profile, StoredRun
from harness.results import anchors

GATE_RANK = {"baseline": 2, "pass": 2, None: 1}  # judged good > not judged > failed


def card_of(r: StoredRun) -> str:
    return r.card()


def world_size(r: StoredRun) -> int:
    try:
        return int(r.world_size or 1)
    except (TypeError, ValueError):
        return 1


def is_profile_sweep(rs: list[StoredRun]) -> bool:
    """A `dpharness profile` sweep: every run profiled, none judged (bench runs are judged)."""
    return all(isinstance(r.profile, Profile) and not r.accuracy.verdict for r in rs)


def sweep_groups(runs: list[StoredRun]) -> dict[tuple[str, str, str], list[StoredRun]]:
    """(system, card, sweep_id) -> its runs."""
    groups: dict[tuple[str, str, str], list[StoredRun]] = {}
    for r in runs:
        groups.setdefault((r.system, card_of(r), r.sweep_id), []).append(r)
    return groups


def stamp(key: tuple[str, str, str], rs: list[StoredRun]) -> str:
    """Sort key of a sweep: its newest record's time, then its id (two sweeps can share a second)."""
    return max(x.created or "" for x in rs) + key[2]


def is_fast(r: StoredRun) -> bool:
    return not anchors.is_upstream_only(r)


def timed_run(rs: list[StoredRun], variant: str) -> StoredRun | None:
    """The variant's newest ok single-process run with a step time in one sweep, or None."""
    ok = [r for r in rs if r.variant == variant and r.status == "ok" and world_size(r) == 1
          and (r.timing.step_s_median or 0) > 0]
    return max(ok, key=lambda r: r.created or "") if ok else None


def _named(run: StoredRun, anchor: StoredRun | None) -> dict[str, Any]:
    s = anchors.speedup(run, anchor)
    return {"x": s, "vs": anchor.variant if anchor else None,
            "text": f"{s:.1f}× vs {anchor.variant}" if s and anchor else "-"}


def _mem_ratio(run: StoredRun, rs: list[StoredRun]) -> float | None:
    base = timed_run(rs, "baseline")
    m = run.memory.gpu_peak_bytes
    b = base.memory.gpu_peak_bytes if base else None
    return m / b if m and b else None


def variant_row(system: str, card: str, variant: str, sweeps: list[tuple[str, list[StoredRun]]]) -> dict | None:
    """The row of one fast variant; sweeps: its (system, card)'s bench sweeps, oldest first."""
    pts = [(sid, rs, run) for sid, rs in sweeps
           if (run := timed_run(rs, variant)) and anchors.best(rs, "legal")]
    if not pts:
        return None
    sid, rs, run = pts[-1]
    ratios = [anchors.speedup(r, anchors.best(s_rs, "legal")) for _, s_rs, r in pts]
    ratios = [x for x in ratios if x]
    verdict = run.accuracy.verdict
    return {"system": system, "card": card, "variant": variant, "sweep": sid, "run": run,
            "ms": run.timing.step_s_median * 1e3,
            "legal": _named(run, anchors.best(rs, "legal")),
            "legal_gated": _named(run, anchors.best(rs, "legal", gated=True)),
            "native": _named(run, anchors.best(rs, "native")),
            "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios), "n": len(ratios),
            "verdict": verdict, "gate_rank": GATE_RANK.get(verdict, 0), "mem_ratio": _mem_ratio(run, rs)}


def rows(runs: list[StoredRun]) -> list[dict[str, Any]]:
    """Every fast variant's row, grouped by (system, card); the first row of each group is its
    headline (`headline: True`): the variant with the best gate verdict, then the most sweeps (the
    one measured most), then the fastest."""
    by_card: dict[tuple[str, str], list[tuple[str, str, list[StoredRun]]]] = {}
    for k, rs in sweep_groups(runs).items():
        if not is_profile_sweep(rs):
            by_card.setdefault(k[:2], []).append((stamp(k, rs), k[2], rs))
    out = []
    for (system, card), sw in sorted(by_card.items()):
        sweeps = [(sid, rs) for _, sid, rs in sorted(sw)]
        fast = sorted({r.variant for _, rs in sweeps for r in rs if is_fast(r)})
        group = [row for v in fast if (row := variant_row(system, card, v, sweeps))]
        group.sort(key=lambda x: (-x["gate_rank"], -x["n"], x["ms"]))
        for i, row in enumerate(group):
            row["headline"] = i == 0
        out += group
    return out
