"""`dpharness trajectory`: does a fast engine train upstream's model step for step? Upstream
(the baseline build) trains twice with one seed -- its own run-to-run floor: bitwise on one CPU
thread, atomics on a GPU -- and each variant once, on upstream's own sampler order
(DPH_FOLLOW_UPSTREAM_ORDER for dpfast engines; upstream's loop draws it anyway), from the same
seed, so the same initial weights. Every training's full-precision curve (lcurve_full.jsonl) and
final weights are compared with the first upstream run's (harness/judge/trajectory.py); one
TrajectoryRecord is written atomically under results/trajectory/. Trainings run one after
another (run-to-run floors are measured alone), through the same stages as bench."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.core import environment, envvars
from harness.core.errors import UserError
from harness.core.records import RunSpec
from harness.core.trajectory_records import SCHEMA, TrajectoryComparison, TrajectoryRecord, TrajectoryRun
from harness.judge import trajectory as judge
from harness.results import runs as results
from harness.results import trajectory as store
from harness.run import bench, convergence, timing, train

TRAJECTORY = store.TRAJECTORY


@dataclass
class TrajectoryRequest:
    system: str
    variants: list[str]
    steps: int | str
    device: str = "auto"
    seed: int = 10
    out_dir: Path = TRAJECTORY
    work_root: Path = results.WORK
    extra_env: dict[str, str] = field(default_factory=dict)  # every child's (tests: a thread count)


def _checkpoint_weights(path: Path | None) -> dict[str, Any] | None:
    """The floating-point parameters of an upstream PyTorch checkpoint (its "model" state dict)."""
    if path is None or not Path(path).is_file():
        return None
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else {}
    return {k: v.detach().double().numpy() for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def _rows(work_dir: Path) -> list[dict[str, Any]]:
    p = Path(work_dir) / "lcurve_full.jsonl"
    return judge.iter_rows(p.read_text().splitlines()) if p.is_file() else []


def _train(role: str, name: str, built, system, req: TrajectoryRequest, device: str, sweep: str,
           log: Callable[[str], None]) -> tuple[TrajectoryRun, Path | None]:
    b = built[name]
    follow = {envvars.DPH_FOLLOW_UPSTREAM_ORDER: "1"} if b.engine == "dpfast" else {}
    rid = results.run_id(sweep, system.name, "baseline-again" if role == "upstream-again" else name, f"s{req.seed}")
    # on one CPU thread upstream reproduces its own curve to the bit: the floor is then exactly 0
    one_thread = {"OMP_NUM_THREADS": "1"} if device == "cpu" else {}
    spec = RunSpec(run_id=rid, sweep_id=sweep, system=system, variant=b, steps=int(req.steps), device=device,
                   seed=req.seed, work_dir=req.work_root / rid, launch_env={**one_thread, **req.extra_env, **follow})
    log(f"[{role} {name}] training {req.steps} steps on {device}" + (" on upstream's order" if follow else ""))
    tr = train.run_training(spec)
    tm = timing.steady_state(tr.step_s, tr.clock, tr.startup_s, tr.wall_s, tr.upstream_avg_step_s)
    run = TrajectoryRun(role=role, variant=name, status=tr.status, error=tr.error, engine=tr.engine,
                        order=(tr.engine or {}).get("order", "upstream"), wall_s=round(tr.wall_s, 2),
                        step_ms_median=None if tm.step_s_median is None else tm.step_s_median * 1e3,
                        work_dir=str(tr.work_dir), rows=_rows(tr.work_dir))
    if run.status == "ok" and run.order != "upstream":  # the record must not call its own draw upstream's
        run.status, run.error = "failed", f"the engine trained on its {run.order} order, not upstream's"
    if run.status == "ok" and not run.rows:
        run.status, run.error = "failed", "no lcurve_full.jsonl (a PyTorch training child writes one)"
    log(f"[{role} {name}] {run.status} in {tr.wall_s:.0f} s" + (f": {run.error}" if run.error else ""))
    return run, tr.checkpoint if run.status == "ok" else None


def compare(ref: TrajectoryRun, other: TrajectoryRun, ref_w: dict | None, other_w: dict | None,
            floor: judge.Divergence | None, steps: int) -> tuple[TrajectoryComparison, judge.Divergence]:
    d = judge.divergence(ref.rows, other.rows)
    c = TrajectoryComparison(run=other.role if other.role != "variant" else other.variant, **{
        k: v for k, v in d.to_dict().items()})
    if ref_w is not None and other_w is not None:
        w, where = judge.weights_divergence(ref_w, other_w)
        c.weights_max_rel, c.weights_worst = (w if math.isfinite(w) else None), where
    if floor is not None:
        c.follows = judge.follows(d, floor, steps) and other.status == "ok"
    return c, d


def run(req: TrajectoryRequest, log: Callable[[str], None] = print) -> TrajectoryRecord:
    if not req.variants:
        raise UserError("give a variant to follow upstream's trajectory, e.g. --variant fused")
    if "baseline" in req.variants:
        raise UserError("--variant baseline: upstream is the reference and trains twice anyway")
    if len(set(req.variants)) != len(req.variants):
        raise UserError("each --variant may be given once")
    names = ["baseline", *req.variants]
    breq = bench.BenchRequest(system=req.system, variants=names, steps=req.steps, device=req.device, seed=req.seed)
    prep = bench.prepare(breq, log)  # bad input -> UserError here, before anything is written
    req.steps = int(breq.steps)
    built = {b.name: b for b in prep.built}
    for v in req.variants:
        if built[v].backend != "pt":
            raise UserError(f"--variant {v}: a trajectory compares PyTorch trainings (their full-precision "
                            f"lcurve); {v} trains with the {built[v].backend} backend")
    system = convergence.scaled_input(prep.system, req.steps)
    sweep = results.new_sweep_id()
    env = environment.capture()
    card = env.get("gpu_name") if prep.device == "cuda" else "cpu"
    log(f"trajectory {sweep}: upstream twice and {', '.join(req.variants)} on upstream's order, seed {req.seed}, "
        f"{req.steps} steps, a row every {system.input['training']['disp_freq']}")
    plan = [("upstream", "baseline"), ("upstream-again", "baseline")] + [("variant", v) for v in req.variants]
    runs, weights = [], []
    for role, name in plan:
        r, ckpt = _train(role, name, built, system, req, prep.device, sweep, log)
        runs.append(r)
        weights.append(_checkpoint_weights(ckpt))
    ref, comparisons = runs[0], []
    floor = None
    if ref.status == "ok":
        c, floor = compare(ref, runs[1], weights[0], weights[1], None, req.steps) if runs[1].status == "ok" else (None, None)
        if c is not None:
            comparisons.append(c)
        for r, w in zip(runs[2:], weights[2:]):
            if r.status == "ok" and floor is not None:
                comparisons.append(compare(ref, r, weights[0], w, floor, req.steps)[0])
            else:
                comparisons.append(TrajectoryComparison(run=r.variant, follows=False,
                                                        problems=[f"not compared: {r.error or r.status}"]))
    if floor is None:
        verdict = "incomplete"  # no floor: upstream itself did not train twice
    else:
        verdict = "pass" if all(c.follows for c in comparisons[1:]) else "fail"
    rec = TrajectoryRecord(
        schema=SCHEMA, sweep_id=sweep, system=system.name, steps=req.steps, seed=req.seed, device=prep.device,
        card=card, disp_freq=int(system.input["training"]["disp_freq"]),
        learning_rate=system.input["learning_rate"], input_sha256=convergence.training_identity(system),
        builds={n: built[n].hash for n in names}, horizon_rtol=judge.HORIZON_RTOL, verdict=verdict, runs=runs,
        comparisons=comparisons, environment=env, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    store.write(rec, req.out_dir)
    return rec
