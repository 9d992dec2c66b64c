"""Where s/step is computed: steady-state statistics over per-step times.

Warm-up (allocator growth, cuDNN/cuBLAS handles, CUDA-graph capture, JIT) is excluded: the first
max(MIN_WARMUP, WARMUP_FRACTION * n) steps. The last interval is dropped too, since it also holds
end-of-training I/O. The median and IQR are reported (robust to the periodic display/validation
steps); the mean is kept for throughput arithmetic."""
from __future__ import annotations

import numpy as np

from harness.core.records import Timing

MIN_WARMUP = 5
WARMUP_FRACTION = 0.2


def warmup_steps(n: int) -> int:
    return min(max(MIN_WARMUP, int(WARMUP_FRACTION * n)), max(n - 1, 0))


def steady_state(step_s: list[float], clock: str, startup_s: float | None, wall_s: float,
                 upstream_avg_step_s: float | None = None) -> Timing:
    s = np.asarray(step_s[:-1] if len(step_s) > 1 else step_s, dtype=float)
    w = warmup_steps(len(s))
    steady = s[w:]
    if steady.size == 0:
        return Timing(None, None, None, None, None, 0, w, clock, startup_s, wall_s, upstream_avg_step_s)
    q25, med, q75 = np.percentile(steady, [25, 50, 75])
    return Timing(
        step_s_median=float(med), step_s_iqr=float(q75 - q25), step_s_mean=float(steady.mean()),
        step_s_q25=float(q25), step_s_q75=float(q75), steps_measured=int(steady.size),
        warmup_steps=w, clock=clock, startup_s=startup_s, wall_s=wall_s, upstream_avg_step_s=upstream_avg_step_s,
    )
