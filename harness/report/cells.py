"""Formatters of one report cell that more than one section writes (the bench tables and the
Training equivalence section): one copy each."""
from __future__ import annotations

from typing import Any


def equivalence_cell(e: Any) -> str:
    """One line per metric of a record's training-equivalence part: the relative effect size with
    its 90 % interval against the margin, the seeds and the outcome; else why it was not judged."""
    if e is None or e.is_empty():
        return "-"
    if not e.metrics:
        return e.detail or "-"
    n = f"n {len(e.seeds_variant or [])}/{len(e.seeds_baseline or [])}"
    cells = []
    for m, d in e.metrics.items():
        mb = d.get("mean_baseline") or 0.0
        rel = (lambda x: f"{100 * x / mb:+.1f}%") if mb else (lambda x: f"{x:+.2g}")
        lo, hi = d.get("ci90") or (float("nan"), float("nan"))
        plan = f" (~{d['seeds_needed']} seeds/side to resolve)" if d.get("seeds_needed") else ""
        cells.append(f"{m} {rel(d['diff'])} [{rel(lo)}, {rel(hi)}] (±{100 * d['margin_rel']:.0f}%) {d['outcome']}{plan}")
    return f"{e.verdict} ({n}): " + "; ".join(cells)


def verdict(v: Any) -> tuple[str, str]:
    """A gate verdict as the report writes it, with its CSS class."""
    s = str(v or "-")
    return {"pass": ("PASS", "pass"), "fail": ("FAIL", "fail"), "baseline": ("reference", "")}.get(s, (s, ""))
