"""The one command-line interface: `dpharness <command>`; make targets are thin wrappers."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import threading
import traceback
from pathlib import Path

from harness.core.errors import HarnessError, UserError
from harness.core import paths


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3`: distinct integers, at least 3 (fewer cannot judge training equivalence)."""
    try:
        seeds = list(dict.fromkeys(int(t) for t in str(text).split(",") if t.strip()))
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, not {text!r}") from None
    if len(seeds) < 3:
        raise UserError(f"--seeds needs at least 3 distinct seeds (got {len(seeds)}): a spread of two is no spread")
    return seeds


def upstream_once(variants: list[str], seeds: list[int]) -> list[str]:
    """`bench --seeds ... --upstream-once`: the variants every seed after the first trains -- ours
    only. Upstream's runs (baseline, its legal and native settings) train on the first seed alone:
    they are the speed anchors of that seed's bench and the same-weights parity reference of every
    seed's runs (parity compares code on the same weights, so any seed's baseline serves; the gate
    says which seed it used). The equivalence test's baseline seeds then come from the
    calibration at gate_steps. Saves upstream's long runs where they would not fit one GPU call."""
    from harness.prepare import variants as vmod

    if len(seeds) < 2:
        raise UserError("--upstream-once needs --seeds (upstream's runs train on the first seed only)")
    ours = [v for v in variants if not vmod.upstream_only(vmod.chain(v))]
    if not ours:
        raise UserError("--upstream-once: every variant is upstream's own code, so the later seeds would train nothing")
    return ours


def budget_share(plans: list[list[str]], k: int) -> float:
    """The share of the time left that bench k of a multi-size sweep may use: its runs over the
    runs of the benches still to come (equal shares when every bench runs the same variants;
    with --upstream-once the first seed's bench, which also trains upstream, gets more)."""
    return len(plans[k]) / max(1, sum(len(p) for p in plans[k:]))


def _bench(a: argparse.Namespace) -> int:
    from harness.prepare import workload
    from harness.run import bench
    from harness.run import distributed

    seeds = parse_seeds(a.seeds) if a.seeds else [a.seed]
    rows: list = []  # every finished bench's runs: the gate's peers (the other seeds' dp tests)
    accuracy_stage = None
    if not a.no_accuracy:
        try:
            from harness.judge import gate as accuracy

            accuracy_stage = accuracy.stage(strict=a.strict, peers=rows, planned=seeds if a.seeds else None)
        except ImportError:
            accuracy_stage = None
    variants = list(dict.fromkeys(a.variant or ["baseline"]))
    if not a.no_baseline and "baseline" not in variants:
        variants.insert(0, "baseline")  # speed is a ratio to a baseline of the same sweep
    later = upstream_once(variants, seeds) if a.upstream_once else variants
    # work sizes (comma lists): every (replicate, batch size) is one bench of the same sweep, so
    # the report can fit how each variant's cost grows with the work (harness/report/worksize.py)
    # seeds (--seeds): every seed one bench of the same sweep, so a reduced-precision variant's
    # gate sees the earlier seeds' runs (the training-equivalence test, docs/accuracy.md)
    sizes = [(seed, r, bs) for seed in seeds for r in workload.parse_replicates(a.replicate)
             for bs in workload.parse_batch_sizes(a.batch_size)]
    plans = [variants if seed == seeds[0] else later for seed, _, _ in sizes]
    sweep_id, t0 = None, time.monotonic()
    for k, (seed, reps, bs) in enumerate(sizes):
        budget = a.time_budget
        if budget is not None:  # each size's share of what is left, by its number of runs
            budget = max(1.0, (a.time_budget - (time.monotonic() - t0)) * budget_share(plans, k))
        req = bench.BenchRequest(
            system=a.system, variants=plans[k], steps=a.steps, device=a.device,
            seed=seed, seed_in_id=bool(a.seeds), accuracy=not a.no_accuracy, profile=a.profile,
            upstream_version=a.upstream_version, upstream_source=Path(a.upstream_source) if a.upstream_source else None,
            runs_dir=Path(a.results_dir) / "runs", work_root=Path(a.results_dir) / "work",
            gpus=distributed.parse_gpus(a.gpus), gate_jobs=a.gate_jobs, time_budget_s=budget,
            replicate=reps, batch_size=bs, sweep_id=sweep_id, launcher=a.launcher,
        )
        got = bench.run(req, log=lambda m: print(m, file=sys.stderr), accuracy_stage=accuracy_stage)
        sweep_id = sweep_id or (got[0].sweep_id if got else None)
        print(bench.format_table(got))
        for r in got:
            print(f"wrote {r.path}", file=sys.stderr)
        rows.extend(got)
    if any(r.status not in ("ok", "unavailable", "fallback") for r in rows):  # fallback: the manifest allows it
        return 3
    if a.strict and any(r.accuracy.verdict == "fail" for r in rows):
        return 4
    return 0


LEGAL_SETTINGS = ["baseline", "fp32", "tos", "fp32-tos"]  # every combination the ASC22 rule allows


def _tune(a: argparse.Namespace) -> int:
    """Best legal configuration: the fastest allowed precision x type_one_side setting that the
    accuracy gate passes (baseline passes by definition), all in one sweep. With --seeds every
    setting trains with each seed, so a reduced-precision setting is judged by the same
    training-equivalence test as bench --seeds: its verdict is its last seed's (which holds the
    test), failed if any seed's run failed the gate; its time is the median over the seeds."""
    import statistics

    from harness.judge import gate as accuracy
    from harness.run import bench

    seeds = parse_seeds(a.seeds) if a.seeds else [a.seed]
    rows: list = []
    stage = accuracy.stage(peers=rows, planned=seeds if a.seeds else None)
    sweep_id = None
    for seed in seeds:
        req = bench.BenchRequest(system=a.system, variants=LEGAL_SETTINGS, steps=a.steps, device=a.device, seed=seed,
                                 seed_in_id=bool(a.seeds), sweep_id=sweep_id,
                                 runs_dir=Path(a.results_dir) / "runs", work_root=Path(a.results_dir) / "work")
        got = bench.run(req, log=lambda m: print(m, file=sys.stderr), accuracy_stage=stage)
        sweep_id = sweep_id or (got[0].sweep_id if got else None)
        print(bench.format_table(got))
        rows.extend(got)
    settings = []  # (variant, ms/step median over seeds, verdict, detail, first row)
    for v in dict.fromkeys(r.variant for r in rows):
        rs = [r for r in rows if r.variant == v]
        times = [r.timing.step_s_median for r in rs if r.status == "ok" and r.timing.step_s_median]
        if len(times) < len(rs):
            continue  # a seed did not run: the setting is not measured
        last = rs[-1].accuracy
        failed = next((r.accuracy for r in rs if r.accuracy.verdict == "fail"), None)
        verdict, detail = ("fail", failed.detail) if failed else (last.verdict, last.detail)
        settings.append((v, statistics.median(times), verdict, detail, rs[0]))
    ok = [t for t in settings if t[2] in ("baseline", "pass")]
    if not ok:
        print("no legal setting ran and passed the gate", file=sys.stderr)
        return 3
    best, fastest = min(ok, key=lambda t: t[1]), min(settings, key=lambda t: t[1])
    print(f"best legal configuration for {best[4].system}: {best[0]} "
          f"({best[1] * 1e3:.2f} ms/step, overrides {best[4].overrides or 'none'}"
          f"{f', {len(seeds)} seeds' if a.seeds else ''})")
    if fastest is not best:
        print(f"  (fastest overall was {fastest[0]}, but the accuracy gate said {fastest[2]}: {fastest[3]})")
    return 0


def _systems(a: argparse.Namespace) -> int:
    from harness.prepare import systems

    names = a.name or systems.list_system_names()
    if a.regenerate:
        from harness.prepare import systemgen

        for n in [n for n in names if n in systemgen.SPECS]:
            print(f"regenerating {n} (LAMMPS; minutes)", file=sys.stderr)
            systemgen.main([n])
    rows = []
    for n in names:
        s = systems.load_system(n)
        if a.setup:
            systems.ensure_data(s, log=lambda m: print(m, file=sys.stderr))
        problems = systems.checksum_problems(s)
        row = {"system": s.name, "atoms": s.atoms_per_frame, "types": list(s.type_map),
               "frames": s.spec.get("frames"), "data": "ok" if not problems else f"{len(problems)} problem(s): {problems[0]}"}
        if not problems:
            row["frames"] = systems.validate_system(s)
            if not a.no_stats:
                row["neighbours"] = systems.neighbour_stats(s)
        rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        nb = r.get("neighbours")
        nbs = (f"rcut {nb['rcut']}: max neighbours {nb['max_neighbours']} sel {nb['sel']} "
               f"{'covers' if nb['sel_covers'] else 'DOES NOT cover'}") if nb else ""
        print(f"{r['system']:8} {r['atoms']:4d} atoms  types {','.join(r['types']):10} frames {r['frames']}  data {r['data']}  {nbs}")
    return 0 if all(r["data"] == "ok" for r in rows) else 2


def _variants(a: argparse.Namespace) -> int:
    from harness.prepare import variants

    for n in variants.list_variant_names():
        v = variants.load_variant(n)
        ov = ", ".join(f"{k.split('/')[-2]}.{k.split('/')[-1]}={val}" for k, val in v.overrides.items()) or "-"
        up = ", ".join(f"{k.split('/')[-1]}={val}" for k, val in v.upstream_options.items())
        print(f"{n:12} base={v.base or '-':10} backend={v.backend:4} overrides: {ov}"
              + (f"  upstream-native: {up}" if up else ""))
        if a.verbose:
            print(f"    {v.description}")
    return 0


def _build(a: argparse.Namespace) -> int:
    from harness.prepare import build
    from harness.prepare import upstream

    pin = upstream.default_pin()
    for v in a.variant:
        b = build.build_variant(v, pin, tf_source=Path(a.upstream_source) if a.upstream_source else None)
        print(f"{v}: {'cached' if b.cached else 'built'} {b.tree}")
        for line in b.log:
            print(f"    {line}")
    return 0


def _wheelhouse(a: argparse.Namespace) -> int:
    from harness.prepare import wheelhouse

    return wheelhouse.download(Path(a.dest), log=lambda m: print(m, file=sys.stderr))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpharness", description=__doc__)
    p.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="build, train, check and time variants on one system")
    b.add_argument("--system", default="water", help="system name (systems/<name>) or path to a system dir")
    b.add_argument("--variant", action="append", help="variant (repeatable; the first is the ratio base)")
    b.add_argument("--steps", default="auto", help="training steps per run (auto: 300 on a GPU, 20 on CPU)")
    b.add_argument("--no-baseline", action="store_true", help="do not add baseline as the sweep's first variant")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--seed", type=int, default=10)
    b.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="train every variant with each seed (one sweep): a reduced-precision variant's "
                        "gate then runs the training-equivalence test over them (at least 3; see docs/accuracy.md)")
    b.add_argument("--upstream-once", action="store_true",
                   help="with --seeds: upstream's runs (baseline and upstream-only settings) train on the first "
                        "seed only, ours on every seed, each judged against the first seed's baseline "
                        "(equivalence baseline seeds: the calibration at gate_steps)")
    b.add_argument("--no-accuracy", action="store_true", help="skip the accuracy gate")
    b.add_argument("--strict", action="store_true", help="exit non-zero when the accuracy gate fails")
    b.add_argument("--profile", action="store_true", help="also capture a torch.profiler window")
    b.add_argument("--upstream-version", default=None)
    b.add_argument("--results-dir", default=str(paths.RESULTS),
                   help="where runs/ (JSON records) and work/ (logs, checkpoints) go")
    b.add_argument("--upstream-source", default=None, help="a checkout holding the asc-2022 commit: the asc-* "
                   "variants (TF v2 family) are built from it instead of v2.0.3's sdist")
    b.add_argument("--gpus", default="1", help="GPU counts to measure, comma list (e.g. 1,2,4): torchrun DDP "
                   "for N>1, one run per variant and count; see docs/distributed.md")
    b.add_argument("--launcher", default="auto", choices=("auto", "torchrun", "horovod"),
                   help="how N>1 processes start: torchrun (PyTorch variants), horovod (the TF v2 family, "
                        "asc-*: horovodrun --gloo; on a CPU machine --gpus N then means N processes); "
                        "auto: by backend")
    b.add_argument("--gate-jobs", type=int, default=1, metavar="N",
                   help="N>1: time all variants first, then run N accuracy gates at a time (baseline's "
                        "first); gates never overlap a timed run")
    b.add_argument("--replicate", default=None, metavar="AxBxC",
                   help="train on periodic supercells (e.g. 2x2x2: 8x the atoms; labels exact); a comma list (1x1x1,2x2x2) benches every size in one sweep")
    b.add_argument("--batch-size", default=None, metavar="N",
                   help="frames per step for every variant of the sweep (default: the system's input.json); a comma list benches every batch size in one sweep")
    b.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="the sweep's time limit (Slurm job, GPU lease): start a run only if it and the "
                        "accuracy gates still owed fit, so a limit leaves judged runs")
    b.set_defaults(func=_bench)

    t = sub.add_parser("tune", help="find the fastest legal precision/type_one_side setting that passes the gate")
    t.add_argument("--system", default="water")
    t.add_argument("--steps", default="auto")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=10)
    t.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="train every setting with each seed: reduced precision is then judged by the "
                        "training-equivalence test (at least 3; docs/accuracy.md)")
    t.add_argument("--results-dir", default=str(paths.RESULTS))
    t.set_defaults(func=_tune)

    s = sub.add_parser("systems", help="list systems with data status and neighbour statistics")
    s.add_argument("name", nargs="*")
    s.add_argument("--setup", action="store_true", help="obtain missing upstream data (water)")
    s.add_argument("--no-stats", action="store_true")
    s.add_argument("--regenerate", action="store_true",
                   help="regenerate the project's generated systems (needs the systemgen extra)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_systems)

    v = sub.add_parser("variants", help="list variants")
    v.add_argument("-v", "--verbose", action="store_true")
    v.set_defaults(func=_variants)

    bd = sub.add_parser("build", help="build (or show the cached build of) variants")
    bd.add_argument("variant", nargs="+")
    bd.add_argument("--upstream-source", default=None, help="a checkout holding the asc-2022 commit: the TF v2 "
                    "family (asc-* variants) is built from it instead of v2.0.3's sdist")
    bd.set_defaults(func=_build)

    w = sub.add_parser("wheelhouse", help="download the offline wheels a GPU node needs")
    w.add_argument("--dest", default=str(paths.WHEELHOUSE))
    w.set_defaults(func=_wheelhouse)

    # later stages register their own sub-commands
    from harness.cli import calibrate as accuracy
    from harness.results import export
    from harness.cli import profile
    from harness.cli import regress as regression
    from harness.report import render as report
    from harness.results import store

    for stage in (accuracy, profile, store, regression, report, export):
        if hasattr(stage, "register_cli"):
            stage.register_cli(sub)
    from harness.cli import sweep
    sweep.register_cli(sub)  # dpharness sweep
    from harness.cli import convergence
    convergence.register_cli(sub)  # dpharness convergence
    from harness.cli import trajectory as trajectory_cli
    trajectory_cli.register_cli(sub)  # dpharness trajectory
    from harness.cli import train as train_cli
    train_cli.register_cli(sub)  # dpharness train
    from harness.cli import floor as floor_cli
    floor_cli.register_cli(sub)  # dpharness floor
    from harness.cli import md as md_cli
    md_cli.register_cli(sub)  # dpharness md
    from harness.cli import tf_era as tf_era_cli
    tf_era_cli.register_cli(sub)  # dpharness tf-era
    from harness.cli import equivalence as equivalence_cli
    equivalence_cli.register_cli(sub)  # dpharness equivalence
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    # a time limit (timeout, Slurm, the lanes' budget) sends SIGTERM: stop as on Ctrl-C, so a
    # sweep keeps what it has timed instead of dying between records
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return a.func(a)
    except HarnessError as e:
        if a.debug:
            traceback.print_exc()
        print(f"dpharness: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dpharness: interrupted", file=sys.stderr)
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _sigterm(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
