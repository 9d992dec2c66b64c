"""`dpharness calibrate` and `dpharness parity`: seed sweeps that write calibration files, and a
same-weights parity check of one variant."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from harness.prepare import build
from harness.results import runs as results
from harness.run import train
from harness.core.records import AccuracyResult, RunRecord, StoredRun
from harness.core.errors import RunFailed
from harness.core.paths import ROOT
from harness.core import envvars, fsutil
from harness.judge.processes import DEFAULT_TEST_FRAMES, format_dp_test, run_dp_test, stop_gates
from harness.judge.parity import TOLERANCE, compare_eval, compare_step, finish_parity_eval, parity_verdict, start_parity_eval
from harness.judge import equivalence
from harness.judge.calibration import CALIBRATION, build_calibration, calibration_path, rederive


def _dp_test_only(frames: int | None) -> Callable[[RunRecord, list[RunRecord]], AccuracyResult]:
    def st(rec: RunRecord, previous: list[RunRecord]) -> AccuracyResult:
        n = DEFAULT_TEST_FRAMES.get(rec.run.device, 0) if frames is None else frames
        try:
            dp = run_dp_test(rec.train.checkpoint, rec.run.system.validation,
                             Path(rec.train.work_dir) / "accuracy", rec.run.device, n)
        except Exception as e:
            return AccuracyResult(verdict="fail", detail=f"accuracy gate error: {e}"[:400])
        return AccuracyResult(dp_test=dp, detail="calibration run")

    st.stop = stop_gates
    return st


CALIBRATION_VARIANTS = {"float64": "baseline", "float32": "fp32"}


def check_reference(reference: str, classes: list[str]) -> None:
    """calibrate --reference: a float64-class variant other than baseline trains the float64 seeds
    (a stand-in for a length upstream cannot train in one GPU call, e.g. fused-follow: upstream's
    own frame order, same-weights parity ~1e-14); only the float64 class then. UserError if not."""
    from harness.core.errors import UserError
    from harness.prepare import variants as variant_defs

    if reference == "baseline":
        return
    try:
        cls = variant_defs.load_variant(reference).accuracy_class
    except Exception as e:
        raise UserError(f"--reference {reference}: {e}") from None
    if cls != "float64":
        raise UserError(f"--reference {reference}: its accuracy class is {cls}, a stand-in for the float64 baseline "
                        "must be float64")
    if classes != ["float64"]:
        raise UserError(f"--reference {reference}: calibrates the float64 class only (--classes float64)")


def calibrate(system: str, steps: int | str, device: str, seeds: list[int], classes: list[str],
              frames: int | None = None, out_dir: Path = CALIBRATION, work_root: Path = results.WORK,
              log: Callable[[str], None] = print, jobs: int = 1, extend: bool = False,
              reference: str = "baseline") -> Path:
    """Train each class's reference variant with every seed, dp-test each, write the calibration.
    extend: keep the seeds already in the (system, device, steps) file and add these (a tighter
    upper bound on the spread without re-running the old seeds). reference: the float64 class's
    variant (check_reference); its file is named after it (calibration_path)."""
    from harness.run import bench

    if len(seeds) < 3 and not extend:
        from harness.core.errors import UserError

        raise UserError("calibrate needs at least 3 seeds (a spread of two is no spread)")
    check_reference(reference, classes)
    variants = [reference if c == "float64" else CALIBRATION_VARIANTS[c] for c in classes]
    runs: dict[str, list[dict]] = {c: [] for c in classes}
    resolved: dict[str, Any] = {}
    from harness.core.progress import Progress

    seeds_done = Progress(len(seeds), f"calibrate {system}", unit="seeds", stream=sys.stdout, tty=False,
                          every=1e-9, rate_from_start=True)
    lock = threading.Lock()

    def one_seed(seed: int) -> tuple[int, Any, list[StoredRun]]:
        req = bench.BenchRequest(system=system, variants=variants, steps=steps, device=device, seed=seed,
                                 runs_dir=out_dir / "runs", work_root=work_root)
        rows = bench.run(req, log=log, accuracy_stage=_dp_test_only(frames))
        with lock:
            seeds_done.update_to(seeds_done.n + 1)
        return seed, req, rows

    # seeds are independent and only their accuracy matters (not their speed): run `jobs` at once
    from harness.run import side_by_side

    outcomes = side_by_side.run_all(one_seed, seeds, jobs)
    for seed, req, rows in outcomes:
        resolved = {"steps": req.steps, "device": rows[0].device.kind if rows else device,
                    "system": rows[0].system if rows else system}
        for cls, r in zip(classes, rows):
            acc = r.accuracy
            if r.status != "ok" or not acc.dp_test:
                raise RunFailed(f"calibration run {r.run_id} failed: {r.error or acc.detail}")
            runs[cls].append({"seed": seed, "variant": r.variant, "run_id": r.run_id,
                              "dp_test": acc.dp_test})
            log(f"seed {seed} {r.variant}: {format_dp_test(acc.dp_test)}")
    n = frames if frames is not None else DEFAULT_TEST_FRAMES.get(resolved["device"], 0)
    path = calibration_path(resolved["system"], resolved["device"], resolved["steps"], out_dir, reference)
    if extend and path.is_file():
        old = json.loads(path.read_text())
        if int(old.get("numb_test", n)) != n:
            raise RunFailed(f"{path.name} was measured with {old.get('numb_test')} dp-test frames, not {n}")
        for cls, rs in old.get("runs", {}).items():
            new_seeds = {r["seed"] for r in runs.get(cls, [])}
            runs.setdefault(cls, [])[:0] = [r for r in rs if r["seed"] not in new_seeds]
    if min((len(rs) for rs in runs.values()), default=0) < 3:
        raise RunFailed(f"calibration of {resolved['system']} has fewer than 3 seeds per class (the runs' records "
                        f"are kept under {out_dir / 'runs'}: train more seeds, then `calibrate --from-runs`)")
    cal = build_calibration(resolved["system"], resolved["device"], resolved["steps"], runs, n, reference)
    fsutil.atomic_write_json(path, cal)
    return path


def newest_baseline_checkpoint(system: str, runs_dir: Path = results.RUNS) -> Path:
    """The checkpoint of the newest successful baseline run of `system` in runs_dir."""
    from harness.core.errors import UserError

    found = [r for r in results.load_runs(runs_dir) if r.variant == "baseline"
             and r.system == system and r.status == "ok" and r.artifacts.checkpoint]
    for r in sorted(found, key=lambda r: r.created or "", reverse=True):
        p = Path(r.artifacts.checkpoint)
        p = p if p.is_absolute() else ROOT / p
        if p.is_file():
            return p
    raise UserError(f"no baseline checkpoint of {system} under {runs_dir}: pass --checkpoint")


def parity_check(system: str, variant: str, checkpoint: Path | None = None, device: str = "auto",
                 steps: int = 20, runs_dir: Path = results.RUNS, work_dir: Path | None = None,
                 emulate_tf32: bool = False) -> dict[str, Any]:
    """Same-weights parity of `variant` against baseline on a baseline checkpoint, without training.
    The checkpoint defaults to the newest successful baseline run of `system` in runs_dir.
    emulate_tf32: the variant's float32 CPU GEMMs get TF32-rounded inputs (a TF32 variant's
    numerics where no tensor core exists; DPH_TF32_EMULATE)."""
    from harness.run import bench
    from harness.prepare import systems
    from harness.prepare import variants

    backend = variants.load_variant(variant).backend
    if backend != "pt":  # parity runs PyTorch code: for another backend it would judge the wrong model
        return {"variant": variant, "verdict": "not applicable",
                "detail": f"same-weights parity not applicable to the {backend} backend"}
    dev = bench.resolve_device(device)
    sysobj = systems.load_system(system)
    checkpoint = checkpoint or newest_baseline_checkpoint(sysobj.name, runs_dir)
    bb, vb = build.build_variant("baseline"), build.build_variant(variant)
    wd = work_dir or results.WORK / f"parity-{time.strftime('%Y%m%dT%H%M%S')}-{sysobj.name}-{variant}"
    wd.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for b in (bb, vb):
        p = wd / f"input-{b.name}.json"
        p.write_text(json.dumps(train.make_input(sysobj, b.overrides, steps, upstream_options=b.upstream_options),
                                indent=2))
        inputs[b.name] = p
    rp = start_parity_eval(bb.tree, (), {}, "baseline", inputs["baseline"], checkpoint, sysobj.validation[0],
                           sysobj.train[0], wd / "parity_baseline.npz", dev)
    venv = {**vb.env, envvars.DPH_TF32_EMULATE: "1"} if emulate_tf32 else vb.env
    vp = start_parity_eval(vb.tree, vb.modules, venv, vb.name, inputs[vb.name], checkpoint,
                           sysobj.validation[0], sysobj.train[0], wd / "parity_variant.npz", dev)
    rmeta, ref = finish_parity_eval(*rp, wd / "parity_baseline.npz")
    vmeta, var = finish_parity_eval(*vp, wd / "parity_variant.npz")
    if vmeta.get("load") != "ok" or rmeta.get("load") != "ok":
        return {"variant": variant, "verdict": "not applicable", "detail": vmeta.get("load") or rmeta.get("load")}
    par = compare_eval(ref, var, TOLERANCE[vb.accuracy_class])
    par["class"] = vb.accuracy_class
    par.update(compare_step(ref, var, TOLERANCE[vb.accuracy_class]))
    bad = parity_verdict(par, vb.accuracy_class)
    return {"variant": variant, "system": sysobj.name, "checkpoint": str(checkpoint), "parity": par,
            "tf32_emulated": emulate_tf32, "verdict": "fail" if bad else "pass",
            "detail": "; ".join(bad) or "within tolerance"}


def calibration_from_runs(system: str, device: str, steps: int, directory: Path = CALIBRATION,
                          reference: str = "baseline") -> Path:
    """Rebuild (system, device, steps)'s calibration from the run records under directory/runs
    (a calibration call cut short by its time limit keeps every seed it finished): each class's
    reference variant, ok and dp-tested, one record per seed (the newest). reference: a stand-in's
    float64 calibration (calibrate --reference) from its runs alone."""
    check_reference(reference, ["float64"])
    by_variant = ({v: c for c, v in CALIBRATION_VARIANTS.items()} if reference == "baseline"
                  else {reference: "float64"})
    runs: dict[str, dict[int, dict]] = {c: {} for c in CALIBRATION_VARIANTS}
    frames = set()
    for r in sorted(results.load_runs(directory / "runs"), key=lambda r: r.created or ""):
        dp = r.accuracy.dp_test
        if (r.system != system or r.device.kind != device or int(r.steps or -1) != int(steps)
                or r.variant not in by_variant or r.status != "ok" or not dp):
            continue
        frames.add(int(dp.get("numb_test", 0)))
        runs[by_variant[r.variant]][int(r.seed)] = {
            "seed": int(r.seed), "variant": r.variant, "run_id": r.run_id, "dp_test": dp}
    if len(frames) > 1:
        raise RunFailed(f"{system}: calibration runs used different dp-test frame counts {sorted(frames)}")
    runs_l = {c: [rs[k] for k in sorted(rs)] for c, rs in runs.items() if len(rs) >= 3}
    if "float64" not in runs_l:
        raise RunFailed(f"{system}-{device}-{steps}: fewer than 3 finished {reference} seeds under {directory / 'runs'}")
    cal = build_calibration(system, device, int(steps), runs_l, frames.pop() if frames else 0, reference)
    path = calibration_path(system, device, steps, directory, reference)
    fsutil.atomic_write_json(path, cal)
    return path


def _print_calibration(cal: dict[str, Any]) -> None:
    for cls, th in cal["thresholds"].items():
        for m, t in th.items():
            st = cal["stats"][cls][m]
            print(f"{cal['system']:8} {cls:8} {m:16} n {st['n']} mean {st['mean']:.5g} std {st['std']:.2g} "
                  f"[{st['min']:.5g}, {st['max']:.5g}] -> rel tol {t:.3g}{_seed_plan(m, st)}")


def _seed_plan(metric: str, st: dict[str, Any]) -> str:
    """What this spread means for the training-equivalence test (docs/accuracy.md section 4): the
    seeds per side a variant identical to the baseline needs to pass with 80 % probability."""
    margin = equivalence.MARGINS.get(metric)
    if margin is None or not st.get("mean") or st.get("n", 0) < 2:
        return ""
    n = equivalence.seeds_for_power(st["std"] / abs(st["mean"]), margin)
    need = f"~{n}" if n is not None else f"> {equivalence.MAX_PLANNED_SEEDS}"
    return f"; equivalence at margin {margin:.0%}: {need} seeds per side for 80 % power"


def _cmd_calibrate(a: argparse.Namespace) -> int:
    if a.from_runs:
        steps = int(a.steps) if str(a.steps).isdigit() else None
        if steps is None or a.device not in ("cpu", "cuda"):
            from harness.core.errors import UserError

            raise UserError("--from-runs needs --steps N and --device cpu|cuda (the calibration to rebuild)")
        path = calibration_from_runs(a.system, a.device, steps, reference=a.reference)
        _print_calibration(json.loads(path.read_text()))
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if a.rederive:
        files = sorted(CALIBRATION.glob("*.json"))
        for f in files:
            cal = rederive(json.loads(f.read_text()))
            fsutil.atomic_write_json(f, cal)
            _print_calibration(cal)
            print(f"rederived {f}", file=sys.stderr)
        return 0
    seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    for c in classes:
        if c not in CALIBRATION_VARIANTS:
            from harness.core.errors import UserError

            raise UserError(f"--classes: {c!r} is not one of {', '.join(CALIBRATION_VARIANTS)}")
    path = calibrate(a.system, a.steps, a.device, seeds, classes, frames=a.frames,
                     log=lambda m: print(m, file=sys.stderr), jobs=a.jobs, extend=a.extend, reference=a.reference)
    _print_calibration(json.loads(path.read_text()))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_parity(a: argparse.Namespace) -> int:
    out = parity_check(a.system, a.variant, Path(a.checkpoint) if a.checkpoint else None, a.device,
                       emulate_tf32=a.emulate_tf32)
    print(json.dumps(out, indent=1))
    return 4 if out.get("verdict") == "fail" else 0


def _cmd_precision_budget(a: argparse.Namespace) -> int:
    from harness.core.errors import UserError
    from harness.judge import precision_budget
    from harness.prepare import systems
    from harness.run import bench

    dev = bench.resolve_device(a.device)
    name = systems.load_system(a.system).name
    ckpt = Path(a.checkpoint) if a.checkpoint else newest_baseline_checkpoint(name)
    if not ckpt.is_file():
        raise UserError(f"--checkpoint {ckpt}: not found")
    from harness.cli.floor import card_name

    try:
        chosen = precision_budget.select(a.stages) if a.stages else None
    except ValueError as e:
        raise UserError(f"--stages: {e}") from None
    if a.jobs < 1:
        raise UserError(f"--jobs {a.jobs}: must be at least 1")
    # the record names the system; the parity checks load it as given (a user's system is a path)
    b = precision_budget.measure(name, ckpt, dev, card_name(dev),
                                 lambda _name, variant, c, d, emulate_tf32: parity_check(a.system, variant, c, d,
                                                                                        emulate_tf32=emulate_tf32),
                                 variants=chosen, jobs=a.jobs,
                                 on_row=lambda r: print(f"[budget] {precision_budget.row_line(r)}", file=sys.stderr,
                                                        flush=True))
    print(precision_budget.table(b))
    out = Path(a.out) if a.out else ROOT / "results" / "precision" / f"{name}-{dev}.json"
    fsutil.atomic_write_json(out, precision_budget.to_dict(b))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    """Add `calibrate` and `parity` to dpharness's sub-command parser (cli.build_parser)."""
    c = subparsers.add_parser("calibrate", help="seed-spread calibration of the accuracy gate's dp-test tolerance")
    c.add_argument("--system", default="water")
    c.add_argument("--steps", default="auto", help="training steps (use the sweep's; auto: 300 GPU, 20 CPU)")
    c.add_argument("--device", default="auto")
    c.add_argument("--seeds", default="1,2,3", help="comma list, at least 3")
    c.add_argument("--jobs", type=int, default=1, help="seeds trained at once (a GPU has room for several)")
    c.add_argument("--classes", default="float64,float32", help="accuracy classes to calibrate (float64,float32)")
    c.add_argument("--frames", type=int, default=None, help="dp test frames per validation system (0 = all)")
    c.add_argument("--extend", action="store_true",
                   help="add these seeds to the existing calibration of (system, device, steps)")
    c.add_argument("--from-runs", action="store_true",
                   help="rebuild the calibration from its run records under results/calibration/runs (no training)")
    c.add_argument("--reference", default="baseline", metavar="VARIANT",
                   help="the float64 variant that trains the seeds (default: upstream's baseline); a stand-in such "
                        "as fused-follow where upstream's length does not fit a GPU call; its file is "
                        "<system>-<device>-<steps>-<variant>.json and never judges a gate (docs/accuracy.md)")
    c.add_argument("--rederive", action="store_true",
                   help="recompute every committed calibration's thresholds from its recorded runs (no training)")
    c.set_defaults(func=_cmd_calibrate)
    p = subparsers.add_parser("parity", help="same-weights parity of a variant vs baseline (no training)")
    p.add_argument("--system", default="water")
    p.add_argument("--variant", required=True)
    p.add_argument("--checkpoint", default=None, help="baseline checkpoint (default: newest baseline run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--emulate-tf32", action="store_true",
                   help="round the variant's float32 CPU GEMM inputs to TF32 (a TF32 variant's numerics on a CPU)")
    p.set_defaults(func=_cmd_parity)
    q = subparsers.add_parser("precision-budget", help="same-weights error of each reduced-precision stage against float64: "
                              "float32 descriptor / fitting / both, TF32 in either or both (emulated off CUDA), "
                              "the bfloat16 descriptor probe")
    q.add_argument("--system", default="water")
    q.add_argument("--checkpoint", default=None, help="baseline checkpoint (default: newest baseline run)")
    q.add_argument("--device", default="auto")
    q.add_argument("--out", default=None, help="record path (default: results/precision/<system>-<device>.json)")
    q.add_argument("--stages", default=None, metavar="VARIANT,...",
                   help="only these stages' rows, by variant (default: every stage)")
    q.add_argument("--jobs", type=int, default=1,
                   help="rows measured at once (each is two start-up-bound parity children; a GPU has room for several)")
    q.set_defaults(func=_cmd_precision_budget)
