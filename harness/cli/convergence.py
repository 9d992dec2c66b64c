"""`dpharness convergence`: the proof over a full training (harness/run/convergence.py), its
verdict table and time-to-accuracy figure printed, the record's path on stderr."""
from __future__ import annotations

import sys
from pathlib import Path

from harness.core.convergence_records import ConvergenceRecord
from harness.core.errors import UserError


def format_summary(rec: ConvergenceRecord) -> str:
    lines = [f"convergence {rec.sweep_id}: {rec.system}, {rec.steps} steps on {rec.card}: {str(rec.verdict).upper()}"
             + (f" (baseline seeds from sweeps {', '.join(rec.baseline_from)})" if rec.baseline_from else "")]
    for r in rec.runs:
        ms = "-" if r.step_ms_median is None else f"{r.step_ms_median:.2f} ms/step"
        dt = r.dp_test or {}
        e, f = dt.get("rmse_e_per_atom"), dt.get("rmse_f")
        lines.append(f"  {r.variant:10} seed {r.seed}: {r.status:11} {ms:>15}  wall {r.wall_s or 0:7.1f} s  "
                     f"dp test E/atom {'-' if e is None else f'{e:.4g}'} F {'-' if f is None else f'{f:.4g}'}"
                     + (f"  ({r.error})" if r.error else ""))
    for v, c in (rec.checks or {}).items():
        lines.append(f"  {v}: {c['verdict'].upper()} ({c.get('seeds_finished')} of {c.get('seeds_planned')} seeds "
                     f"finished)" + "".join(f"\n    {x}" for x in c.get("reasons", [])))
    ctl = rec.control or {}
    if ctl:
        lines.append(f"  control, each baseline seed against the others: {str(ctl.get('verdict')).upper()}"
                     + "".join(f"\n    seed {s}: {c['verdict'].upper()}" + "".join(f"; {x}" for x in c.get("reasons", []))
                               for s, c in (ctl.get("seeds") or {}).items()))
    ttr = rec.time_to_rmse or {}
    if ttr.get("target") is not None:
        lines.append(f"  wall time to the baseline seeds' final smoothed rmse_f_val {ttr['target']:.4g}:")
        for v, seeds in ttr.get("by_variant", {}).items():
            got = ", ".join(f"seed {s}: {'not reached' if t is None else f'{t:.1f} s'}" for s, t in seeds.items())
            lines.append(f"    {v:10} {got}")
    return "\n".join(lines)


def _cmd(a) -> int:
    from harness.run import convergence

    if a.rejudge:
        if a.variant:
            raise UserError("--rejudge judges an earlier record's trainings again: give no --variant")
        rec = convergence.rejudge(Path(a.rejudge), [Path(p) for p in a.baseline_from or []],
                                  Path(a.out_dir), log=lambda m: print(m, file=sys.stderr))
        print(format_summary(rec))
        print(f"wrote {rec.path}", file=sys.stderr)
        return 4 if a.strict and rec.verdict != "pass" else 0
    if not a.variant:
        raise UserError("give the variants and their seeds, e.g. --variant baseline:2 --variant fused:3 "
                        "(or --variant fused:3 --baseline-from RECORD)")
    if a.steps is None:
        raise UserError("--steps is required (the proof is over >= 10000 steps on a GPU)")
    req = convergence.ConvergenceRequest(
        system=a.system, variants=[convergence.parse_variant(v) for v in a.variant], steps=a.steps,
        device=a.device, seed=a.seed, parallel=a.parallel, time_budget_s=a.time_budget,
        out_dir=Path(a.out_dir), work_root=Path(a.work_dir),
        baseline_from=[Path(p) for p in a.baseline_from or []])
    rec = convergence.run(req, log=lambda m: print(m, file=sys.stderr))
    print(format_summary(rec))
    print(f"wrote {rec.path}", file=sys.stderr)
    if any(r.status not in ("ok", "not started") for r in rec.runs):
        return 3
    return 4 if a.strict and rec.verdict != "pass" else 0


def register_cli(subparsers) -> None:
    from harness.run import convergence

    p = subparsers.add_parser("convergence", help="fused vs upstream over a full training: learning curves, "
                              "dp test and wall time to the same force RMSE, several seeds")
    p.add_argument("--system", default="water")
    p.add_argument("--variant", action="append", metavar="NAME[:SEEDS]",
                   help="variant and its seed count (repeatable; baseline:N with N >= 2 for a verdict, "
                        "unless --baseline-from gives the baseline seeds)")
    p.add_argument("--steps", default=None, help="training steps per run (the proof: >= 10000)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=10, help="first seed; a variant's seeds are seed, seed+1, ...")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="trainings side by side (one GPU; baseline seeds first, then the others)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start a training only while it and its dp test fit; what finished is recorded")
    p.add_argument("--baseline-from", action="append", metavar="RECORD",
                   help="reuse the baseline seeds of an earlier convergence record of the same input, data, "
                        "steps, card and baseline build (a proof split over calls), instead of --variant baseline:N; "
                        "repeatable, a seed in one record only")
    p.add_argument("--rejudge", default=None, metavar="RECORD",
                   help="judge an earlier record's trainings again with the baseline seeds of --baseline-from "
                        "records added (nothing retrained; a new record, the old one kept)")
    p.add_argument("--strict", action="store_true", help="exit 4 unless the verdict is PASS")
    p.add_argument("--out-dir", default=str(convergence.CONVERGENCE), help="where the record goes")
    p.add_argument("--work-dir", default=str(convergence.results.WORK), help="training work dirs")
    p.set_defaults(func=_cmd)
