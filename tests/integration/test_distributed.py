"""Multi-GPU launch (harness/run/distributed.py and its hooks in train/launch/results/bench/cli).

Upstream's PT DDP cannot run on a CPU-only machine as shipped: deepmd 3.2.0's `dp --pt train`
calls ``init_process_group(backend="cuda:nccl,cpu:gloo")`` (no NCCL in CPU torch),
``torch.cuda.set_device(LOCAL_RANK)`` and ``DDP(device_ids=[LOCAL_RANK])``. The slow test below
therefore adds a *test-only* patch module (gloo, no set_device, DDP without device_ids) so that the
harness's own plumbing -- torchrun launch, rank-0-only steps.json, world_size and samples/s in the
record -- is exercised end to end with 2 CPU processes; upstream's training loop and DDP
all-reduce are upstream's."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.run import bench
from harness.cli import main as cli
from harness.run import distributed
from harness.core import environment
from harness.results import runs as results
from harness.prepare import systems
from harness.run import timing
from harness.run import train
from harness.core.errors import UserError
from harness.core.records import RunRecord, RunSpec, StoredRun

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- command construction

def test_launch_prefix_is_torchrun_for_more_than_one_gpu():
    assert distributed.launch_prefix(1, "py") == ["py"]
    cmd = distributed.launch_prefix(4, "py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "4"


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_distributed_env_always_disables_multicast(gpus, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite sets it under pytest-xdist
    env = distributed.distributed_env(gpus, cpu_count=16)
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    if gpus > 1:
        assert env["OMP_NUM_THREADS"] == str(16 // gpus)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting is kept (not overridden)
    assert "OMP_NUM_THREADS" not in distributed.distributed_env(gpus, cpu_count=16)


def test_training_command_per_backend():
    launch = [sys.executable, "-m", "harness.child.launch", "--tree", "T", "--", "--pt", "train", "input.json"]
    assert distributed.training_command("pt", 1, launch) == (launch, None)
    cmd, why = distributed.training_command("pt", 2, launch)
    assert why is None
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[-len(launch) + 1:] == launch[1:]  # `-m harness.child.launch ...` follows torchrun's options
    cmd, why = distributed.training_command("jax", 2, launch)
    assert cmd is None and "no multi-process data parallelism" in why


def test_tf_backend_horovodrun_mpirun_or_one_line_reason():
    dp = ["dp", "--tf", "train", "input.json"]
    has = lambda *names: (lambda exe: f"/usr/bin/{exe}" if exe in names else None)  # noqa: E731
    cmd, why = distributed.tf_launch_command(4, dp, which=has("horovodrun", "mpirun"), horovod=lambda: True)
    assert cmd == ["horovodrun", "-np", "4", *dp] and why is None
    cmd, why = distributed.tf_launch_command(2, dp, which=has("mpirun"), horovod=lambda: True)
    assert cmd[:3] == ["mpirun", "-np", "2"] and cmd[-len(dp):] == dp and "NCCL_NVLS_ENABLE" in cmd
    cmd, why = distributed.tf_launch_command(2, dp, which=has(), horovod=lambda: True)
    assert cmd is None and "neither horovodrun nor mpirun" in why and "\n" not in why
    cmd, why = distributed.tf_launch_command(2, dp, which=has("horovodrun"), horovod=lambda: False)
    assert cmd is None and "Horovod" in why and "\n" not in why
    # default per-rank command is upstream's own `dp --tf train`
    cmd, _ = distributed.tf_launch_command(2, which=has("horovodrun"), horovod=lambda: True)
    assert cmd[:6] == ["horovodrun", "-np", "2", "dp", "--tf", "train"]
    # on this machine (no Horovod) the harness says so in one line
    if not distributed._horovod_tf_importable():
        cmd, why = distributed.training_command("tf", 2, ["py", "-m", "harness.child.launch"])
        assert cmd is None and why and "\n" not in why


@pytest.mark.parametrize("text,want", [("1", [1]), ("1,2,4", [1, 2, 4]), ("2, 2,1", [2, 1]), (3, [3])])
def test_parse_gpus(text, want):
    assert distributed.parse_gpus(text) == want


@pytest.mark.parametrize("text", ["0", "a", "1,-2", ""])
def test_parse_gpus_rejects(text):
    with pytest.raises(UserError):
        distributed.parse_gpus(text)


def test_check_gpus():
    distributed.check_gpus([1], "cpu", visible=0)
    distributed.check_gpus([1, 2, 4], "cuda", visible=4)
    with pytest.raises(UserError, match="only 2 GPU"):
        distributed.check_gpus([1, 4], "cuda", visible=2)
    with pytest.raises(UserError, match="need --device cuda"):
        distributed.check_gpus([2], "cpu", visible=0)


def test_is_rank0():
    assert distributed.is_rank0({})
    assert distributed.is_rank0({"RANK": "0", "LOCAL_RANK": "0"})
    assert not distributed.is_rank0({"RANK": "1", "LOCAL_RANK": "1"})
    assert not distributed.is_rank0({"OMPI_COMM_WORLD_RANK": "3"})
    assert distributed.is_rank0({"PMI_RANK": "0"})


# ---------------------------------------------------------------- throughput and the table

@pytest.mark.parametrize("bs,atoms,frames", [(1, 192, 1.0), (4, 192, 4.0), ([1, 3], 10, 2.0), ("auto", 192, 1.0),
                                              ("auto:400", 192, 3.0), ("max:400", 192, 2.0), ("auto", 12, 3.0),
                                              ("nonsense", 192, None)])
def test_frames_per_step_follows_upstream_batch_rules(bs, atoms, frames):
    assert distributed.frames_per_step(bs, atoms) == frames


def test_samples_per_s_and_scaling_efficiency():
    assert distributed.samples_per_s(2, 1.0, 0.5) == pytest.approx(4.0)
    assert distributed.samples_per_s(2, None, 0.5) is None
    # 1 GPU: 10 samples/s; 4 GPUs: 30 samples/s -> 75 % of linear
    assert distributed.scaling_efficiency(30.0, 4, 10.0) == pytest.approx(0.75)
    assert distributed.scaling_efficiency(None, 4, 10.0) is None


def _row(variant, n, med, sps, status="ok"):
    return StoredRun.from_dict({"system": "water", "variant": variant, "status": status, "world_size": n,
                                "timing": {"step_s_median": med, "step_s_iqr": 0.001},
                                "throughput": {"samples_per_s": sps}, "memory": {"gpu_peak_bytes": None},
                                "accuracy": {}})


def test_table_shows_gpus_scaling_and_same_count_speedup():
    rows = [_row("baseline", 1, 0.10, 10.0), _row("baseline", 2, 0.125, 16.0),
            _row("tos", 1, 0.05, 20.0), _row("tos", 2, 0.0625, 32.0)]
    lines = bench.format_table(rows).splitlines()
    assert "gpus" in lines[0] and "scaling" in lines[0] and "samples/s" in lines[0]
    b2 = lines[3].split()
    assert b2[:4] == ["water", "baseline", "2", "ok"] and "80%" in b2
    t2 = lines[5].split()
    assert "2.00x" in t2 and "80%" in t2  # speed-up vs baseline at the same GPU count, not vs 1 GPU


def _fake_spec(tiny_system, tmp_path, gpus=2, backend="pt"):
    system = systems.load_system(str(tiny_system))
    from harness.core.records import BuiltVariant

    v = BuiltVariant(name="baseline", chain=("baseline",), hash="h", tree=tmp_path / "tree", backend=backend,
                     env={}, overrides={}, modules=(), accuracy_class="float64", description="", cached=True, log=())
    return RunSpec(run_id="s-tiny-baseline-g2", sweep_id="s", system=system, variant=v, steps=10, device="cuda",
                   seed=1, work_dir=tmp_path / "work", gpus=gpus)


def test_run_training_launches_torchrun_with_the_multicast_env(tiny_system, tmp_path, monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, cmd, cwd, env, **kw):
            seen.update(cmd=cmd, env=env)
            self.pid, self.returncode = 0, 0

        def poll(self):
            return 0

    monkeypatch.setattr(train.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(train, "backend_missing", lambda b: None)
    train.run_training(_fake_spec(tiny_system, tmp_path))
    cmd, env = seen["cmd"], seen["env"]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("harness.child.launch") - 1] == "-m" and cmd[-4:] == ["--pt", "train", "input.json",
                                                                       "--skip-neighbor-stat"]
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1"
    # one GPU: plain python, still no multicast
    seen.clear()
    train.run_training(_fake_spec(tiny_system, tmp_path, gpus=1))
    assert seen["cmd"][1:3] == ["-m", "harness.child.launch"] and seen["env"]["NCCL_NVLS_ENABLE"] == "0"


def test_record_has_world_size_and_samples_per_s(tiny_system, tmp_path):
    spec = _fake_spec(tiny_system, tmp_path)
    spec.work_dir.mkdir(parents=True)
    inp = spec.work_dir / "input.json"
    inp.write_text(json.dumps(train.make_input(spec.system, {}, 10)))
    tr = train.TrainResult(status="ok", error=None, step_s=[0.5] * 20, clock="host", startup_s=1.0, wall_s=11.0,
                           gpu_peak_bytes=None, work_dir=spec.work_dir, checkpoint=None, lcurve=None,
                           input_path=inp, log_path=spec.work_dir / "train.log")
    tm = timing.steady_state(tr.step_s, tr.clock, tr.startup_s, tr.wall_s)
    d = results.to_dict(RunRecord(run=spec, train=tr, timing=tm, environment={}))
    assert d["world_size"] == 2
    assert d["throughput"]["batch_size_per_rank"] == 1.0 and d["throughput"]["global_batch"] == 2.0
    assert d["throughput"]["samples_per_s"] == pytest.approx(2 * 1 / 0.5)


def test_run_id_suffix_for_more_than_one_gpu():
    assert results.run_id("S", "water", "tos", "g2") == "S-water-tos-g2"


# ---------------------------------------------------------------- bad requests: exit 2, nothing written

@pytest.mark.parametrize("args", [["--gpus", "2", "--device", "cpu"], ["--gpus", "1,0"], ["--gpus", "x"]])
def test_cli_rejects_gpus_before_writing(tiny_system, tmp_path, args):
    out = tmp_path / "res"
    rc = cli.main(["bench", "--system", str(tiny_system), "--steps", "3", "--no-accuracy",
                   "--results-dir", str(out), *args])
    assert rc == 2 and not out.exists()


def test_cli_rejects_more_gpus_than_visible(tiny_system, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(environment, "cuda_available", lambda: True)
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 1)
    out = tmp_path / "res"
    rc = cli.main(["bench", "--system", str(tiny_system), "--device", "cuda", "--gpus", "1,2", "--no-accuracy",
                   "--results-dir", str(out)])
    assert rc == 2 and not out.exists()
    assert "--gpus 2: only 1 GPU(s) visible" in capsys.readouterr().err


# ---------------------------------------------------------------- launch.py: only rank 0 writes

FAKE_DP = '''
def main(args):
    from harness.child import runtime
    for _ in range(4):
        runtime.clock.tick("upstream")
'''


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank0_writes_steps_json(tmp_path, rank):
    tree = tmp_path / "tree"
    (tree / "deepmd").mkdir(parents=True)
    (tree / "deepmd" / "__init__.py").write_text("")
    (tree / "deepmd" / "main.py").write_text(FAKE_DP)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DPH_RUN_DIR": str(run), "RANK": rank, "LOCAL_RANK": rank,
           "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "harness.child.launch", "--tree", str(tree), "--", "train"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if rank == "0":
        d = json.loads((run / "steps.json").read_text())
        assert len(d["step_s"]) == 4 and d["world_size"] == 2
    else:
        assert not (run / "steps.json").exists() and not (run / "progress").exists()


# ---------------------------------------------------------------- real: 2 CPU ranks through torchrun

from _ddp_shim import CPU_DDP_SHIM  # noqa: E402  (shared with test_user_train's --gpus test)


@pytest.mark.slow
def test_two_cpu_ranks_train_through_torchrun(tiny_system, tmp_path):
    from harness.prepare import build

    base = build.build_variant("baseline")
    shim = tmp_path / "cpu_ddp_shim.py"
    shim.write_text(CPU_DDP_SHIM)
    variant = dataclasses.replace(base, modules=base.modules + (shim,))
    system = systems.load_system(str(tiny_system))
    steps = 8
    spec = RunSpec(run_id="t-tiny-baseline-g2", sweep_id="t", system=system, variant=variant, steps=steps,
                   device="cpu", seed=1, work_dir=tmp_path / "work", gpus=2)
    tr = train.run_training(spec)
    log = tr.log_path.read_text()
    assert tr.status == "ok", (tr.error, log[-3000:])
    assert "torch.distributed" in log or "Rank: 1/2" in log
    assert "Rank: 0/2" in log and "Rank: 1/2" in log  # upstream saw a world of 2
    steps_json = json.loads((tr.work_dir / "steps.json").read_text())
    assert steps_json["world_size"] == 2 and len(steps_json["step_s"]) == steps
    tm = timing.steady_state(tr.step_s, tr.clock, tr.startup_s, tr.wall_s)
    d = results.to_dict(RunRecord(run=spec, train=tr, timing=tm, environment={}))
    assert d["world_size"] == 2 and d["throughput"]["samples_per_s"] > 0
    assert d["throughput"]["samples_per_s"] == pytest.approx(2 / tm.step_s_median)


@pytest.mark.slow
@pytest.mark.parametrize("variant_name", ["graph", "fused"])
def test_two_cpu_ranks_graph_variants_data_parallel(tiny_system, tmp_path, variant_name):
    """graph / fused data parallel (the engine's own flat-gradient all_reduce, gloo on CPU, the same
    test-only DDP shim as above): the run completes with both ranks, rank 0 alone writes lcurve and
    the checkpoint, upstream's unpatched `dp --pt test` loads that checkpoint, and both ranks end
    with bit-identical parameters (the engine logs a per-rank parameter checksum at the end)."""
    import re

    from harness.prepare import build

    base = build.build_variant(variant_name)
    shim = tmp_path / "cpu_ddp_shim.py"
    shim.write_text(CPU_DDP_SHIM)
    variant = dataclasses.replace(base, modules=base.modules + (shim,))
    system = systems.load_system(str(tiny_system))
    steps = 6
    spec = RunSpec(run_id=f"t-tiny-{variant_name}-g2", sweep_id="t", system=system, variant=variant, steps=steps,
                   device="cpu", seed=1, work_dir=tmp_path / "work", gpus=2)
    tr = train.run_training(spec)
    log = tr.log_path.read_text()
    assert tr.status == "ok", (tr.error, log[-4000:])
    assert "Rank: 0/2" in log and "Rank: 1/2" in log
    assert "data parallel over 2 ranks" in log
    sums = dict(re.findall(r"graph: rank (\d)/2 final parameter checksum (\w+)", log))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"], sums
    steps_json = json.loads((tr.work_dir / "steps.json").read_text())
    assert steps_json["world_size"] == 2 and len(steps_json["step_s"]) == steps
    rows = [l for l in (tr.work_dir / "lcurve.out").read_text().splitlines() if not l.startswith("#")]
    assert [int(r.split()[0]) for r in rows] == sorted({1, steps}), rows  # one writer: no duplicate rows
    assert tr.checkpoint is not None and tr.checkpoint.is_file()
    tree = build.build_variant("baseline").tree
    env = {**os.environ, "PYTHONPATH": str(tree), "CUDA_VISIBLE_DEVICES": ""}
    valid = next((Path(tiny_system) / "data").glob("valid*"))
    q = subprocess.run([sys.executable, "-c", "from deepmd.main import main; main(['--pt', 'test', '-m', "
                        f"{str(tr.checkpoint)!r}, '-s', {str(valid)!r}, '-n', '2', '-d', 'dptest'])"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert "Energy RMSE" in q.stdout + q.stderr
