"""Training equivalence: is a variant's validation error the same as the baseline's over seeds?

Pure statistics, no I/O (docs/accuracy.md, "Training equivalence"). Input: per metric, the
variant's RMSEs over n seeds and the baseline's over its calibration seeds, and a margin per
metric fixed in advance (relative to the baseline mean). Per metric, with d = mean(variant) -
mean(baseline) and Welch's standard error:

* two one-sided tests (TOST): H0 d <= -margin and H0 d >= +margin, each a Welch t-test at
  alpha; the metric is *equivalent* when both are rejected (p_tost = max of the two < alpha),
  i.e. the 90 % confidence interval of d lies inside (-margin, +margin);
* "not worse": the upper test alone (H0 d >= +margin rejected). RMSEs are errors, so a variant
  clearly *better* than the baseline fails equivalence but passes not-worse, and says so.

The verdict is TOST's (ASC22: the same results), over every metric both sides measured."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

ALPHA = 0.05  # each one-sided test; TOST at 0.05 is a 90 % confidence interval inside the margin
MIN_SEEDS = 3  # per side: with 2 the Welch degrees of freedom can fall to 1 and the test is blind

# Equivalence margins, relative to the baseline mean, fixed before any variant is measured
# (docs/accuracy.md says why each): forces carry the signal; energy and virial RMSEs per atom are
# small numbers whose seed-to-seed spread is several times the force's.
MARGINS = {"rmse_f": 0.05, "rmse_e_per_atom": 0.10, "rmse_v": 0.10}
MAX_PLANNED_SEEDS = 100  # seeds_needed looks no further: beyond it the margin is the problem, not n


@dataclass(frozen=True)
class MetricEquivalence:
    metric: str
    n_variant: int
    n_baseline: int
    mean_variant: float
    mean_baseline: float
    diff: float  # mean(variant) - mean(baseline), the effect size (same unit as the metric)
    ci90: tuple[float, float]  # Welch 90 % confidence interval of diff
    margin: float  # absolute: margin_rel * mean(baseline)
    margin_rel: float
    p_lower: float  # H0: diff <= -margin
    p_upper: float  # H0: diff >= +margin (the not-worse test)
    p_tost: float
    equivalent: bool
    not_worse: bool
    # inconclusive only: seeds per side at which this TOST would pass if both sides kept their
    # observed means and spreads (a plug-in planning estimate, not a promise); None when the
    # observed difference is itself outside the margin or MAX_PLANNED_SEEDS would not do
    seeds_needed: int | None = None

    @property
    def outcome(self) -> str:
        """equivalent | better (lower error beyond the margin or not shown within it, yet not
        worse) | worse (the whole interval above +margin) | inconclusive (too noisy to tell)."""
        if self.equivalent:
            return "equivalent"
        if self.not_worse:
            return "better"
        return "worse" if self.ci90[0] > self.margin else "inconclusive"


@dataclass(frozen=True)
class EquivalenceResult:
    verdict: str | None  # pass | fail | None (not judged: too few seeds, no common metric)
    detail: str
    metrics: dict[str, MetricEquivalence] = field(default_factory=dict)
    alpha: float = ALPHA

    @property
    def not_worse(self) -> bool | None:
        return all(m.not_worse for m in self.metrics.values()) if self.metrics else None


def _welch(v: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Welch's standard error of mean(v) - mean(b) and its Welch-Satterthwaite degrees of freedom."""
    return _welch_moments(v.var(ddof=1) / v.size, b.var(ddof=1) / b.size, v.size, b.size)


def _welch_moments(qv: float, qb: float, nv: int, nb: int) -> tuple[float, float]:
    """(se, df) from the squared standard errors of the two means and the sample sizes."""
    se = math.sqrt(qv + qb)
    if se == 0.0:
        return 0.0, float(nv + nb - 2)
    df = (qv + qb) ** 2 / (qv ** 2 / (nv - 1) + qb ** 2 / (nb - 1))
    return se, df


def _p_greater(t_num: float, se: float, df: float) -> float:
    """p-value of H0 mu <= 0 against mu > 0 for an estimate t_num with standard error se."""
    if se == 0.0:  # no spread at all: the sign decides (a tie is not a rejection)
        return 0.0 if t_num > 0 else 1.0
    return float(stats.t.sf(t_num / se, df))


def seeds_needed(variant: np.ndarray, baseline: np.ndarray, margin: float, alpha: float = ALPHA) -> int | None:
    """Smallest n (the same on both sides, at least today's larger side) whose Welch 90 % interval,
    at today's difference and per-side variances, lies inside +-margin; None if none <= MAX_PLANNED_SEEDS."""
    d = abs(float(variant.mean() - baseline.mean()))
    if d >= margin:
        return None
    sv, sb = variant.var(ddof=1), baseline.var(ddof=1)
    for n in range(max(variant.size, baseline.size), MAX_PLANNED_SEEDS + 1):
        se, df = _welch_moments(sv / n, sb / n, n, n)
        if d + float(stats.t.ppf(1.0 - alpha, df)) * se < margin:
            return n
    return None


def seeds_for_power(cv: float, margin_rel: float, power: float = 0.8, alpha: float = ALPHA) -> int | None:
    """Seeds per side for a variant that trains exactly like the baseline (same mean, same seed CV
    cv = std/mean) to pass TOST with this probability at margin_rel: the usual equal-n TOST plan,
    n = 2 (cv / margin)^2 (t_{1-alpha} + t_{1-(1-power)/2})^2 with df = 2n - 2, iterated to a
    fixed point (approximate; tests/unit/test_equivalence.py checks it by simulation). None when
    MAX_PLANNED_SEEDS would not do."""
    if cv <= 0.0:
        return MIN_SEEDS
    n = MIN_SEEDS
    for _ in range(50):
        df = 2 * n - 2
        q = float(stats.t.ppf(1.0 - alpha, df) + stats.t.ppf(1.0 - (1.0 - power) / 2.0, df))
        nxt = max(MIN_SEEDS, math.ceil(2.0 * (cv / margin_rel) ** 2 * q * q))
        if nxt == n:
            break
        n = nxt
    return n if n <= MAX_PLANNED_SEEDS else None


def metric_equivalence(metric: str, variant: list[float], baseline: list[float], margin_rel: float,
                       alpha: float = ALPHA) -> MetricEquivalence:
    v, b = np.asarray(variant, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if v.size < 2 or b.size < 2:
        raise ValueError(f"{metric}: Welch's test needs at least 2 values per side ({v.size}, {b.size})")
    d = float(v.mean() - b.mean())
    margin = margin_rel * abs(float(b.mean()))
    se, df = _welch(v, b)
    p_lower = _p_greater(d + margin, se, df)  # rejects d <= -margin
    p_upper = _p_greater(margin - d, se, df)  # rejects d >= +margin
    half = float(stats.t.ppf(1.0 - alpha, df)) * se
    equivalent, not_worse = max(p_lower, p_upper) < alpha, p_upper < alpha
    worse = d - half > margin
    planned = None if equivalent or not_worse or worse else seeds_needed(v, b, margin, alpha)
    return MetricEquivalence(
        metric=metric, n_variant=int(v.size), n_baseline=int(b.size), mean_variant=float(v.mean()),
        mean_baseline=float(b.mean()), diff=d, ci90=(d - half, d + half), margin=margin,
        margin_rel=margin_rel, p_lower=p_lower, p_upper=p_upper, p_tost=max(p_lower, p_upper),
        equivalent=equivalent, not_worse=not_worse, seeds_needed=planned)


def _plan(m: MetricEquivalence) -> str:
    """What an inconclusive metric would need: the reader's next step, in the detail line."""
    if m.outcome != "inconclusive":
        return ""
    if m.seeds_needed is None and abs(m.diff) >= m.margin:
        return "; more seeds would not resolve it: the observed difference is itself outside the margin"
    if m.seeds_needed is None:
        return f"; more seeds would not resolve it at this difference and spread (> {MAX_PLANNED_SEEDS} per side)"
    return f"; at this difference and spread ~{m.seeds_needed} seeds per side would resolve it"


def judge(variant: dict[str, list[float]], baseline: dict[str, list[float]],
          margins: dict[str, float] | None = None, alpha: float = ALPHA,
          min_seeds: int = MIN_SEEDS) -> EquivalenceResult:
    """TOST + not-worse on every metric both sides have (None values, e.g. water's virial, are
    dropped). Too few seeds on either side: not judged (verdict None), never a pass."""
    margins = MARGINS if margins is None else margins
    out: dict[str, MetricEquivalence] = {}
    short: list[str] = []
    for m, rel in margins.items():
        v = [float(x) for x in variant.get(m) or [] if x is not None]
        b = [float(x) for x in baseline.get(m) or [] if x is not None]
        if not v and not b:
            continue
        if len(v) < min_seeds or len(b) < min_seeds:
            short.append(f"{m}: {len(v)} variant / {len(b)} baseline seeds")
            continue
        out[m] = metric_equivalence(m, v, b, rel, alpha)
    if short:
        return EquivalenceResult(None, f"not judged: training equivalence needs >= {min_seeds} seeds per side "
                                       f"({'; '.join(short)})", out, alpha)
    if not out:
        return EquivalenceResult(None, "not judged: no metric measured by both sides", out, alpha)
    parts = [f"{m.metric} {m.outcome} (diff {m.diff:+.3g}, 90% CI [{m.ci90[0]:+.3g}, {m.ci90[1]:+.3g}], "
             f"margin {m.margin_rel:.0%} = {m.margin:.3g}, p_tost {m.p_tost:.2g}, not-worse p {m.p_upper:.2g}"
             f"{_plan(m)})" for m in out.values()]
    ok = all(m.equivalent for m in out.values())
    better = [m.metric for m in out.values() if m.outcome == "better"]
    head = "training equivalent" if ok else "training not equivalent"
    if better and all(m.not_worse for m in out.values()):
        head += f" (not worse: {', '.join(better)} better than the baseline beyond the margin)"
    return EquivalenceResult("pass" if ok else "fail", f"{head}: " + "; ".join(parts), out, alpha)
