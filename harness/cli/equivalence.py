"""`dpharness equivalence`: the training-equivalence test of one variant over many seeds, on its own
(docs/accuracy.md section 4). `bench --seeds` trains its seeds one after another because each is
also a timed benchmark; at the lengths where training has really happened the baseline's seeds
spread so widely that the test needs ~20 seeds per side (water at gate_steps), which only fits a
GPU call side by side. This command trains the variant's seeds `--jobs` at a time (not timed: they
share the device), dp-tests each, judges them by TOST against the baseline's calibration at the
same (system, device, steps), and writes one record under results/equivalence/. Speed and
same-weights parity stay the bench's."""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from harness.core import environment, fsutil
from harness.core.errors import RunFailed, UserError
from harness.core.paths import ROOT
from harness.judge import equivalence as eq
from harness.judge.calibration import CALIBRATION, calibration_path
from harness.judge.processes import format_dp_test
from harness.judge.seeds import calibration_samples, gate_steps, metrics_record, samples
from harness.results import runs as results
from harness.run import side_by_side

EQUIVALENCE = ROOT / "results" / "equivalence"
SCHEMA = "dpharness.equivalence/1"


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: a comma list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed appears twice")
    if len(seeds) < eq.MIN_SEEDS:
        raise UserError(f"--seeds: the test needs at least {eq.MIN_SEEDS} seeds of the variant, got {len(seeds)}")
    return seeds


def run_equivalence(system: str, variant: str, seeds: list[int], steps: int | None = None, device: str = "auto",
                    jobs: int = 1, frames: int | None = None, calibration_dir: Path = CALIBRATION,
                    out_dir: Path = EQUIVALENCE, work_root: Path = results.WORK,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `variant` with every seed (`jobs` at once), dp-test each, judge against the calibration
    of the baseline at (system, device, steps); steps defaults to the system's gate_steps. Returns
    the record it wrote (atomically, only once every seed trained)."""
    from harness.cli.calibrate import _dp_test_only
    from harness.prepare import systems
    from harness.prepare import variants as variant_defs
    from harness.run import bench

    sysdef = systems.load_system(system)
    g = gate_steps(sysdef.spec)
    if steps is None:
        if g is None:
            raise UserError(f"equivalence: {sysdef.name} has no gate_steps (give --steps N, or calibrate gate_steps "
                            "first: docs/accuracy.md)")
        steps = g
    try:
        vdef = variant_defs.load_variant(variant)
    except Exception as e:
        raise UserError(f"--variant {variant}: {e}") from None
    dev = bench.resolve_device(device)
    cal_path = calibration_path(sysdef.name, dev, steps, calibration_dir)
    if not cal_path.is_file():
        raise UserError(f"equivalence: no baseline calibration {cal_path.name} (run `dpharness calibrate --system "
                        f"{system} --device {dev} --steps {steps} --classes float64 --seeds 1,2,3,4` first)")
    base = calibration_samples(cal_path)
    if variant == "baseline" and set(seeds) & {s for s, _ in base}:
        raise UserError(f"--seeds: baseline seeds {sorted(set(seeds) & {s for s, _ in base})} are already in "
                        f"{cal_path.name}; the baseline against itself needs other seeds")
    sweep_id = results.new_sweep_id()
    runs_dir = Path(out_dir) / "runs"
    lock, done = threading.Lock(), [0]

    def one_seed(seed: int) -> tuple[int, Any]:
        req = bench.BenchRequest(system=system, variants=[variant], steps=steps, device=dev, seed=seed,
                                 seed_in_id=True, sweep_id=sweep_id, runs_dir=runs_dir, work_root=work_root)
        rows = bench.run(req, log=log, accuracy_stage=_dp_test_only(frames))
        with lock:
            done[0] += 1
            log(f"equivalence {sysdef.name} {variant}: seed {seed} trained ({done[0]}/{len(seeds)})")
        return seed, rows[0]

    t0 = time.monotonic()
    outcomes = side_by_side.run_all(one_seed, seeds, jobs)
    ran: list[tuple[int, dict]] = []
    per_seed = []
    for seed, r in outcomes:
        if r.status != "ok" or not r.accuracy.dp_test:
            raise RunFailed(f"equivalence: seed {seed}'s training {r.run_id} did not finish with a dp test "
                            f"({r.error or r.accuracy.detail}); nothing judged, no record written")
        ran.append((seed, r.accuracy.dp_test))
        per_seed.append({"seed": seed, "run_id": r.run_id, "dp_test": r.accuracy.dp_test})
        log(f"seed {seed}: {format_dp_test(r.accuracy.dp_test)}")
    frames_seen = {int(d.get("numb_test", -1)) for _, d in ran + base}
    if len(frames_seen) > 1:
        raise RunFailed(f"equivalence: dp test frame counts differ between the variant's runs and "
                        f"{cal_path.name} {sorted(frames_seen)} (give --frames as the calibration was made)")
    v_seeds, v = samples(ran)
    b_seeds, b = samples(base)
    res = eq.judge(v, b)
    from harness.cli.floor import card_name

    rec = {"schema": SCHEMA, "sweep_id": sweep_id, "system": sysdef.name, "variant": variant,
           "accuracy_class": vdef.accuracy_class, "device": dev, "card": card_name(dev), "steps": steps,
           "gate_steps": g, "at_gate_steps": steps == g, "jobs": jobs,
           "timing": "not timed: the seeds trained side by side (bench measures speed)",
           "calibration": cal_path.name, "seeds_variant": v_seeds, "seeds_baseline": b_seeds,
           "verdict": res.verdict, "detail": res.detail, "alpha": res.alpha, "metrics": metrics_record(res),
           "runs": per_seed, "wall_s": round(time.monotonic() - t0, 1),
           "environment": {"harness_git": environment.capture().get("harness_git")},
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rec["path"] = str(fsutil.atomic_write_json(Path(out_dir) / f"{sweep_id}-{sysdef.name}-{variant}.json", rec))
    return rec


def _cmd_equivalence(a: argparse.Namespace) -> int:
    seeds = _parse_seeds(a.seeds)
    if a.jobs < 1:
        raise UserError(f"--jobs {a.jobs}: at least 1")
    rec = run_equivalence(a.system, a.variant, seeds, a.steps, a.device, a.jobs, a.frames,
                          log=lambda m: print(m, file=sys.stderr))
    where = "" if rec["at_gate_steps"] else f" (not the system's gate_steps {rec['gate_steps']})"
    print(f"equivalence {rec['system']} {rec['variant']} at {rec['steps']} steps{where}, {len(rec['seeds_variant'])} "
          f"seeds vs {len(rec['seeds_baseline'])} of {rec['calibration']}: {str(rec['verdict']).upper()}")
    print(rec["detail"])
    print(f"wrote {rec['path']}", file=sys.stderr)
    return 1 if a.strict and rec["verdict"] != "pass" else 0


def register_cli(subparsers) -> None:
    e = subparsers.add_parser("equivalence", help="training equivalence of a variant over many seeds, trained side "
                              "by side, against the baseline's calibration (docs/accuracy.md section 4)")
    e.add_argument("--system", default="water")
    e.add_argument("--variant", required=True)
    e.add_argument("--seeds", required=True, metavar="S1,S2,...", help=f"the variant's seeds, at least {eq.MIN_SEEDS} "
                   "(calibrate prints how many its spread asks for)")
    e.add_argument("--steps", type=int, default=None, help="training steps (default: the system's gate_steps)")
    e.add_argument("--device", default="auto")
    e.add_argument("--jobs", type=int, default=1, help="seeds trained at once (a GPU has room for several)")
    e.add_argument("--frames", type=int, default=None, help="dp test frames per validation system (0 = all; "
                   "as the calibration was made)")
    e.add_argument("--strict", action="store_true", help="exit 1 unless the verdict is pass")
    e.set_defaults(func=_cmd_equivalence)
