"""The rule that says whether a variant trains like upstream over a full training, stated before
the run (docs/accuracy.md, "Proof over a full training") and evaluated by pure functions of the
learning curves and final `dp test` RMSEs: no I/O, no training here.

1. Smoothing. lcurve's rmse_*_val at one row is the RMSE over numb_btch validation batches (water:
   3 frames), so one row is noise-dominated and its noise is multiplicative (an RMSE's scatter
   scales with its level). Each curve is replaced by the trailing geometric mean over WINDOW rows
   (the mean of log10 values over the last WINDOW display intervals): trailing, so a smoothed value at step s uses nothing after s (the
   time-to-RMSE figure stays causal); in log space, so one outlier batch does not dominate.
2. Band. After warm-up (steps <= WARMUP_FRACTION of the run), at each row the band is
   [min, max] of the baseline seeds' smoothed log10 values widened by K_BAND x the seed spread on
   both sides. The seed spread is the calibrated one when a calibration of these curves exists,
   else the median over rows of the baseline seeds' own range (max - min of log10 values). At
   least MIN_BASELINE_SEEDS (3) baseline seeds: the rule's control (upstream judged against its
   own other seeds, H100 water 4000 steps, docs/accuracy.md) failed upstream in 7 of 12
   held-out/pair combinations with 2-seed bands and passed it in 4 of 4 with 3-seed bands.
3. Per fused seed and metric (rmse_e_val, rmse_f_val), at least MIN_INSIDE of the post-warm-up
   rows lie in the band: a systematically different training leaves it over a long stretch, while
   one noisy window cannot fail a correct variant; the end of the run, where this 5 % could hide a
   late divergence, is judged by 4.
4. Final `dp test` RMSEs (E/atom, F) of every fused seed inside [min, max] of the baseline seeds
   widened by K_FINAL x their relative range ((max - min) / mean), or by the calibration's relative
   threshold for this system, device and step count where one exists.
PASS when 3 and 4 hold for every seed and metric; rows missing from a curve are skipped (a row the
baseline seeds do not all have has no band); a seed with no rows after warm-up, or no dp test, FAILs.
5. Control. With MIN_BASELINE_SEEDS + 1 baseline seeds or more, every baseline seed is also judged
   by 2-4 against the others (leave one out): upstream must pass its own rule. If it does not, the
   proof's verdict is `incomplete` (the rule cannot judge on these seeds), never pass or fail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

WINDOW = 10  # rows (10 % of a run with 100 rows)
WARMUP_FRACTION = 0.10
K_BAND = 3.0
MIN_INSIDE = 0.95
K_FINAL = 3.0
MIN_BASELINE_SEEDS = 3
CURVE_METRICS = ("rmse_e_val", "rmse_f_val")
FINAL_METRICS = ("rmse_e_per_atom", "rmse_f")
RULE_TEXT = (f"smoothed = trailing geometric mean over {WINDOW} lcurve rows; after the first "
             f"{WARMUP_FRACTION:.0%} of steps, each seed of the variant keeps >= {MIN_INSIDE:.0%} of its rows of "
             f"{', '.join(CURVE_METRICS)} inside [min, max] of the baseline seeds (log10) widened by {K_BAND:g} x the "
             f"seed spread (calibrated, else the median over rows of the baseline seeds' log10 range), at least "
             f"{MIN_BASELINE_SEEDS} baseline seeds; final dp test "
             f"{', '.join(FINAL_METRICS)} inside [min, max] of the baseline seeds widened by {K_FINAL:g} x their "
             f"relative range (or the calibration's relative threshold); with more baseline seeds, each one judged "
             f"against the others must pass (the rule's control), else the verdict is incomplete")

Curve = dict[int, float]  # step -> value


def smooth(steps: Sequence[float], values: Sequence[float | None], window: int = WINDOW) -> Curve:
    """Trailing geometric mean over the last `window` display intervals (window x the median step
    gap between rows, so a stretch of missing rows shortens a mean instead of reaching back into
    older, higher values); rows whose value is missing or not positive are skipped."""
    rows = [(int(s), math.log10(v)) for s, v in zip(steps, values)
            if v is not None and math.isfinite(v) and v > 0]
    all_steps = sorted({int(s) for s in steps})
    gaps = sorted(b - a for a, b in zip(all_steps, all_steps[1:]))
    span = window * (gaps[len(gaps) // 2] if gaps else 1)
    out: Curve = {}
    lo = 0
    for i, (s, _) in enumerate(rows):
        while rows[lo][0] <= s - span:
            lo += 1
        win = rows[lo:i + 1]
        out[s] = 10 ** (sum(x for _, x in win) / len(win))
    return out


def seed_spread_log(baselines: Sequence[Curve], after: int) -> float | None:
    """Median over rows after `after` of the baseline seeds' log10 range; None with < 2 seeds."""
    if len(baselines) < 2:
        return None
    common = sorted(set.intersection(*(set(b) for b in baselines)))
    ranges = [max(math.log10(b[s]) for b in baselines) - min(math.log10(b[s]) for b in baselines)
              for s in common if s > after]
    if not ranges:
        return None
    ranges.sort()
    n = len(ranges)
    return ranges[n // 2] if n % 2 else 0.5 * (ranges[n // 2 - 1] + ranges[n // 2])


@dataclass
class BandCheck:
    metric: str
    seed: int
    rows: int  # rows compared (after warm-up, with a band)
    inside: int
    worst_step: int | None = None  # the row furthest outside (or nearest the edge), in log10 units
    worst_excess: float | None = None  # > 0: outside by this many log10 units

    @property
    def fraction(self) -> float:
        return self.inside / self.rows if self.rows else 0.0

    @property
    def ok(self) -> bool:
        return self.rows > 0 and self.fraction >= MIN_INSIDE


def band_check(metric: str, seed: int, candidate: Curve, baselines: Sequence[Curve], after: int,
               spread_log: float) -> BandCheck:
    margin = K_BAND * spread_log
    inside = rows = 0
    worst: tuple[float, int] | None = None
    for s, v in sorted(candidate.items()):
        if s <= after or not all(s in b for b in baselines):
            continue
        lo = min(math.log10(b[s]) for b in baselines) - margin
        hi = max(math.log10(b[s]) for b in baselines) + margin
        x = math.log10(v)
        excess = max(lo - x, x - hi)
        rows += 1
        inside += excess <= 0
        if worst is None or excess > worst[0]:
            worst = (excess, s)
    return BandCheck(metric, seed, rows, inside, worst[1] if worst else None, worst[0] if worst else None)


@dataclass
class FinalCheck:
    metric: str
    seed: int
    value: float | None
    lo: float
    hi: float

    @property
    def ok(self) -> bool:
        return self.value is not None and self.lo <= self.value <= self.hi


def final_band(base_values: Sequence[float], rel_tol: float | None = None) -> tuple[float, float, str]:
    """[lo, hi] a final dp-test RMSE must fall in, and where its width came from."""
    lo, hi = min(base_values), max(base_values)
    mean = sum(base_values) / len(base_values)
    if rel_tol is not None:
        return lo * (1 - rel_tol), hi * (1 + rel_tol), f"calibrated relative threshold {rel_tol:.3g}"
    rel = K_FINAL * (hi - lo) / mean if mean > 0 else 0.0
    return lo * (1 - rel), hi * (1 + rel), f"{K_FINAL:g} x the baseline seeds' relative range = {rel:.3g}"


@dataclass
class Verdict:
    verdict: str  # pass | fail | incomplete (fewer than MIN_BASELINE_SEEDS baseline seeds or no candidate run)
    bands: list[BandCheck] = field(default_factory=list)
    finals: list[FinalCheck] = field(default_factory=list)
    spread_source: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def evaluate(baselines: dict[int, dict[str, list]], candidates: dict[int, dict[str, list]],
             base_final: dict[int, dict[str, float | None]], cand_final: dict[int, dict[str, float | None]],
             steps: int, calibrated_spread_log: dict[str, float] | None = None,
             calibrated_final_tol: dict[str, float] | None = None) -> Verdict:
    """The rule. baselines / candidates: seed -> lcurve columns (step, rmse_e_val, rmse_f_val);
    *_final: seed -> dp test RMSEs (parse_dp_test's keys)."""
    v = Verdict("pass")
    if len(baselines) < MIN_BASELINE_SEEDS or not candidates:
        v.verdict = "incomplete"
        v.reasons.append(f"needs >= {MIN_BASELINE_SEEDS} finished baseline seeds and >= 1 candidate seed "
                         f"(have {len(baselines)} and {len(candidates)})")
        return v
    after = int(WARMUP_FRACTION * steps)
    for m in CURVE_METRICS:
        base = [smooth(c.get("step", []), c.get(m, [])) for c in baselines.values()]
        spread = (calibrated_spread_log or {}).get(m)
        v.spread_source[m] = "calibration" if spread is not None else "baseline seeds' own spread"
        if spread is None:
            spread = seed_spread_log(base, after)
        if spread is None:
            v.verdict = "incomplete"
            v.reasons.append(f"{m}: the baseline seeds share no row after warm-up")
            continue
        for seed, c in sorted(candidates.items()):
            chk = band_check(m, seed, smooth(c.get("step", []), c.get(m, [])), base, after, spread)
            v.bands.append(chk)
            if not chk.ok:
                v.reasons.append(f"{m} seed {seed}: {chk.inside}/{chk.rows} rows inside the band "
                                 f"(worst at step {chk.worst_step})")
    for m in FINAL_METRICS:
        vals = [f.get(m) for f in base_final.values() if f and f.get(m) is not None]
        if len(vals) < MIN_BASELINE_SEEDS:
            v.verdict = "incomplete"
            v.reasons.append(f"dp test {m}: fewer than {MIN_BASELINE_SEEDS} baseline seeds tested")
            continue
        lo, hi, src = final_band(vals, (calibrated_final_tol or {}).get(m))
        v.spread_source[m] = src
        for seed in sorted(candidates):
            chk = FinalCheck(m, seed, (cand_final.get(seed) or {}).get(m), lo, hi)
            v.finals.append(chk)
            if not chk.ok:
                v.reasons.append(f"dp test {m} seed {seed}: {chk.value} outside [{lo:.4g}, {hi:.4g}]")
    if v.verdict == "pass" and v.reasons:
        v.verdict = "fail"
    return v


def control(baselines: dict[int, dict[str, list]], base_final: dict[int, dict[str, float | None]], steps: int,
            calibrated_spread_log: dict[str, float] | None = None,
            calibrated_final_tol: dict[str, float] | None = None) -> dict[int, Verdict]:
    """The rule on upstream itself: each baseline seed judged as a candidate against the other
    seeds (leave one out). Empty with fewer than MIN_BASELINE_SEEDS + 1 seeds (no band to spare)."""
    if len(baselines) < MIN_BASELINE_SEEDS + 1:
        return {}
    out = {}
    for seed in sorted(baselines):
        rest = {s: c for s, c in baselines.items() if s != seed}
        rest_final = {s: f for s, f in base_final.items() if s != seed}
        out[seed] = evaluate(rest, {seed: baselines[seed]}, rest_final, {seed: base_final.get(seed) or {}},
                             steps, calibrated_spread_log, calibrated_final_tol)
    return out


def time_to_rmse(steps: Sequence[float], values: Sequence[float | None], wall_at: dict[int, float],
                 target: float) -> float | None:
    """Wall seconds at the first row whose smoothed value is <= target (None: never reached, or
    that row has no wall time)."""
    for s, x in sorted(smooth(steps, values).items()):
        if x <= target:
            return wall_at.get(s)
    return None


def target_rmse(baselines: dict[int, dict[str, list]], metric: str = "rmse_f_val") -> float | None:
    """The baseline seeds' final smoothed value: the largest of them, so every baseline seed
    reaches it within its run."""
    finals = []
    for c in baselines.values():
        sm = smooth(c.get("step", []), c.get(metric, []))
        if sm:
            finals.append(sm[max(sm)])
    return max(finals) if finals else None


def wall_at_steps(startup_s: float | None, step_s: Sequence[float], rows: Sequence[float]) -> dict[int, float]:
    """Wall seconds since the training process started at each lcurve row's step: start-up (to
    the first step's tick) plus the step clock's durations of steps 0..s-1 (display, validation
    and compile included, as the user waits for them)."""
    cum, acc = [0.0], 0.0
    for d in step_s:
        acc += d
        cum.append(acc)
    out = {}
    for s in rows:
        s = int(s)
        if 0 <= s < len(cum):
            out[s] = (startup_s or 0.0) + cum[s]
        elif s == len(cum):  # the last row: its step's own interval is not timed
            out[s] = (startup_s or 0.0) + cum[-1]
    return out
