"""`dpharness sweep` (harness/cli/sweep.py): cell identity, the locked state file, resume, Slurm
submission parameters, and a real two-cell sweep through submitit's LocalExecutor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.run import bench
from harness.cli import main as cli
from harness.results import runs as results
from harness.cli import sweep
from harness.core.errors import UserError
from harness.core.records import StoredRun

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- identity

def test_cell_key_depends_on_every_component():
    base = dict(system_hash="s", variant_hash="v", steps=10, gpus=1, seed=1, device="cpu")
    k = sweep.cell_key(**base)
    assert k == sweep.cell_key(**base)
    for field, other in [("system_hash", "s2"), ("variant_hash", "v2"), ("steps", 11), ("gpus", 2), ("seed", 2),
                         ("device", "cuda")]:
        assert sweep.cell_key(**{**base, field: other}) != k, field


def test_system_content_hash_sees_one_changed_number(tiny_system, tmp_path):
    copy = tmp_path / "sys"
    shutil.copytree(tiny_system, copy)
    h0 = sweep.system_content_hash(copy)
    assert h0 == sweep.system_content_hash(copy)
    f = copy / "data" / "train_0" / "set.000" / "energy.npy"
    e = np.load(f)
    e.flat[0] = np.nextafter(e.flat[0], np.inf)  # the smallest possible change
    np.save(f, e)
    assert sweep.system_content_hash(copy) != h0


# ---------------------------------------------------------------- state file

WRITER = """
import sys
from pathlib import Path
from harness.cli import sweep
path, who, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    sweep.update_cell(path, f"{who}-{i}", status="ok", n=i)
"""


def test_state_file_lock_keeps_every_concurrent_update(tmp_path):
    path = tmp_path / "sweeps" / "s.json"
    sweep.update_state(path, lambda st: {"schema": sweep.STATE_SCHEMA, "name": "s", "sweep_id": "x", "cells": {}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{j}", "40"], env=env) for j in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    st = sweep.read_state(path)
    assert len(st["cells"]) == 160  # a lost read-modify-write would drop some
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]


def test_needs_run(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "R1.json").write_text("{}")
    assert sweep.needs_run(None, runs)
    assert not sweep.needs_run({"status": "ok", "run_id": "R1"}, runs)
    assert sweep.needs_run({"status": "ok", "run_id": "R2"}, runs)  # record gone: redo
    assert sweep.needs_run({"status": "failed", "run_id": "R1"}, runs)
    assert sweep.needs_run({"status": "interrupted", "run_id": "R1"}, runs)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = sweep._owner().rpartition(":")[0]
    assert sweep.needs_run({"status": "running", "owner": f"{host}:{dead.stdout.strip()}"}, runs)  # killed job
    assert not sweep.needs_run({"status": "running", "owner": f"{host}:{os.getppid()}"}, runs)  # live, elsewhere


def test_corrupt_state_is_a_user_error(tmp_path):
    p = tmp_path / "s.json"
    p.write_text("{half")
    with pytest.raises(UserError, match="not valid JSON"):
        sweep.read_state(p)


# ---------------------------------------------------------------- Slurm submission (not submitted)

def test_slurm_parameters_and_generated_sbatch_script(tmp_path, monkeypatch):
    import submitit

    # submitit's SlurmExecutor only checks that `srun` exists; a stub lets it build the real sbatch text
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 1\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    req = sweep.SweepRequest(systems=["water"], variants=["tos"], gpus=[1, 4], executor="slurm",
                             slurm_partition="gpu-h100", timeout_min=45, slurm_gpus_per_node=4,
                             slurm_cpus_per_task=16, slurm_exclusive=True)
    p = sweep.slurm_parameters(req, 4, "demo")
    assert p["gpus_per_node"] == 4 and p["nodes"] == 1 and p["ntasks_per_node"] == 1
    assert p["partition"] == "gpu-h100" and p["time"] == 45 and p["cpus_per_task"] == 16
    ex = submitit.SlurmExecutor(folder=str(tmp_path / "jobs"))
    ex.update_parameters(**p)  # submitit validates every key against sbatch's options
    text = ex._make_submission_file_text("python -u -m submitit.core._submit /x", "uid")
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu-h100", "#SBATCH --time=45",
                 "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=16",
                 "#SBATCH --job-name=dph-demo-g4", "#SBATCH --exclusive", "export NCCL_NVLS_ENABLE=0",
                 "export TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "export NVSHMEM_DISABLE_NVLS=1"):
        assert line in text, line


def test_slurm_refuses_cells_larger_than_a_node(tmp_path):
    req = sweep.SweepRequest(systems=["water"], variants=[], gpus=[1, 8], executor="slurm",
                             slurm_gpus_per_node=4, results_dir=tmp_path)
    with pytest.raises(UserError, match="multi-node"):
        sweep.plan(req, log=lambda m: None)
    assert not any(tmp_path.iterdir())


def test_cli_sweep_bad_request_exits_2_and_writes_nothing(tiny_system, tmp_path, monkeypatch):
    out = tmp_path / "res"
    if not any((Path(d) / "srun").exists() for d in os.environ["PATH"].split(os.pathsep)):
        assert cli.main(["sweep", "--systems", str(tiny_system), "--executor", "slurm", "--steps", "3",
                         "--results-dir", str(out)]) == 2  # no Slurm on this machine
    assert cli.main(["sweep", "--systems", str(tiny_system), "--gpus", "2", "--device", "cpu",
                     "--results-dir", str(out)]) == 2
    assert cli.main(["sweep", "--systems", str(tiny_system), "--variants", "no-such-variant", "--device", "cpu",
                     "--results-dir", str(out)]) == 2
    assert not out.exists()


# ---------------------------------------------------------------- resume (in-process executor, fake runs)

def _fake_bench(calls: list, fail: set):
    def run(req, log=print, accuracy_stage=None):
        v, n = req.variants[0], req.gpus[0]
        calls.append((v, n))
        rid = results.run_id(req.sweep_id, "tinywater", v, f"g{n}" if n > 1 else "")
        d = {"schema": results.SCHEMA, "run_id": rid, "sweep_id": req.sweep_id, "system": "tinywater", "variant": v,
             "status": "failed" if v in fail else "ok", "error": "boom" if v in fail else None, "world_size": n,
             "timing": {"step_s_median": 0.1}, "memory": {}, "throughput": {"samples_per_s": 10.0 * n}}
        path = req.runs_dir / f"{rid}.json"
        results.atomic_write_json(path, d)
        return [StoredRun.from_dict(d, path)]

    return run


def test_resume_skips_done_cells_and_redoes_failed_and_killed_ones(tiny_system, tmp_path, monkeypatch):
    calls: list = []
    fail = {"fp32"}
    monkeypatch.setattr(bench, "run", _fake_bench(calls, fail))

    def go():
        calls.clear()
        req = sweep.SweepRequest(systems=[str(tiny_system)], variants=["fp32"], gpus=[1], steps=4, device="cpu",
                                 executor="debug", results_dir=tmp_path, ingest=False)
        return sweep.run_sweep(req, log=lambda m: None)

    first = go()
    assert calls == [("baseline", 1), ("fp32", 1)]
    assert sorted(first["statuses"].values()) == ["failed", "ok"]
    fail.clear()
    second = go()
    assert calls == [("fp32", 1)]  # only the failed cell
    assert second["sweep_id"] == first["sweep_id"] and second["name"] == first["name"]
    assert set(second["statuses"].values()) == {"ok"}
    assert go()["ran"] == [] and calls == []  # nothing left
    # a job killed mid-run leaves "running" with a dead owner: the next run redoes exactly that cell
    state = Path(second["state"])
    base_key = next(c["key"] for c in second["cells"] if c["variant"] == "baseline")
    sweep.update_cell(state, base_key, status="running", owner=f"{sweep._owner().rpartition(':')[0]}:999999999")
    go()
    assert calls == [("baseline", 1)]
    st = json.loads(state.read_text())
    assert st["schema"] == sweep.STATE_SCHEMA and all(c["status"] == "ok" for c in st["cells"].values())


# ---------------------------------------------------------------- real: submitit LocalExecutor, 2 cells

@pytest.mark.slow
def test_local_executor_two_cells_then_resume(tiny_system, tmp_path):
    import submitit  # noqa: F401  (harness/pins/sweep.txt)

    args = ["sweep", "--systems", str(tiny_system), "--variants", "fp32", "--steps", "3", "--device", "cpu",
            "--executor", "local", "--results-dir", str(tmp_path), "--name", "t"]
    assert cli.main([*args, "--limit", "1"]) == 0  # the first cell only (as if the sweep were stopped)
    st = json.loads((tmp_path / "sweeps" / "t.json").read_text())
    assert [c["variant"] for c in st["cells"].values() if c["status"] == "ok"] == ["baseline"]
    base_file = next((tmp_path / "runs").glob("*-baseline.json"))
    base_bytes = base_file.read_bytes()
    assert cli.main(args) == 0  # resume: only fp32 runs
    st = json.loads((tmp_path / "sweeps" / "t.json").read_text())
    assert sorted(c["status"] for c in st["cells"].values()) == ["ok", "ok"]
    assert base_file.read_bytes() == base_bytes  # the done cell was not rerun
    recs = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*.json"))]
    assert {r["variant"] for r in recs} == {"baseline", "fp32"} and len({r["sweep_id"] for r in recs}) == 1
    assert all(r["status"] == "ok" and r["world_size"] == 1 and r["timing"]["step_s_median"] for r in recs)
    jobs = list((tmp_path / "sweeps" / "t.jobs").glob("*_result.pkl"))
    assert len(jobs) == 2  # one submitit job per cell, two in total over both runs
    try:
        from harness.results import store
    except ImportError:
        return
    if hasattr(store, "load"):
        assert {r.variant for r in store.load(tmp_path / "results.sqlite")} == {"baseline", "fp32"}
