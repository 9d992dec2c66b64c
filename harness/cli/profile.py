"""`dpharness profile`: a sweep with the in-process profiler window (and, when usable, Nsight
Systems around each run and Nsight Compute on the top kernels), then the per-step breakdown."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from harness.analyse import nsight, profile
from harness.core.errors import UserError
from harness.run import bench


def _profile_cmd(a) -> int:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    variants = list(dict.fromkeys(a.variant or ["baseline"]))
    prefix: list[str] = []
    if a.nsys:
        if nsight.nsys_usable():
            # the work dir is the subprocess cwd: the report lands at <work_dir>/nsys.nsys-rep
            prefix = nsight.nsys_command(Path(nsight.NSYS_BASE), [])
        else:
            print("dpharness profile: nsys is not usable on this machine; continuing with torch.profiler only",
                  file=sys.stderr)
    ncu = a.ncu
    if ncu and not shutil.which("ncu"):
        print("dpharness profile: ncu is not on PATH; skipping Nsight Compute metrics", file=sys.stderr)
        ncu = 0
    # --ncu K: after the profiled runs, one short run of each under ncu for its top K kernels,
    # planned by the pipeline (bench.measure_ncu), its figures in the run's record
    req = bench.BenchRequest(system=a.system, variants=variants, steps=a.steps, device=a.device,
                             accuracy=False, profile=True, launch_prefix=tuple(prefix),
                             ncu_kernels=ncu, ncu_timeout_s=a.ncu_timeout)
    rows = bench.run(req, log=log)
    print(profile.format_breakdown(rows))
    if ncu and any(r.ncu for r in rows):
        print(nsight.format_ncu(rows))
    for r in rows:
        print(f"wrote {r.path} (trace: {r.artifacts.work_dir}/{profile.TRACE})", file=sys.stderr)
    if any(r.status != "ok" for r in rows):
        raise UserError("a profiled run failed: " + "; ".join(f"{r.variant}: {r.error}" for r in rows
                                                               if r.status != "ok"))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("profile", help="bench with a torch.profiler window and print the per-step breakdown")
    p.add_argument("--system", default="water")
    p.add_argument("--variant", action="append", help="variant (repeatable)")
    p.add_argument("--steps", default="auto", help="training steps (auto: 300 on a GPU, 20 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--nsys", action="store_true", help="also run under Nsight Systems when it is usable")
    p.add_argument("--ncu", type=int, default=0, metavar="K", help="Nsight Compute metrics for the top K kernels")
    p.add_argument("--ncu-timeout", type=float, default=420.0, metavar="S",
                   help="limit of each variant's ncu run (its record then says it timed out)")
    p.set_defaults(func=_profile_cmd)
