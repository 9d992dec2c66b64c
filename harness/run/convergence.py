"""A proof over a full training: variant x seed trainings of one system from the same input, with
the learning rate decaying from start_lr to stop_lr over the run, K of them side by side, then
upstream's `dp --pt test` of each final model; the rule (harness/judge/convergence_rule.py)
judges the candidates against the baseline seeds; one ConvergenceRecord is written atomically
under results/convergence/. Runs go through the same stages as bench (prepare, run_training,
the judge's dp test processes); no run record is written under results/runs/ (side-by-side step
times are not bench timings)."""
from __future__ import annotations

import copy
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.core import environment
from harness.core.convergence_records import SCHEMA, ConvergenceRecord, ConvergenceRun, LcurveRows
from harness.core.errors import UserError
from harness.core.records import BuiltVariant, RunSpec, System
from harness.judge import convergence_rule as rule
from harness.judge import processes
from harness.results import convergence as store
from harness.results import runs as results
from harness.run import bench, distributed, timing, train

CONVERGENCE = store.CONVERGENCE
ROWS = 100  # lcurve rows per run: disp_freq = steps // ROWS
DP_TEST_RESERVE_S = {"cuda": 25.0, "cpu": 120.0}  # kept free at the budget's end for each run's dp test


@dataclass
class ConvergenceRequest:
    system: str
    variants: list[tuple[str, int]]  # (variant, seeds), baseline among them
    steps: int | str
    device: str = "auto"
    seed: int = 10  # seeds are seed, seed+1, ...: the same list for every variant
    parallel: int = 1
    time_budget_s: float | None = None
    out_dir: Path = CONVERGENCE
    work_root: Path = results.WORK
    baseline_from: list[Path] = dataclasses.field(default_factory=list)  # earlier records whose baseline seeds are reused


def parse_variant(text: str) -> tuple[str, int]:
    """"fused:3" -> ("fused", 3); "fused" -> ("fused", 1)."""
    name, _, n = text.partition(":")
    try:
        seeds = int(n) if n else 1
    except ValueError:
        raise UserError(f"--variant {text!r}: the seed count after ':' must be an integer") from None
    if not name or seeds < 1:
        raise UserError(f"--variant {text!r}: expected NAME or NAME:SEEDS with SEEDS >= 1")
    return name, seeds


def upstream_default_decay_steps(steps: int) -> int:
    """What upstream's LearningRateExp uses when decay_steps >= numb_steps (deepmd 3.2.0,
    deepmd/dpmodel/utils/learning_rate.py: default_ds)."""
    return 100 if steps // 10 > 100 else steps // 100 + 1


def scaled_input(system: System, steps: int) -> System:
    """The system with its learning-rate schedule fitted to `steps` the way upstream fits one:
    start_lr and stop_lr kept, decay_rate derived by upstream from them and numb_steps (so the
    rate reaches stop_lr at the last step), decay_steps no longer than upstream's own default for
    this length (the input's 5000, meant for 1e6 steps, would give 10,000 steps two plateaus);
    and disp_freq = steps // ROWS, for ROWS lcurve rows."""
    inp = copy.deepcopy(system.input)
    lr = inp.get("learning_rate") or {}
    if lr.get("type", "exp") != "exp" or not {"start_lr", "stop_lr"} <= set(lr):
        raise UserError(f"{system.name}: convergence needs an exp learning rate with start_lr and stop_lr")
    lr.pop("decay_rate", None)  # upstream derives it from stop_lr when absent
    lr["decay_steps"] = int(min(int(lr.get("decay_steps", steps)), upstream_default_decay_steps(steps)))
    inp["training"]["disp_freq"] = max(1, steps // ROWS)
    return dataclasses.replace(system, input=inp)


def _plan(req: ConvergenceRequest) -> list[tuple[str, int]]:
    """(variant, seed) of every training this call runs, baseline seeds first. Baseline seeds
    alone are a plan too (the first half of a proof split over two calls); with baseline_from
    they come from that record and only candidates train."""
    names = [n for n, _ in req.variants]
    if len(set(names)) != len(names):
        raise UserError("each --variant may be given once (NAME:SEEDS)")
    if req.baseline_from:
        if "baseline" in names:
            raise UserError("give --variant baseline:N or --baseline-from RECORD, not both")
        if not names:
            raise UserError("--baseline-from needs a variant to compare with (e.g. --variant fused:3)")
    elif "baseline" not in names:
        raise UserError("convergence needs --variant baseline:N (N >= 2 for a verdict: the rule's band is "
                        "the baseline seeds') or --baseline-from RECORD")
    if req.parallel < 1:
        raise UserError(f"--parallel must be at least 1, not {req.parallel}")
    if req.time_budget_s is not None and not req.time_budget_s > 0:
        raise UserError(f"--time-budget must be a positive number of seconds, not {req.time_budget_s}")
    order = sorted(req.variants, key=lambda v: v[0] != "baseline")  # baseline first
    return [(n, req.seed + i) for n, k in order for i in range(k)]


class _Sweep:
    """Shared state of the worker threads: the deadline, the stop flag, run intervals."""

    def __init__(self, deadline: float | None, reserve_s: float):
        self.deadline, self.reserve_s = deadline, reserve_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.intervals: dict[int, tuple[float, float]] = {}
        self.walls: dict[str, float] = {}

    def timeout_for(self, variant: str) -> tuple[bool, float | None]:
        """(start it?, the child's time limit)."""
        if self.deadline is None:
            return True, None
        left = self.deadline - time.monotonic() - self.reserve_s
        with self.lock:
            guess = self.walls.get(variant, 0.0)
        return left > max(guess, 1.0), max(left, 1.0)

    def progress(self, done: int, total: int) -> None:  # noqa: ARG002 (run_training's callback)
        if self.stop.is_set():
            raise KeyboardInterrupt  # run_training stops its child as on Ctrl-C


def _one(i: int, name: str, seed: int, built: BuiltVariant, system: System, req: ConvergenceRequest,
         device: str, sweep: str, state: _Sweep, judge_tree: Path, log: Callable[[str], None]) -> ConvergenceRun:
    run = ConvergenceRun(variant=name, seed=seed, status="not started")
    go, timeout = state.timeout_for(name)
    if state.stop.is_set() or not go:
        run.error = "stopped" if state.stop.is_set() else "time budget: would not finish with its dp test"
        return run
    rid = results.run_id(sweep, system.name, name, f"s{seed}")
    spec = RunSpec(run_id=rid, sweep_id=sweep, system=system, variant=built, steps=int(req.steps), device=device,
                   seed=seed, work_dir=req.work_root / rid, launch_env=distributed.cores_share_env(req.parallel),
                   timeout_s=timeout)
    log(f"[{name} seed {seed}] training {req.steps} steps on {device}")
    t0 = time.monotonic()
    tr = train.run_training(spec, progress=state.progress)
    with state.lock:
        state.intervals[i] = (t0, time.monotonic())
        state.walls[name] = max(state.walls.get(name, 0.0), tr.wall_s)
    tm = timing.steady_state(tr.step_s, tr.clock, tr.startup_s, tr.wall_s, tr.upstream_avg_step_s)
    run.status, run.error, run.wall_s, run.startup_s = tr.status, tr.error, round(tr.wall_s, 2), tr.startup_s
    run.step_ms_median = None if tm.step_s_median is None else tm.step_s_median * 1e3
    run.work_dir = str(tr.work_dir)
    lc = results.read_lcurve(tr.lcurve) or {}
    steps = lc.get("step", [])
    wall = rule.wall_at_steps(tr.startup_s, tr.step_s, steps)
    run.lcurve = LcurveRows(step=list(steps), rmse_e_val=list(lc.get("rmse_e_val", [None] * len(steps))),
                            rmse_f_val=list(lc.get("rmse_f_val", [None] * len(steps))),
                            lr=list(lc.get("lr", [None] * len(steps))), wall_s=[wall.get(int(s)) for s in steps])
    log(f"[{name} seed {seed}] {tr.status} in {tr.wall_s:.0f} s" + (f": {tr.error}" if tr.error else ""))
    if tr.status == "ok" and tr.checkpoint is not None and not state.stop.is_set():
        frames = processes.DEFAULT_TEST_FRAMES[device]
        try:
            run.dp_test = processes.run_dp_test(tr.checkpoint, system.validation, tr.work_dir / "dp_test",
                                                device, frames, judge_tree)
        except RuntimeError as e:
            run.error = f"dp test: {e}"
    return run


def _concurrency(intervals: dict[int, tuple[float, float]], i: int) -> int | None:
    if i not in intervals:
        return None
    a, b = intervals[i]
    return sum(1 for s, e in intervals.values() if s < b and e > a)


def training_identity(system: System) -> str:
    """sha256 of what a training learns from: the input (data paths left out: they name a
    machine's folders) and every file of the training and validation systems."""
    import hashlib
    import json

    inp = copy.deepcopy(system.input)
    for part in ("training_data", "validation_data"):
        (inp.get("training", {}).get(part) or {}).pop("systems", None)
    h = hashlib.sha256(json.dumps(inp, sort_keys=True).encode())
    for role, dirs in (("train", system.train), ("validation", system.validation)):
        for d in dirs:
            for f in sorted(p for p in Path(d).rglob("*") if p.is_file()):
                h.update(f"{role}/{f.relative_to(d)}\n".encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def read_baseline_record(path: Path) -> ConvergenceRecord:
    """The record --baseline-from names; UserError when it is none (before anything is built)."""
    from harness.core.records import BadRecord

    try:
        return ConvergenceRecord.from_json(Path(path))
    except BadRecord as e:
        raise UserError(f"--baseline-from {path}: {e}") from None


def _setting(rec: ConvergenceRecord) -> dict:
    """What a record's trainings share, the keys a reused baseline seed must match."""
    return {"system": rec.system, "steps": rec.steps, "device": rec.device, "card": rec.card,
            "learning_rate": rec.learning_rate, "input_sha256": rec.input_sha256,
            "baseline build": (rec.builds or {}).get("baseline")}


def reused_baseline(old: ConvergenceRecord, system: System, steps: int, device: str, card: str, build: str,
                    identity: str, want: dict | None = None) -> list[ConvergenceRun]:
    """The finished baseline seeds of an earlier record trained from exactly this input, data,
    step count, learning rate, device, card and baseline build (or `want`, another record's
    setting); UserError naming the first thing that differs (seeds of another setting are no band
    for this one)."""
    path = old.path
    want = want or {"system": system.name, "steps": steps, "device": device, "card": card,
                    "learning_rate": system.input["learning_rate"], "input_sha256": identity,
                    "baseline build": build}
    got = _setting(old)
    for key, value in want.items():
        if got[key] != value:
            raise UserError(f"--baseline-from {path}: its {key} is {got[key]!r}, this run's is {value!r}")
    base = [r for r in old.runs if r.variant == "baseline" and r.status == "ok"]
    if not base:
        raise UserError(f"--baseline-from {path}: it has no finished baseline seed")
    for r in base:
        r.sweep_id = r.sweep_id or old.sweep_id
    return base


def reused_baselines(olds: list[ConvergenceRecord], system: System | None, steps: int, device: str, card: str,
                     build: str, identity: str, log: Callable[[str], None] = print,
                     want: dict | None = None, have: list[ConvergenceRun] = ()) -> list[ConvergenceRun]:
    """reused_baseline of every record, a seed in one record only (`have`: seeds already in)."""
    reused: list[ConvergenceRun] = []
    for old in olds:
        seeds = reused_baseline(old, system, steps, device, card, build, identity, want)
        reused_seeds = {r.seed for r in reused} | {r.seed for r in have if r.variant == "baseline"}
        twice = sorted({r.seed for r in seeds} & reused_seeds)
        if twice:
            raise UserError(f"--baseline-from {old.path}: baseline seed {twice[0]} is in another record too "
                            "(one seed counted twice would narrow the band)")
        reused += seeds
        log(f"baseline: {len(seeds)} seeds reused from sweep {old.sweep_id} ({old.path})")
    return reused


def calibrated_final_tol(system: str, device: str, steps: int) -> dict[str, float] | None:
    """The float64 dp-test thresholds of a seed-spread calibration at exactly this system, device
    and step count (harness/judge/calibration.py), else None: a 200-step calibration says nothing
    about the spread after 10,000 steps, so the rule then uses the baseline seeds' own."""
    import json

    from harness.judge import calibration

    p = calibration.calibration_path(system, device, steps)
    try:
        return dict(json.loads(p.read_text())["thresholds"]["float64"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check(res: rule.Verdict, finished: int, planned: int) -> dict:
    return {"verdict": res.verdict, "reasons": res.reasons, "spread_source": res.spread_source,
            "seeds_finished": finished, "seeds_planned": planned,
            "bands": [{**dataclasses.asdict(b), "fraction": round(b.fraction, 4), "ok": b.ok} for b in res.bands],
            "finals": [{**dataclasses.asdict(f), "ok": f.ok} for f in res.finals]}


def judge(runs: list[ConvergenceRun], steps: int, final_tol: dict[str, float] | None = None
          ) -> tuple[str, dict, dict, dict | None]:
    """(verdict, checks per candidate variant, time to the baseline's final force RMSE, the rule's
    control on the baseline seeds: None with too few seeds to hold one out)."""
    ok = [r for r in runs if r.status == "ok" and r.lcurve.step]
    base = {r.seed: r.lcurve.to_dict() for r in ok if r.variant == "baseline"}
    base_final = {r.seed: r.dp_test for r in ok if r.variant == "baseline" and r.dp_test}
    target = rule.target_rmse(base)
    checks, verdicts = {}, []
    ttr: dict = {"metric": "rmse_f_val", "target": target, "by_variant": {}}
    for v in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in ok if r.variant == v]
        ttr["by_variant"][v] = {str(r.seed): (None if target is None else rule.time_to_rmse(
            r.lcurve.step, r.lcurve.rmse_f_val, dict(zip(map(int, r.lcurve.step), r.lcurve.wall_s)), target))
            for r in mine}
        if v == "baseline":
            continue
        res = rule.evaluate(base, {r.seed: r.lcurve.to_dict() for r in mine}, base_final,
                            {r.seed: r.dp_test for r in mine if r.dp_test}, steps, calibrated_final_tol=final_tol)
        verdicts.append(res.verdict)
        checks[v] = _check(res, len(mine), sum(1 for r in runs if r.variant == v))
    verdict = "fail" if "fail" in verdicts else ("incomplete" if "incomplete" in verdicts or not verdicts else "pass")
    held_out = rule.control(base, base_final, steps, calibrated_final_tol=final_tol)
    control = None
    if held_out:
        control = {"what": "each baseline seed judged by the rule against the other baseline seeds",
                   "verdict": "pass" if all(c.verdict == "pass" for c in held_out.values()) else "fail",
                   "seeds": {str(s): _check(c, 1, 1) for s, c in held_out.items()}}
        if control["verdict"] != "pass" and verdict in ("pass", "fail"):
            verdict = "incomplete"  # upstream fails its own rule on these seeds: the rule cannot judge here
    return verdict, checks, ttr, control


def run(req: ConvergenceRequest, log: Callable[[str], None] = print) -> ConvergenceRecord:
    t_start = time.monotonic()
    plan = _plan(req)
    olds = [read_baseline_record(p) for p in req.baseline_from]
    names = list(dict.fromkeys(["baseline"] + [n for n, _ in plan]))  # baseline's build runs every dp test
    breq = bench.BenchRequest(system=req.system, variants=names, steps=req.steps, device=req.device, seed=req.seed)
    prep = bench.prepare(breq, log)  # bad input -> UserError here, before anything is written
    req.steps = int(breq.steps)
    system = scaled_input(prep.system, req.steps)
    built = {b.name: b for b in prep.built}
    sweep = results.new_sweep_id()
    env = environment.capture()
    card = env.get("gpu_name") if prep.device == "cuda" else "cpu"
    identity = training_identity(system)
    reused = reused_baselines(olds, system, req.steps, prep.device, card, built["baseline"].hash, identity, log)
    deadline = None if req.time_budget_s is None else t_start + req.time_budget_s
    state = _Sweep(deadline, DP_TEST_RESERVE_S[prep.device])
    judge_tree = built["baseline"].tree
    if len(reused) + dict(req.variants).get("baseline", 0) < 2:
        log("baseline has 1 seed: no seed spread, the verdict will be 'incomplete' (a smoke run)")
    log(f"convergence {sweep}: {len(plan)} trainings of {req.steps} steps, {req.parallel} at a time; "
        f"learning rate {system.input['learning_rate']}")
    with ThreadPoolExecutor(max_workers=req.parallel) as pool:
        futs = [pool.submit(_one, i, n, s, built[n], system, req, prep.device, sweep, state, judge_tree, log)
                for i, (n, s) in enumerate(plan)]
        try:
            out = [f.result() for f in futs]
        except KeyboardInterrupt:
            state.stop.set()
            processes.stop_gates()
            out = [f.result() for f in futs]
    for i, r in enumerate(out):
        r.concurrent, r.sweep_id = _concurrency(state.intervals, i), sweep
    out = reused + out
    verdict, checks, ttr, control = judge(out, req.steps, calibrated_final_tol(system.name, prep.device, req.steps))
    rec = ConvergenceRecord(
        schema=SCHEMA, sweep_id=sweep, system=system.name, steps=req.steps, device=prep.device,
        card=card, parallel=req.parallel, learning_rate=system.input["learning_rate"], input_sha256=identity,
        builds={n: built[n].hash for n in names}, baseline_from=[str(o.sweep_id) for o in olds] or None, rule=rule.RULE_TEXT,
        verdict=verdict, checks=checks, control=control, time_to_rmse=ttr, runs=out, environment=env,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    store.write(rec, req.out_dir)
    return rec



def rejudge(record: Path, baseline_from: list[Path], out_dir: Path | None = None,
            log: Callable[[str], None] = print) -> ConvergenceRecord:
    """An earlier proof judged again, its trainings as they were, with the baseline seeds of more
    records (same system, steps, learning rate, device, card, input and data, baseline build:
    checked as for --baseline-from), or with none when the rule changed since it was judged.
    Nothing is retrained; the rule is the one in force
    (rule.RULE_TEXT). A new record (new sweep id, `rejudged_from` the old one); the old record
    stays as it was, its verdict included."""
    try:
        old = ConvergenceRecord.from_json(Path(record))
    except Exception as e:  # BadRecord or unreadable
        raise UserError(f"--rejudge {record}: {e}") from None
    if not baseline_from and old.rule == rule.RULE_TEXT:
        raise UserError(f"--rejudge {record}: it was judged by the rule in force already; give --baseline-from "
                        "RECORD (the baseline seeds to add)")
    olds = [read_baseline_record(p) for p in baseline_from]
    mine = [r for r in old.runs if r.variant != "baseline"]
    if not mine:
        raise UserError(f"--rejudge {record}: it has no variant run to judge")
    for r in old.runs:
        r.sweep_id = r.sweep_id or old.sweep_id
    have = [r for r in old.runs if r.variant == "baseline"]
    added = reused_baselines(olds, None, old.steps, old.device, old.card, "", "", log, want=_setting(old), have=have)
    runs = have + added + mine
    verdict, checks, ttr, control = judge(runs, int(old.steps),
                                          calibrated_final_tol(old.system, old.device, int(old.steps)))
    rec = dataclasses.replace(
        old, sweep_id=results.new_sweep_id(), rule=rule.RULE_TEXT, verdict=verdict, checks=checks, control=control,
        time_to_rmse=ttr, runs=runs, rejudged_from=old.sweep_id,
        baseline_from=list(dict.fromkeys([*(old.baseline_from or []), *(str(o.sweep_id) for o in olds)])),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    log(f"rejudged sweep {old.sweep_id}: {len(have) + len(added)} baseline seeds "
        f"({', '.join(str(r.seed) for r in have + added)}), nothing retrained")
    store.write(rec, out_dir or CONVERGENCE)
    return rec
