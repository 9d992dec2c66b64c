"""The bench pipeline: system -> build -> train -> accuracy -> results, for several variants of
one sweep. It only composes stages through their records."""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.results import anchors
from harness.prepare import build
from harness.run import distributed
from harness.core import environment
from harness.prepare import input_check
from harness.results import runs as results
from harness.prepare import systems, workload
from harness.run import timing
from harness.run import train
from harness.prepare import upstream
from harness.core.progress import Progress
from harness.core.errors import UserError, whole_number
from harness.core.records import (AccuracyResult, BuiltVariant, Profile, RunRecord, RunSpec, StoredRun, System,
                                   UpstreamPin)


@dataclass
class BenchRequest:
    system: str
    variants: list[str]
    steps: int | str = "auto"
    device: str = "auto"
    seed: int = 10
    seed_in_id: bool = False  # one sweep of several seeds (bench --seeds): the seed is in each run id
    sweep_id: str | None = None
    accuracy: bool = True
    profile: bool = False
    upstream_version: str | None = None
    upstream_source: Path | None = None
    runs_dir: Path = results.RUNS
    work_root: Path = results.WORK
    gpus: list[int] = field(default_factory=lambda: [1])  # GPU counts to measure, each a run per variant
    # >1: time every variant first, then run the accuracy gates (baseline's first) this many at a
    # time. Gates never overlap a timed run, and the sweep's wall time drops by about half.
    gate_jobs: int = 1
    # seconds this sweep may take (a Slurm allocation, a GPU lease): a run is started only if it
    # and the gates of every timed run still fit (see TimeBudget); None: no limit
    time_budget_s: float | None = None
    launch_prefix: tuple[str, ...] = ()  # before every training command (profile --nsys)
    # >0: after the sweep's runs, an Nsight Compute run of each profiled run's top this-many
    # kernels (profile --ncu K), its result in the run's record (RunRecord.ncu); each limited
    # to ncu_timeout_s
    ncu_kernels: int = 0
    ncu_timeout_s: float = 420.0
    # work-size knobs, the same for every variant (harness/prepare/workload.py)
    replicate: tuple[int, int, int] | None = None
    batch_size: int | None = None
    # how N>1 processes start: auto (by backend), torchrun, horovod (TF v2 family; on CPU, N processes)
    launcher: str = "auto"


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    has_gpu = environment.cuda_available()
    if device == "cuda" and not has_gpu:
        raise UserError("--device cuda: no CUDA GPU is visible to torch on this machine")
    return "cuda" if device == "cuda" or (device == "auto" and has_gpu) else "cpu"


DEFAULT_STEPS = {"cuda": 300, "cpu": 20}


def resolve_steps(steps: int | str, device: str) -> int:
    if steps == "auto":
        return DEFAULT_STEPS[device]
    return whole_number(steps, 2, f"--steps must be an integer or auto, not {steps!r}",
                        "--steps must be at least 2, not {n}")


@dataclass
class Prepared:
    system: System
    built: list[BuiltVariant]
    device: str
    pin: UpstreamPin


def prepare(req: BenchRequest, log: Callable[[str], None]) -> Prepared:
    """Everything that can reject the request, before anything is written under results/."""
    device = resolve_device(req.device)
    req.steps = resolve_steps(req.steps, device)
    req.gpus = distributed.parse_gpus(req.gpus)
    if not req.variants:
        raise UserError("no variant given")
    from harness.prepare import variants as vmod

    backends = {v: vmod.chain(v)[-1].backend for v in req.variants}  # bad variant/manifest -> UserError now
    distributed.check_launcher(req.launcher, backends)
    if not (req.launcher == "horovod" and device == "cpu"):  # horovod on CPU: processes, not GPUs
        distributed.check_gpus(req.gpus, device)  # more GPUs than visible -> UserError, nothing written
    system = systems.load_system(req.system)
    pin = upstream.default_pin(req.upstream_version)
    if req.upstream_source:
        if "tf-v2" not in backends.values():
            raise UserError("--upstream-source builds the TF v2 family from an asc-2022 checkout (that branch is "
                            "DeePMD-kit v2 code); give an asc-* variant")
        from harness.prepare import tf_era

        tf_era.check_checkout(Path(req.upstream_source), tf_era.load_pin())  # before anything is said or built
    systems.ensure_data(system, log)
    system = workload.derive(system, req.replicate, req.batch_size, log=log)
    frames = systems.validate_system(system)
    log(f"system {system.name}: {frames['train']} training / {frames['validation']} validation frames, "
        f"{system.atoms_per_frame} atoms, types {list(system.type_map)}")
    built = []
    for v in req.variants:
        b = build.build_variant(v, pin, tf_source=req.upstream_source)
        if b.unavailable:
            log(f"variant {v}: unavailable here: {b.unavailable}")
        else:
            log(f"variant {v}: {'cached build' if b.cached else 'built'} {b.tree.parent.name}"
                + (f" ({b.runtime})" if b.runtime else ""))
        built.append(b)
    if max(req.gpus) > 1 and any(b.backend == "tf-v2" and not b.unavailable for b in built):
        from harness.prepare import tf_era

        hv = tf_era.build_horovod(tf_era.build_env(source=tf_era.resolve_source(req.upstream_source)))  # cannot be built -> UserError, nothing written
        log(f"horovod: {'cached' if hv.cached else 'built'} ({hv.check_build})")
    # upstream's own schema judges the input each variant will train with (cheap, before any run);
    # the TF v2 family's dp checks its own (older) schema when it starts
    for b in built:
        if b.backend == "tf-v2":
            continue
        inp = train.make_input(system, b.overrides, req.steps, req.seed, b.upstream_options)
        input_check.check_input(inp, built[0].tree, f"{system.directory / 'input.json'} (variant {b.name})")
    return Prepared(system, built, device, pin)


# What one accuracy gate is assumed to take when no record of this variant says (GPU lanes:
# 20-70 s, fused's with its compile)
GATE_GUESS_S = 60.0


@dataclass
class TimeBudget:
    """Plans a sweep into a fixed time: before each run, the run plus the gates still owed must
    fit in what is left; a run that does not fit is not started (a later, shorter one may be), so
    a time limit leaves judged runs rather than timed-but-unjudged ones. Guesses come from the
    variant's recent records on this device (its longest run, its longest gate); a variant never
    run there is guessed as this sweep's longest run and GATE_GUESS_S per gate. Gates owed:
    baselines one by one, the rest gate_jobs at a time (longest first, each wave as long as its
    longest gate), or only the next run's own gate when gates follow each run."""
    end: float  # time.monotonic() deadline
    gate_jobs: int

    def owed_gates_s(self, base_gates: list[float], rest_gates: list[float]) -> float:
        waves = sorted(rest_gates, reverse=True)[::self.gate_jobs]  # each wave's longest gate
        return sum(base_gates) + sum(waves)

    def room_for(self, run_guess_s: float, base_gates: list[float], rest_gates: list[float],
                 ) -> tuple[bool, float, float]:
        """(fits, seconds needed, seconds left) for one more run, counting the gates owed after it
        (base_gates / rest_gates: guesses for the gates of baselines / other runs still to
        judge, the next run's included)."""
        need = run_guess_s + self.owed_gates_s(base_gates, rest_gates)
        left = self.end - time.monotonic()
        return need <= left, need, left


def _judge(stage: Callable[..., AccuracyResult], rec: RunRecord, previous: list[RunRecord]) -> AccuracyResult:
    """One accuracy gate, timed: its wall time goes into the record for later sweeps' budgets."""
    t0 = time.perf_counter()
    res = stage(rec, previous)
    res.wall_s = round(time.perf_counter() - t0, 1)
    return res


def run(req: BenchRequest, log: Callable[[str], None] = print,
        accuracy_stage: Callable[..., AccuracyResult] | None = None) -> list[StoredRun]:
    """The sweep's runs as their records read back (StoredRun.path: the record's file), in
    training order."""
    if req.gate_jobs < 1:
        raise UserError(f"--gate-jobs must be at least 1, not {req.gate_jobs}")
    if req.time_budget_s is not None and not req.time_budget_s > 0:
        raise UserError(f"--time-budget must be a positive number of seconds, not {req.time_budget_s}")
    t_start = time.monotonic()
    prep = prepare(req, log)
    sweep = req.sweep_id or results.new_sweep_id()
    env = environment.capture()
    deferred = req.gate_jobs > 1 and accuracy_stage is not None and req.accuracy
    records: list[RunRecord] = []  # gated (or final) records, in the order they were written
    trained: list[RunRecord] = []  # every run, in training order (the table's order)
    paths: dict[str, Path] = {}

    def finish(rec: RunRecord) -> None:
        paths[rec.run.run_id] = results.write_run(rec, req.runs_dir)
        records.append(rec)

    budget = None
    if req.time_budget_s is not None:
        budget = TimeBudget(end=t_start + req.time_budget_s, gate_jobs=req.gate_jobs)
    try:
        _train_and_judge(req, prep, sweep, env, deferred, records, trained, finish, accuracy_stage, log, budget)
        if req.ncu_kernels > 0:
            for rec in trained:
                measure_ncu(rec, req.ncu_kernels, req.ncu_timeout_s, log)
    except KeyboardInterrupt:
        # SIGINT, or SIGTERM from a time limit (cli turns it into this): what was timed is kept,
        # said to be unjudged; a gate's result that arrives now would be a killed judge's "fail"
        stop = getattr(accuracy_stage, "stop", None)
        if stop is not None:
            stop()
        for rec in trained:
            if rec.run.run_id not in paths:
                if rec.train.status == "ok":
                    rec.accuracy = AccuracyResult(detail=STOPPED_DETAIL)
                finish(rec)
        log(f"stopped: {len(trained)} run(s) kept in {req.runs_dir}, "
            f"{sum(1 for r in trained if r.accuracy is not None and r.accuracy.detail == STOPPED_DETAIL)} unjudged")
        raise
    return _add_anchors(trained, req.runs_dir)


def measure_ncu(rec: RunRecord, k: int, timeout_s: float, log: Callable[[str], None]) -> None:
    """The Nsight Compute figures of a profiled run's top-k kernels (profile --ncu K): a short run
    of the same variant planned by nsight.ncu_plan (ncu before the training child, through the
    RunSpec's launch_prefix), limited to timeout_s; what it measured (a timeout or failure with
    its reason) goes into rec.ncu, which the record writer puts in the record."""
    from harness.analyse import nsight

    name = rec.run.variant.name
    plan = nsight.ncu_plan(Profile.from_dict(rec.profile) if isinstance(rec.profile, dict) else None, k)
    if rec.train.status != "ok" or plan is None:
        log(f"[{name}] no GPU kernels to measure with ncu")
        return
    spec = dataclasses.replace(rec.run, run_id=f"{rec.run.run_id}-ncu", work_dir=rec.run.work_dir / "ncu",
                               steps=plan.steps, profile=False, gpus=1, launch_prefix=plan.prefix,
                               launch_env=plan.env, timeout_s=timeout_s)
    log(f"[{name}] ncu over {len(plan.kernels)} kernels (limit {timeout_s:.0f} s): {' '.join(plan.prefix[:14])} ...")
    tr = train.run_training(spec)
    rec.ncu = nsight.ncu_result(tr, rec.run.work_dir, rec.environment.get("gpu_name"), timeout_s)
    log(f"[{name}] ncu: {len(rec.ncu.kernels)} kernels measured in {rec.ncu.wall_s:.0f} s"
        + (f" ({rec.ncu.error})" if rec.ncu.error else ""))


def _add_anchors(trained: list[RunRecord], runs_dir: Path) -> list[StoredRun]:
    """Once every run of the sweep is written: the two denominators (anchors.py: fastest legal
    upstream setting, fastest upstream-code-only run, gated when the sweep was judged) and this
    run's speed-up over each, added to every record (rewritten atomically by the record writer).
    A sweep stopped early has none in its records; the table and the report compute them from
    the runs. Returns the records as written."""
    stored = [results.stored(rec) for rec in trained]
    summ = anchors.summary(stored)
    out = []
    for rec, s in zip(trained, stored):
        rec.anchors, rec.speedup_vs = summ, anchors.speedups(s, summ)
        out.append(results.stored(rec, results.write_run(rec, runs_dir)))
    return out


STOPPED_DETAIL = "not judged: the sweep was stopped (SIGINT/SIGTERM) before this run's gate finished"


def _train_and_judge(req: BenchRequest, prep: Prepared, sweep: str, env, deferred: bool,
                     records: list[RunRecord], trained: list[RunRecord], finish: Callable[[RunRecord], None],
                     accuracy_stage: Callable[..., AccuracyResult] | None, log: Callable[[str], None],
                     budget: TimeBudget | None = None) -> None:
    plan = [(b, n) for b in prep.built for n in distributed.plan_counts(req.launcher, b.name, req.gpus)]
    judged = accuracy_stage is not None and req.accuracy
    # each variant's longest recent run and gate here (the store is read once); 0: no record
    past: dict[str, float] = {}
    past_gate: dict[str, float] = {}
    if budget is not None:
        history = results.load_runs(req.runs_dir)
        for b in prep.built:
            past[b.name] = results.recent_wall_s(history, prep.system.name, b.name, prep.device) or 0.0
            past_gate[b.name] = (results.recent_wall_s(history, prep.system.name, b.name, prep.device,
                                                       of="accuracy") or GATE_GUESS_S) if judged else 0.0
    not_started: list[str] = []
    # one plain line per finished run, with the sweep's ETA (also in logs: tty=False)
    sweep_progress = Progress(len(plan), f"sweep {sweep}", unit="runs", stream=sys.stdout, tty=False, every=1e-9,
                              rate_from_start=True)
    for b, ngpu in plan:
        if budget is not None and trained:
            # gates still owed once this run is timed: deferred, every timed run's; else its own
            owed = [r.run.variant.name for r in trained if r.train.status == "ok"] if deferred else []
            owed.append(b.name)
            base_gates = [past_gate[n] for n in owed if n == "baseline"]
            rest_gates = [past_gate[n] for n in owed if n != "baseline"]
            # the variant's own recent runs know best (a 200 s fused compile says nothing about
            # tos); a variant never run here is guessed as this sweep's longest run
            guess = past[b.name] or max(r.train.wall_s or 0.0 for r in trained)
            fits, need, left = budget.room_for(guess, base_gates, rest_gates)
            if not fits:
                not_started.append(f"{b.name}{f' x{ngpu}' if ngpu > 1 else ''}")
                log(f"time budget: not starting {not_started[-1]} (it and the gates owed need ~{need:.0f} s, "
                    f"{max(left, 0):.0f} s left)")
                sweep_progress.total -= 1
                continue
        extra = "-".join(x for x in (f"g{ngpu}" if ngpu > 1 else "", f"s{req.seed}" if req.seed_in_id else "") if x)
        rid = results.run_id(sweep, prep.system.name, b.name, extra)
        spec = RunSpec(run_id=rid, sweep_id=sweep, system=prep.system, variant=b, steps=req.steps,
                       device=prep.device, seed=req.seed, work_dir=req.work_root / rid, profile=req.profile,
                       gpus=ngpu, launch_prefix=tuple(req.launch_prefix))
        log(f"[{b.name}] training {req.steps} steps on {prep.device}"
            f"{f' x{ngpu}' if ngpu > 1 else ''} ({prep.system.name})")
        with Progress(req.steps, b.name) as bar:
            tr = train.run_training(spec, progress=lambda done, total: bar.update_to(done))
        tm = timing.steady_state(tr.step_s, tr.clock, tr.startup_s, tr.wall_s, tr.upstream_avg_step_s)
        # a family with an environment of its own (TF v2) says what ran: deepmd, TensorFlow, Python
        rec = RunRecord(run=spec, train=tr, timing=tm,
                        environment={**env, "family_runtime": b.runtime} if b.runtime else env)
        if req.profile and tr.status == "ok":
            from harness.analyse import profile

            rec.profile = profile.summarise(tr.work_dir)
        trained.append(rec)
        # wall time per phase: what a budgeted GPU call has to plan with (start-up incl. compile)
        log(f"[{b.name}] {tr.status} in {tr.wall_s:.0f} s (start-up {tr.startup_s or 0:.0f} s)")
        if tr.status != "ok":
            log(f"[{b.name}] {tr.status.upper()}: {tr.error}")
        if tr.status == "ok" and accuracy_stage is not None and req.accuracy and not deferred:
            rec.accuracy = _judge(accuracy_stage, rec, records)
        if not deferred or tr.status != "ok":
            finish(rec)
        sweep_progress.update_to(sweep_progress.n + 1)
        if tr.status == "interrupted":
            break
    if not_started:
        log(f"time budget: not started: {', '.join(not_started)}")
    if deferred:
        _deferred_gates(trained, records, finish, accuracy_stage, req.gate_jobs,
                        interrupted=any(r.train.status == "interrupted" for r in trained), log=log)


def _deferred_gates(trained: list[RunRecord], records: list[RunRecord], finish: Callable[[RunRecord], None],
                    accuracy_stage: Callable[..., AccuracyResult], jobs: int, *, interrupted: bool,
                    log: Callable[[str], None]) -> None:
    """The accuracy gates of a sweep whose runs are all timed: baselines first (every variant's
    parity reference and dp-test comparison comes from them), then the rest `jobs` at a time.
    Each record is written as soon as its gate has judged it."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    todo = [r for r in trained if r.train.status == "ok"]
    if interrupted:  # a stopped sweep keeps what it trained, said to be unjudged
        for rec in todo:
            rec.accuracy = AccuracyResult(detail="not judged: the sweep was interrupted before its gates ran")
            finish(rec)
        return
    bases = [r for r in todo if r.run.variant.name == "baseline"]
    rest = [r for r in todo if r.run.variant.name != "baseline"]
    for rec in bases:
        log(f"[{rec.run.variant.name}] accuracy gate")
        t0 = time.perf_counter()
        rec.accuracy = _judge(accuracy_stage, rec, list(records))
        log(f"[{rec.run.variant.name}] gate done in {time.perf_counter() - t0:.0f} s")
        finish(rec)
    if not rest:
        return
    log(f"accuracy gates of {len(rest)} runs, {jobs} at a time")
    judged_against = list(records)
    pool = ThreadPoolExecutor(max_workers=jobs)
    t0 = time.perf_counter()
    progress = Progress(len(rest), "gates", unit="gates", stream=sys.stdout, tty=False, every=1e-9,
                        rate_from_start=True)
    try:
        futs = {pool.submit(_judge, accuracy_stage, rec, judged_against): rec for rec in rest}
        for f in as_completed(futs):
            rec = futs[f]
            rec.accuracy = f.result()  # accuracy_stage never raises: a crash is a fail verdict
            log(f"[{rec.run.variant.name}] gate: {(rec.accuracy.verdict or 'not judged').upper()} "
                f"(+{time.perf_counter() - t0:.0f} s)")
            finish(rec)
            progress.update_to(progress.n + 1)
    finally:
        # on a stop, don't wait for gates in flight (bench.run kills their subprocesses)
        pool.shutdown(wait=False, cancel_futures=True)


def format_table(rows: list[StoredRun]) -> str:
    """s/step per run, the ratio to the sweep's first variant at the same GPU count (same sweep,
    same card), the ratios to the two anchors (anchors.py: `vs legal`, the fastest legal upstream
    setting; `vs native`, the fastest run of upstream's code alone, its own accelerations
    included; each gated when the sweep was judged, named below the table), and scaling
    efficiency: samples/s at N / (N x samples/s at 1), same variant."""
    head = (f"{'system':8} {'variant':12} {'gpus':>4} {'status':11} {'ms/step':>9} {'IQR ms':>8} {'speedup':>8} "
            f"{'vs legal':>8} {'vs native':>9} {'samples/s':>9} {'scaling':>7} {'peak MiB':>9} {'accuracy':>8}")
    lines = [head, "-" * len(head)]
    summ = anchors.summary(rows)

    def gpus(r: StoredRun) -> int:
        return 1 if r.world_size is None else r.world_size

    def ok_med(r: StoredRun) -> float | None:
        return r.timing.step_s_median if r.status == "ok" else None

    def sps(r: StoredRun) -> float | None:
        return r.throughput.samples_per_s if r.status == "ok" else None

    first_variant = rows[0].variant if rows else None
    base = {gpus(r): ok_med(r) for r in rows if r.variant == first_variant}
    one = {(r.system, r.variant): sps(r) for r in rows if gpus(r) == 1}
    for r in rows:
        t = r.timing
        n = gpus(r)
        med = t.step_s_median if r.status == "ok" else None  # a failed run has no speed
        b = base.get(n)
        ms = f"{med * 1e3:9.2f}" if med else f"{'-':>9}"
        iqr = f"{t.step_s_iqr * 1e3:8.2f}" if t.step_s_iqr is not None else f"{'-':>8}"
        sp = f"{b / med:7.2f}x" if b and med else f"{'-':>8}"
        s = sps(r)
        s_s = f"{s:9.2f}" if s else f"{'-':>9}"
        eff = distributed.scaling_efficiency(s, n, one.get((r.system, r.variant)))
        eff_s = f"{eff * 100:6.0f}%" if eff else f"{'-':>7}"
        mem = r.memory.gpu_peak_bytes
        mem_s = f"{mem / 2**20:9.1f}" if mem else f"{'-':>9}"
        verdict = r.accuracy.verdict or "-"
        vs = anchors.speedups(r, summ) if n == 1 else None
        vs_s = " ".join(f"{x:{w - 1}.2f}x" if (x := vs and vs.of(f)) else f"{'-':>{w}}"
                        for f, w in (("legal", 8), ("native", 9)))
        lines.append(f"{r.system:8} {r.variant:12} {n:>4} {r.status:11} {ms} {iqr} {sp} {vs_s} {s_s} {eff_s} "
                     f"{mem_s} {verdict.upper():>8}")
    for r in rows:  # a fallback the manifest allowed: timed, shown, never the variant's speed
        if r.engine is not None and r.engine.fallback:
            med = r.timing.step_s_median
            lines.append(f"{r.variant}: fallback: {r.engine.fallback} ({r.engine.fallback_reason}); its "
                         + (f"{med * 1e3:.2f} ms/step " if med else "time ") + "is not counted as the variant's speed")
    for fam, label in (("legal", "vs legal: fastest legal upstream setting (baseline/fp32/tos/fp32-tos)"),
                       ("native", "vs native: fastest upstream-code-only run (its own accelerations, "
                                  "outside the three-parameter rule, included)")):
        a = summ.of(fam)
        lines.append(f"{label}: " + (f"{a.variant} {a.step_s_median * 1e3:.2f} ms"
                                      + ("" if a.gated else " (sweep not gated)") if a else "none in this sweep"))
    return "\n".join(lines)
