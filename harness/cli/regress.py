"""`dpharness regress`: the CI regression job's sweep (a short fixed CPU sweep on a tiny system),
compared with the committed reference by harness.results.regression."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from harness.core import fsutil
from harness.core.records import StoredRun
from harness.results.regression import (REFERENCE, RATIO_FACTOR, SCHEMA, STEPS, VARIANTS, compare,
                                        make_tiny_system, measure, read_reference)
from harness.run import bench


def run_sweep(work: Path, steps: int = STEPS, log=print) -> list[StoredRun]:
    system_dir = make_tiny_system(work / "system")
    req = bench.BenchRequest(system=str(system_dir), variants=list(VARIANTS), steps=steps, device="cpu",
                             accuracy=False, runs_dir=work / "runs", work_root=work / "work")
    return bench.run(req, log=log)


def _regress(a) -> int:
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    ref_path = Path(a.reference)
    ref = read_reference(ref_path) if ref_path.is_file() and not a.write_reference else None
    for attempt in range(1 + max(0, a.retries)):
        with tempfile.TemporaryDirectory(prefix="dph-regress-") as tmp:
            t0 = time.perf_counter()
            rows = run_sweep(Path(tmp), steps=a.steps, log=log)
            cur = measure(rows)
            cur.update({"schema": SCHEMA, "steps": a.steps, "variants_run": list(VARIANTS),
                        "elapsed_s": time.perf_counter() - t0,
                        "environment": rows[0].environment.to_dict() if rows else {},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if ref is None or not compare(cur, ref, ratio_factor=a.ratio_factor):
            break
        if attempt < a.retries:  # a noisy neighbour can fake a regression once; a real one repeats
            log(f"regress: attempt {attempt + 1} looked like a regression; running the sweep again")
    for k, v in cur["ratios"].items():
        print(f"{k}: {v:.3f}")
    for v, o in cur["overhead_s"].items():
        print(f"{v}: step {cur['variants'][v]['step_s_median'] * 1e3:.1f} ms, overhead {o:.1f} s")
    if a.write_reference:
        fsutil.atomic_write_json(ref_path, cur)
        print(f"wrote reference {ref_path}")
        return 0 if all(d["status"] == "ok" for d in cur["variants"].values()) else 1
    if not ref_path.is_file():
        print(f"REGRESSION CHECK FAILED: no reference at {ref_path} (create it with --write-reference)")
        return 1
    problems = compare(cur, ref, ratio_factor=a.ratio_factor)
    if problems:
        print("REGRESSION CHECK FAILED:\n  " + "\n  ".join(problems))
        return 1
    print(f"regression check passed against {ref_path.name}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("regress", help="CI: short CPU sweep on a tiny system vs the committed reference")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--reference", default=str(REFERENCE))
    p.add_argument("--ratio-factor", type=float, default=RATIO_FACTOR)
    p.add_argument("--retries", type=int, default=1, help="re-run the sweep this many times before failing")
    p.add_argument("--write-reference", action="store_true", help="record this run as the new reference")
    p.set_defaults(func=_regress)
