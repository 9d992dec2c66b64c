"""`dpharness trajectory`: upstream twice with one seed and each variant on upstream's order
(harness/run/trajectory.py); the divergence table printed, the record's path on stderr."""
from __future__ import annotations

import sys
from pathlib import Path

from harness.core.trajectory_records import TrajectoryRecord
from harness.judge.trajectory import horizon_text


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def format_summary(rec: TrajectoryRecord) -> str:
    last = int(rec.steps or 0)
    lines = [f"trajectory {rec.sweep_id}: {rec.system}, seed {rec.seed}, {rec.steps} steps on {rec.card}: "
             f"{str(rec.verdict).upper()}"]
    for r in rec.runs:
        ms = "-" if r.step_ms_median is None else f"{r.step_ms_median:.2f} ms/step"
        lines.append(f"  {r.role:14} {r.variant:14} {r.status:8} {ms:>15}  order {r.order}"
                     + (f"  ({r.error})" if r.error else ""))
    lines.append(f"  against the first upstream run (relative; horizon: first row beyond {rec.horizon_rtol:g}):")
    for c in rec.comparisons:
        final = c.max_rel[-1] if c.max_rel else None
        lines.append(f"  {c.run:16} worst {_sci(c.worst)}  at the end {_sci(final)}  weights {_sci(c.weights_max_rel)}"
                     f"  horizon {horizon_text(c.horizon, last)}"
                     + ("" if c.follows is None else ("  follows" if c.follows else "  DOES NOT FOLLOW"))
                     + "".join(f"\n    {p}" for p in c.problems))
    return "\n".join(lines)


def _cmd(a) -> int:
    from harness.run import trajectory

    req = trajectory.TrajectoryRequest(system=a.system, variants=a.variant or [], steps=a.steps, device=a.device,
                                       seed=a.seed, out_dir=Path(a.out_dir))
    rec = trajectory.run(req, log=lambda m: print(m, file=sys.stderr))
    print(format_summary(rec))
    print(f"wrote {rec.path}", file=sys.stderr)
    if any(r.status != "ok" for r in rec.runs):
        return 3
    return 4 if a.strict and rec.verdict != "pass" else 0


def register_cli(subparsers) -> None:
    from harness.run import trajectory

    p = subparsers.add_parser("trajectory", help="upstream twice with one seed and a variant on upstream's sampler "
                              "order: how many steps the variant stays on upstream's trajectory")
    p.add_argument("--system", default="water")
    p.add_argument("--variant", action="append", metavar="NAME", help="variant to compare (repeatable)")
    p.add_argument("--steps", default="auto", help="training steps (auto: 300 on a GPU, 20 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--out-dir", default=str(trajectory.TRAJECTORY), help="where the record is written")
    p.add_argument("--strict", action="store_true", help="exit 4 unless every variant follows upstream")
    p.set_defaults(func=_cmd)
