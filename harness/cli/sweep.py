"""Sweeps beyond one node: the (system x variant x gpus) grid as independent jobs through submitit.

    dpharness sweep --systems water,copper --variants tos,fp32 --gpus 1,2 --steps 300 \\
        --executor local|slurm [--slurm-partition P --slurm-time MIN --slurm-gpus-per-node G]

* Each **cell** (one system, one variant, one GPU count) is one job that calls the bench pipeline
  (``bench.run``) for that cell alone and writes its own results JSON into
  ``<results-dir>/runs/``. All cells of a sweep share one ``sweep_id`` (kept across resumes) and
  each system's ``baseline`` is a cell too, so speed-ups stay same-sweep ratios.
* **Resumable.** A cell is identified by a content hash of (system directory content, variant
  build hash, steps, gpus, seed, device). ``<results-dir>/sweeps/<name>.json`` records every
  cell's state (pending, submitted, running, ok, failed, interrupted, unavailable). Re-running
  the same sweep skips cells that are ``ok`` (and whose record exists) and redoes the rest.
  The default name is a hash of the command's grid, so re-running the same command resumes.
* **Concurrency.** Every read-modify-write of a state file holds an ``fcntl.flock`` on
  ``<name>.json.lock`` and the file is replaced atomically (temp, fsync, rename): two sweeps (or
  the jobs of one) updating the same results directory never lose each other's updates. Cell
  identity and the state file live in ``harness/run/sweep_state.py``; this module plans the
  grid, submits the cells and is the command.
* **Executors.** ``local``: submitit's LocalExecutor, one cell at a time (cells on one machine
  must not share it while being timed). ``slurm``: submitit's SlurmExecutor, every cell its own
  job on one node (``--gpus-per-node`` = the cell's GPU count), all submitted at once.
  ``debug``: submitit's DebugExecutor (in-process; for tests).
* Afterwards the cells' records are ingested into the results store (``harness/results/store.py``) when
  that module is present.

The accuracy gate is not run per cell (it needs the sweep's baseline checkpoint in the same
process); run ``dpharness bench`` for gated results.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from harness.run import distributed
from harness.run.sweep_state import (STATE_SCHEMA, Cell, cell_key, needs_run, read_state, state_path,
                                     system_content_hash, update_cell, update_state)
from harness.run.sweep_state import now as _now, this_owner as _owner
from harness.results import runs as results
from harness.core.errors import HarnessError, UserError


# ---------------------------------------------------------------- the job (runs on the worker)

def run_cell(cell: dict[str, Any], state_file: str, results_dir: str) -> dict[str, Any]:
    """One cell: the bench pipeline for one system, one variant, one GPU count. Records its own
    state; returns a small summary (never raises for a failed run; re-raises an interrupt)."""
    from harness.run import bench

    c = Cell(**cell)
    rdir = Path(results_dir)
    job_id = _job_id()
    update_cell(Path(state_file), c.key, status="running", owner=_owner(), job_id=job_id, started=_now())
    try:
        req = bench.BenchRequest(system=c.system, variants=[c.variant], steps=c.steps, device=c.device,
                                 seed=c.seed, sweep_id=c.sweep_id, accuracy=False, gpus=[c.gpus],
                                 runs_dir=rdir / "runs", work_root=rdir / "work")
        rows = bench.run(req, log=lambda m: print(m, flush=True))
        row = rows[0]
        out = {"status": row.status, "error": row.error, "run_id": row.run_id,
               "path": str(row.path) if row.path else None, "step_s_median": row.timing.step_s_median}
    except KeyboardInterrupt:
        update_cell(Path(state_file), c.key, status="interrupted", error="interrupted")
        raise
    except HarnessError as e:
        out = {"status": "failed", "error": str(e), "run_id": c.run_id, "path": None, "step_s_median": None}
    except Exception as e:  # a crash of the pipeline itself: the cell failed, the sweep goes on
        traceback.print_exc()
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}", "run_id": c.run_id, "path": None,
               "step_s_median": None}
    update_cell(Path(state_file), c.key, status=out["status"], error=out["error"], run_id=out["run_id"],
                step_s_median=out["step_s_median"], finished=_now())
    return out


def _job_id() -> str | None:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:
        return None


# ---------------------------------------------------------------- the sweep (runs where it is started)

@dataclass
class SweepRequest:
    systems: list[str]
    variants: list[str]
    gpus: list[int] = field(default_factory=lambda: [1])
    steps: int | str = "auto"
    device: str = "auto"
    seed: int = 10
    executor: str = "local"  # local | slurm | debug
    name: str | None = None
    results_dir: Path = results.ROOT / "results"
    baseline: bool = True
    limit: int | None = None  # run at most this many pending cells (staging a large sweep)
    timeout_min: int = 120  # per cell (local and slurm)
    slurm_partition: str | None = None
    slurm_gpus_per_node: int | None = None
    slurm_cpus_per_task: int | None = None
    slurm_account: str | None = None
    slurm_exclusive: bool = False
    ingest: bool = True


def default_name(req: SweepRequest, device: str, steps: int) -> str:
    blob = json.dumps({"systems": req.systems, "variants": req.variants, "gpus": req.gpus, "steps": steps,
                       "seed": req.seed, "device": device}, sort_keys=True)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def slurm_parameters(req: SweepRequest, gpus: int, name: str) -> dict[str, Any]:
    """SlurmExecutor.update_parameters(**this) for the cells of one GPU count: one node, one task
    (torchrun starts the ranks inside it), the cell's GPUs, multicast off."""
    setup = [f"export {k}={v}" for k, v in distributed.NO_MULTICAST_ENV.items()]
    p: dict[str, Any] = {
        "job_name": f"dph-{name}-g{gpus}",
        "time": int(req.timeout_min),
        "nodes": 1,
        "ntasks_per_node": 1,
        "gpus_per_node": int(gpus),
        "setup": setup,
        "stderr_to_stdout": True,
    }
    if req.slurm_partition:
        p["partition"] = req.slurm_partition
    if req.slurm_cpus_per_task:
        p["cpus_per_task"] = int(req.slurm_cpus_per_task)
    if req.slurm_account:
        p["account"] = req.slurm_account
    if req.slurm_exclusive:
        p["exclusive"] = True
    return p


def _executor(kind: str, folder: Path):
    try:
        import submitit
    except ImportError:
        raise UserError("dpharness sweep needs submitit: .venv/bin/pip install -r harness/pins/sweep.txt") from None
    if kind == "local":
        return submitit.LocalExecutor(folder=str(folder))
    if kind == "debug":
        return submitit.DebugExecutor(folder=str(folder))
    if kind == "slurm":
        try:
            return submitit.SlurmExecutor(folder=str(folder))
        except RuntimeError as e:  # no srun/sbatch here
            raise UserError(f"--executor slurm: {e}") from None
    raise UserError(f"--executor must be local, slurm or debug, not {kind!r}")


def plan(req: SweepRequest, log: Callable[[str], None] = print) -> tuple[str, Path, list[Cell]]:
    """Validate the request, build variants, hash systems; returns (name, state file, cells).
    Everything that can reject the sweep happens here, before anything is written."""
    from harness.run import bench
    from harness.prepare import build
    from harness.prepare import systems
    from harness.prepare import upstream
    from harness.prepare import variants as vmod

    if req.executor not in ("local", "slurm", "debug"):
        raise UserError(f"--executor must be local, slurm or debug, not {req.executor!r}")
    if not req.systems:
        raise UserError("--systems: give at least one system")
    req.gpus = distributed.parse_gpus(req.gpus)
    if req.executor == "slurm":
        device = "cuda" if req.device == "auto" else req.device  # the submitting host may have no GPU
        if device not in ("cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, not {req.device!r}")
        if device == "cpu" and max(req.gpus) > 1:
            raise UserError("--gpus N>1 needs --device cuda")
        g = req.slurm_gpus_per_node
        if g is not None and max(req.gpus) > g:
            raise UserError(f"--gpus {max(req.gpus)}: more than --slurm-gpus-per-node {g}; a cell runs on one "
                            "node (torchrun --standalone), multi-node cells are not supported")
    else:
        device = bench.resolve_device(req.device)
        distributed.check_gpus(req.gpus, device)
    steps = bench.resolve_steps(req.steps, device)
    names = list(dict.fromkeys(req.variants))
    if req.baseline and "baseline" not in names:
        names.insert(0, "baseline")  # every system's baseline is a cell of the same sweep
    if not names:
        raise UserError("--variants: give at least one variant")
    for v in names:
        vmod.chain(v)
    pin = upstream.default_pin()
    loaded = []
    for s in dict.fromkeys(req.systems):
        system = systems.load_system(s)
        systems.ensure_data(system, log)
        systems.validate_system(system)
        if any(system.name == other.name for _, other, _ in loaded):
            raise UserError(f"--systems: two systems are named {system.name!r} (run ids would collide)")
        loaded.append((s, system, system_content_hash(system.directory, [*system.train, *system.validation])))
    built = {}
    for v in names:
        b = build.build_variant(v, pin)
        log(f"variant {v}: {'cached build' if b.cached else 'built'} {b.tree.parent.name}")
        built[v] = b
    name = req.name or default_name(req, device, steps)
    spath = state_path(req.results_dir, name)
    prior = read_state(spath)
    sweep_id = prior["sweep_id"] if prior else results.new_sweep_id()
    cells = []
    for _given, system, shash in loaded:
        for v in names:
            for n in req.gpus:
                key = cell_key(shash, built[v].hash, steps, n, req.seed, device)
                rid = results.run_id(sweep_id, system.name, v, f"g{n}" if n > 1 else "")
                cells.append(Cell(key=key, system=str(system.directory),
                                  system_name=system.name, variant=v, gpus=n, steps=steps, seed=req.seed,
                                  device=device, sweep_id=sweep_id, run_id=rid))
    return name, spath, cells


def run_sweep(req: SweepRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    name, spath, cells = plan(req, log)
    runs_dir = Path(req.results_dir) / "runs"
    folder = Path(req.results_dir) / "sweeps" / f"{name}.jobs"
    ex = _executor(req.executor, folder)  # no submitit / no Slurm here -> UserError before the state is written
    todo: list[Cell] = []
    skipped: list[Cell] = []

    def register(st: dict[str, Any] | None) -> dict[str, Any]:
        st = st or {"schema": STATE_SCHEMA, "name": name, "sweep_id": cells[0].sweep_id, "created": _now(),
                    "cells": {}}
        sid = st["sweep_id"]  # a sweep of the same name that started meanwhile fixed it first
        cells[:] = [c if c.sweep_id == sid else replace(c, sweep_id=sid, run_id=sid + c.run_id[len(c.sweep_id):])
                    for c in cells]
        st["grid"] = {"systems": req.systems, "variants": sorted({c.variant for c in cells}),
                      "gpus": req.gpus, "steps": cells[0].steps, "seed": req.seed, "device": cells[0].device,
                      "executor": req.executor}
        todo.clear()
        skipped.clear()
        for c in cells:
            entry = st["cells"].get(c.key)
            if needs_run(entry, runs_dir) and (req.limit is None or len(todo) < req.limit):
                todo.append(c)
                st["cells"][c.key] = {**(entry or {}), **asdict(c), "status": "pending", "owner": _owner(),
                                      "updated": _now()}
            elif not needs_run(entry, runs_dir):
                skipped.append(c)
        return st

    st = update_state(spath, register)
    log(f"sweep {name} ({st['sweep_id']}): {len(cells)} cells, {len(skipped)} done, {len(todo)} to run "
        f"[{req.executor}]; state {spath}")
    outcomes: dict[str, dict[str, Any]] = {}
    if todo:
        args = (str(spath), str(req.results_dir))
        try:
            if req.executor == "slurm":
                outcomes = _run_slurm(ex, req, name, todo, args, spath, log)
            else:
                for c in todo:
                    if req.executor == "local":
                        ex.update_parameters(timeout_min=req.timeout_min,
                                             gpus_per_node=c.gpus if c.device == "cuda" else 0)
                    job = ex.submit(run_cell, asdict(c), *args)
                    update_cell(spath, c.key, status="submitted", job_id=str(job.job_id), owner=_owner())
                    log(f"[{c.system_name} {c.variant} g{c.gpus}] job {job.job_id}")
                    outcomes[c.key] = _wait(job, c, spath)
                    log(f"[{c.system_name} {c.variant} g{c.gpus}] {outcomes[c.key]['status']}"
                        + (f": {outcomes[c.key]['error']}" if outcomes[c.key].get("error") else ""))
        except KeyboardInterrupt:
            for c in todo:
                if c.key not in outcomes:
                    update_cell(spath, c.key, status="interrupted", error="sweep interrupted")
            raise
    final = read_state(spath) or {"cells": {}}
    paths = [runs_dir / f"{c.run_id}.json" for c in cells
             if final["cells"].get(c.key, {}).get("status") == "ok" and (runs_dir / f"{c.run_id}.json").is_file()]
    ingest_note = _ingest(paths, Path(req.results_dir)) if req.ingest and paths else "nothing to ingest"
    log(f"store: {ingest_note}")
    rows = [results.read_run(p) for p in paths]
    statuses = {c.key: final["cells"].get(c.key, {}).get("status") for c in cells}
    return {"name": name, "sweep_id": cells[0].sweep_id, "state": str(spath), "cells": [asdict(c) for c in cells],
            "ran": [c.key for c in todo], "skipped": [c.key for c in skipped], "statuses": statuses,
            "rows": rows, "ingest": ingest_note}


def _wait(job, c: Cell, spath: Path) -> dict[str, Any]:
    try:
        return job.result()
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            job.cancel()
        raise
    except Exception as e:  # the job died (killed, timed out, could not unpickle): record why
        msg = str(e).strip().splitlines()
        err = f"job {getattr(job, 'job_id', '?')} failed: {msg[-1] if msg else type(e).__name__}"
        update_cell(spath, c.key, status="failed", error=err[-300:])
        return {"status": "failed", "error": err, "run_id": c.run_id}


def _run_slurm(ex, req: SweepRequest, name: str, todo: list[Cell], args: tuple, spath: Path,
               log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    jobs = []
    for n in sorted({c.gpus for c in todo}):
        group = [c for c in todo if c.gpus == n]
        ex.update_parameters(**slurm_parameters(req, n, name))
        with ex.batch():
            submitted = [ex.submit(run_cell, asdict(c), *args) for c in group]
        for c, job in zip(group, submitted):
            update_cell(spath, c.key, status="submitted", job_id=str(job.job_id), owner=_owner())
            log(f"[{c.system_name} {c.variant} g{c.gpus}] slurm job {job.job_id}")
            jobs.append((c, job))
    out = {}
    for c, job in jobs:
        out[c.key] = _wait(job, c, spath)
        log(f"[{c.system_name} {c.variant} g{c.gpus}] {out[c.key]['status']}")
    return out


def _ingest(paths: list[Path], results_dir: Path) -> str:
    try:
        from harness.results import store
    except ImportError:
        return "harness/results/store.py not present: records not ingested (run `dpharness ingest` later)"
    if not hasattr(store, "ingest"):
        return "harness.results.store has no ingest(): records not ingested"
    db = results_dir / "results.sqlite"
    try:
        c = store.ingest(paths, db=db)
    except Exception as e:  # the JSONs are the source of truth; the database can be rebuilt
        return f"ingest into {db} failed ({type(e).__name__}: {e}); the results JSONs are intact"
    return f"{db}: " + ", ".join(f"{v} {k}" for k, v in c.items())


# ---------------------------------------------------------------- CLI

def _sweep_cmd(a: argparse.Namespace) -> int:
    from harness.run import bench

    req = SweepRequest(
        systems=[s for s in a.systems.split(",") if s], variants=[v for v in (a.variants or "").split(",") if v],
        gpus=distributed.parse_gpus(a.gpus), steps=a.steps, device=a.device, seed=a.seed, executor=a.executor,
        name=a.name, results_dir=Path(a.results_dir), baseline=not a.no_baseline, limit=a.limit,
        timeout_min=a.slurm_time, slurm_partition=a.slurm_partition, slurm_gpus_per_node=a.slurm_gpus_per_node,
        slurm_cpus_per_task=a.slurm_cpus_per_task, slurm_account=a.slurm_account,
        slurm_exclusive=a.slurm_exclusive, ingest=not a.no_ingest,
    )
    out = run_sweep(req, log=lambda m: print(m, file=sys.stderr))
    order = {(c["system_name"], c["variant"], c["gpus"]): i for i, c in enumerate(out["cells"])}
    rows = sorted(out["rows"], key=lambda r: order.get((r.system, r.variant, r.world_size or 1), 0))
    for system in dict.fromkeys(r.system for r in rows):
        print(bench.format_table([r for r in rows if r.system == system]))
    bad = {k: s for k, s in out["statuses"].items() if s in ("failed", "interrupted")}
    left = [k for k, s in out["statuses"].items() if s in (None, "pending")]
    print(f"sweep {out['name']} ({out['sweep_id']}): {len(out['ran'])} ran, {len(out['skipped'])} already done, "
          f"{len(bad)} failed/interrupted, {len(left)} left for a later run; state {out['state']}", file=sys.stderr)
    return 3 if bad else 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="the system x variant x gpus grid as resumable jobs (local or Slurm)")
    p.add_argument("--systems", required=True, help="comma list of systems (names or paths)")
    p.add_argument("--variants", default="", help="comma list of variants (baseline is added first)")
    p.add_argument("--gpus", default="1", help="comma list of GPU counts per cell (e.g. 1,2,4)")
    p.add_argument("--steps", default="auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (slurm: auto means cuda)")
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--executor", default="local", choices=("local", "slurm", "debug"))
    p.add_argument("--name", default=None, help="sweep name (state file results/sweeps/<name>.json); "
                   "default: a hash of the grid, so the same command resumes")
    p.add_argument("--no-baseline", action="store_true", help="do not add baseline cells")
    p.add_argument("--limit", type=int, default=None, help="run at most this many pending cells now")
    p.add_argument("--results-dir", default=str(results.ROOT / "results"))
    p.add_argument("--no-ingest", action="store_true", help="do not ingest into the results store afterwards")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", type=int, default=120, help="minutes per cell (also the local timeout)")
    p.add_argument("--slurm-gpus-per-node", type=int, default=None, help="GPUs a node has (cells above are refused)")
    p.add_argument("--slurm-cpus-per-task", type=int, default=None)
    p.add_argument("--slurm-account", default=None)
    p.add_argument("--slurm-exclusive", action="store_true", help="whole nodes per cell (quiet timing)")
    p.set_defaults(func=_sweep_cmd)
