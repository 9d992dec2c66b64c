"""How each variant's cost grows with the work: ms/step and atoms*frames/s against the atoms a
step trains on (atoms per frame x frames per step), from sweeps that bench several work sizes
(`bench --replicate 1x1x1,2x2x2 --batch-size 1,4`), with a fitted growth exponent; and the
process's peak GPU memory at each size (total and per atom trained on), with its own exponent
(1: memory linear in the atoms; 2: an all-pairs stage sets the peak).

The exponent is the slope of log(step time) against log(work) by least squares (scipy.stats
linregress) over a variant's sizes in one sweep on one card: 1.0 is linear growth, below 1 the
step still has fixed costs (launches, latency) that more work amortises, above 1 it grows worse
than linearly (an O(N^2) stage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from harness.core.records import StoredRun
from harness.report.plots import _plt, _png
from harness.report.summary import card_of


@dataclass(frozen=True)
class Point:
    variant: str
    atoms: int  # per frame
    frames: int  # per step
    step_s: float
    peak_bytes: int | None = None  # the run's memory.gpu_peak_bytes (None: not measured, e.g. CPU)

    @property
    def work(self) -> int:
        return self.atoms * self.frames


def growth_exponent(points: Iterable[Point]) -> float | None:
    """Slope of log(step time) vs log(work); None with fewer than two distinct work sizes."""
    from scipy.stats import linregress

    pts = sorted(points, key=lambda p: p.work)
    if len({p.work for p in pts}) < 2:
        return None
    fit = linregress([math.log(p.work) for p in pts], [math.log(p.step_s) for p in pts])
    return float(fit.slope)


def memory_exponent(points: Iterable[Point]) -> float | None:
    """Slope of log(peak memory) vs log(work) over the points that measured it."""
    pts = [p for p in points if p.peak_bytes]
    return growth_exponent(Point(p.variant, p.atoms, p.frames, float(p.peak_bytes)) for p in pts)


def _memory(vp: list[Point]) -> str:
    pts = [p for p in sorted(vp, key=lambda p: p.work) if p.peak_bytes]
    return ", ".join(f"{p.atoms}×{p.frames}: {p.peak_bytes / 1e9:.2f} GB ({p.peak_bytes / p.work / 1e3:.0f} kB/atom)"
                     for p in pts) or "-"


def _why(error: str | None, n: int = 160) -> str:
    """A failed run's error, one line, cut to n characters (the record has it whole)."""
    text = " ".join((error or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _base(r: StoredRun) -> str:
    return (r.workload or {}).get("base_system") or r.system


def _point(r: StoredRun) -> Point | None:
    t = r.timing.step_s_median
    atoms = r.atoms_per_frame
    frames = r.throughput.batch_size_per_rank
    if r.status != "ok" or not t or not atoms or not frames or (r.world_size or 1) != 1:
        return None
    peak = r.memory.gpu_peak_bytes
    return Point(r.variant, int(atoms), int(frames), float(t), int(peak) if peak else None)


def sections(runs: list[StoredRun]) -> list[dict[str, Any]]:
    """One section per (base system, card, sweep) that measured two or more work sizes."""
    groups: dict[tuple[str, str, str], list[StoredRun]] = {}
    for r in runs:
        groups.setdefault((_base(r), card_of(r), r.sweep_id), []).append(r)
    out = []
    for (system, card, sweep), rs in sorted(groups.items(), key=lambda kv: kv[0][2], reverse=True):
        pts = [p for p in map(_point, rs) if p is not None]
        if len({p.work for p in pts}) < 2:
            continue
        by_v: dict[str, list[Point]] = {}
        for p in pts:
            by_v.setdefault(p.variant, []).append(p)
        failed = sorted({(r.variant, r.atoms_per_frame, _why(r.error)) for r in rs if r.status != "ok"},
                        key=lambda x: (x[0], x[1] or 0))
        rows = []
        for v, vp in by_v.items():
            e, me = growth_exponent(vp), memory_exponent(vp)
            rows.append({"variant": v, "exponent": "-" if e is None else f"{e:.2f}",
                         "memory": _memory(vp), "memory_exponent": "-" if me is None else f"{me:.2f}",
                         "sizes": ", ".join(f"{p.atoms}×{p.frames}: {1e3 * p.step_s:.2f} ms"
                                            for p in sorted(vp, key=lambda p: p.work))})
        out.append({"system": system, "card": card, "sweep": sweep, "rows": rows,
                    "failed": [f"{v} at {a} atoms" + (f" ({why})" if why else "") for v, a, why in failed], "img": plot(by_v, f"{system} on {card}")})
    return out


def plot(by_v: dict[str, list[Point]], title: str) -> str:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for v, vp in sorted(by_v.items()):
        vp = sorted(vp, key=lambda p: p.work)
        e = growth_exponent(vp)
        label = v if e is None else f"{v} (exponent {e:.2f})"
        ax.plot([p.work for p in vp], [1e3 * p.step_s for p in vp], marker="o", label=label)
        ax2.plot([p.work for p in vp], [p.work / p.step_s for p in vp], marker="o", label=v)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("atoms per step (atoms x frames)")
    ax.set_ylabel("ms / step (median)")
    ax.set_title(f"{title}: step time", fontsize=9)
    ax.legend(fontsize=7)
    ax2.set_ylabel("atoms x steps / s")
    ax2.set_title("throughput", fontsize=9)
    fig.tight_layout()
    return _png(fig)
