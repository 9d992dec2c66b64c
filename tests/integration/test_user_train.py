"""`dpharness train` trains for real: baseline and fused on a mixed 108/216-atom copper input with
batch_size "auto", --freeze then upstream's `dp test` on the frozen model and ASE MD through
upstream's calculator, --restart continuing past the first
run's steps, --init-model starting from its weights. Small nets and 10 steps keep each training
to a process start-up; the trainings are module-scoped and shared by the checks."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _upstream_fixtures import first_frames as _frames
from harness.cli import main as cli
from harness.judge import processes
from harness.prepare import systems, workload
from harness.run import train, user_train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# upstream's EnergyStdLoss columns for an energy + force + virial loss (lcurve.out's header)
LCURVE_COLUMNS = ["step", "rmse_val", "rmse_trn", "rmse_e_val", "rmse_e_trn", "rmse_f_val", "rmse_f_trn",
                  "rmse_v_val", "rmse_v_trn", "lr"]




def _input(steps: int) -> dict:
    return {
        "model": {"type_map": ["Cu"],
                  "descriptor": {"type": "se_e2_a", "sel": [100], "rcut_smth": 2.0, "rcut": 6.0,
                                 "neuron": [4, 8], "axis_neuron": 4, "precision": "float64", "seed": 1},
                  "fitting_net": {"neuron": [8, 8], "resnet_dt": True, "precision": "float64", "seed": 1}},
        "learning_rate": {"type": "exp", "decay_steps": 5, "start_lr": 1e-3, "stop_lr": 1e-4},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0.02, "limit_pref_v": 1},
        "training": {"training_data": {"systems": ["data/cu108", "data/cu216"], "batch_size": "auto"},
                     "validation_data": {"systems": ["data/valid108"], "batch_size": 1, "numb_btch": 1},
                     "numb_steps": steps, "seed": 10, "disp_file": "lcurve.out", "disp_freq": 5, "save_freq": 5}}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> Path:
    cu = systems.load_system("copper")
    if systems.checksum_problems(cu):
        pytest.skip("copper data absent (run `make systems`)")
    d = tmp_path_factory.mktemp("usertrain")
    src = cu.directory / "data"
    _frames(src / "fcc_300K", d / "data" / "cu108", 3)
    small = _frames(src / "fcc_800K", d / "small", 2)
    workload.replicate_dataset(small, d / "data" / "cu216", (2, 1, 1))  # 216 atoms, exact labels
    _frames(src / "valid_fcc_1000K", d / "data" / "valid108", 2)
    (d / "input.json").write_text(json.dumps(_input(10), indent=1))
    (d / "input20.json").write_text(json.dumps(_input(20), indent=1))
    return d


def _train(d: Path, *args: str, inp: str = "input.json") -> dict:
    assert cli.main(["train", str(d / inp), "--device", "cpu", *args]) == 0
    out = Path(args[args.index("--output") + 1])
    return json.loads((out / user_train.RECORD_NAME).read_text())


@pytest.fixture(scope="module")
def baseline(user_dir) -> Path:
    out = user_dir / "base"
    _train(user_dir, "--variant", "baseline", "--output", str(out))
    return out


@pytest.fixture(scope="module")
def fused(user_dir) -> Path:
    out = user_dir / "fast"
    _train(user_dir, "--output", str(out), "--freeze")  # no --variant: fused, the default for this input
    return out


@pytest.mark.parametrize("which", ["baseline", "fused"])
def test_trains_mixed_sizes_with_upstreams_outputs(which, request):
    out = request.getfixturevalue(which)
    rec = user_train.read_record(out / user_train.RECORD_NAME)
    assert isinstance(rec, user_train.TrainingRecord) and rec.variant == which and rec.returncode == 0
    assert rec.chose == ("user" if which == "baseline" else "default: the fast engine trains this input")
    assert rec.numb_steps == 10 and rec.steps_lcurve == 10 and rec.device == "cpu"
    # the header is upstream's own line, not its second '#' note line
    head = (out / "lcurve.out").read_text().splitlines()[0]
    assert head.lstrip("#").split() == LCURVE_COLUMNS == rec.lcurve_columns
    cols, rows = user_train.read_lcurve(out / "lcurve.out")
    assert [int(r["step"]) for r in rows] == [1, 5, 10]
    assert all(np.isfinite(v) for r in rows for v in r.values())
    assert rec.final_lcurve == rows[-1]
    for name in ("model.ckpt-5.pt", "model.ckpt-10.pt", "model.ckpt.pt", "checkpoint"):
        assert (out / name).exists(), name
    assert (out / "model.ckpt.pt").resolve().name == "model.ckpt-10.pt"
    # data paths were made absolute from the input's folder, nothing else changed
    run_inp = json.loads((out / "input.json").read_text())
    assert run_inp["training"]["training_data"]["systems"] == [
        str(out.parent / "data" / "cu108"), str(out.parent / "data" / "cu216")]
    assert run_inp["model"] == _input(10)["model"]


def test_freeze_then_upstreams_dp_test(fused, user_dir):
    frozen = fused / "frozen_model.pth"
    rec = user_train.read_record(fused / user_train.RECORD_NAME)
    assert frozen.is_file() and rec.outputs["frozen_model.pth"] == str(frozen)
    tree = processes.baseline_tree()
    cmd = train.launch_command(tree, (), ["--pt", "test", "-m", str(frozen), "-s", str(user_dir / "data" / "cu216"),
                                          "-n", "2"])
    env = train.subprocess_env("cpu", {}, fused)
    r = subprocess.run(cmd, cwd=fused, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = processes.parse_dp_test(r.stdout + r.stderr)
    assert res["rmse_f"] is not None and np.isfinite(res["rmse_f"])


def test_the_frozen_fused_model_drives_ase_md(fused, user_dir, capsys):
    """The chain a user runs: mixed 108/216-atom data, batch_size "auto", fused training, upstream's
    freeze, then NVE through upstream's ASE calculator (`dpharness md`) on a 108-atom frame."""
    out = user_dir / "md"
    assert cli.main(["md", str(fused / "frozen_model.pth"), "--data", str(user_dir / "data" / "valid108"),
                     "--ps", "0.2", "--dt-fs", "1", "--out", str(out), "--strict"]) == 0
    v = json.loads((out / "nve_verdict.json").read_text())
    assert v["ok"] and v["atoms"] == 108 and v["steps"] == 200, v
    assert "PASS" in capsys.readouterr().out


def test_restart_continues_past_the_first_run(baseline, user_dir):
    out = user_dir / "restart"
    rec = _train(user_dir, "--variant", "baseline", "--output", str(out), "--restart",
                 str(baseline / "model.ckpt.pt"), inp="input20.json")
    assert rec["numb_steps"] == 20 and rec["steps_lcurve"] == 20 and rec["restart"]
    _, rows = user_train.read_lcurve(out / "lcurve.out")
    steps = [int(r["step"]) for r in rows]
    # the next step after the checkpoint's (upstream's own --restart runs step 10 again and shows
    # its row a second time; harness/child/resume.py)
    assert steps == [15, 20]
    # upstream's exp schedule over 20 steps (decay 0.1 ** (5 / 20) every 5) is two decays in at step
    # 15's row (full precision: lcurve.out rounds to two digits): the schedule went on from the
    # checkpoint's step; a fresh start would show 1e-3
    full = [json.loads(x) for x in (out / "lcurve_full.jsonl").read_text().splitlines()]
    assert full[0]["step"] == 15 and full[0]["lr"] == pytest.approx(1e-3 * 0.1 ** 0.5, rel=1e-12)
    assert (out / "model.ckpt-20.pt").exists()


def test_init_model_starts_from_its_weights(fused, baseline, user_dir):
    out = user_dir / "init"
    rec = _train(user_dir, "--variant", "fused", "--output", str(out), "--init-model", str(fused / "model.ckpt.pt"))
    _, rows = user_train.read_lcurve(out / "lcurve.out")
    _, fresh = user_train.read_lcurve(baseline / "lcurve.out")
    assert rec["init_model"] and [int(r["step"]) for r in rows] == [1, 5, 10]
    # the first row of an --init-model run is the trained model's error, not a fresh initialisation's
    assert rows[0]["rmse_trn"] != pytest.approx(fresh[0]["rmse_trn"], rel=1e-6)


def test_gpus_2_trains_on_two_ranks_and_says_so(user_dir, tmp_path, monkeypatch):
    """`dpharness train --gpus 2` launches torchrun with 2 ranks (CPU here: the test-only DDP shim
    of test_distributed.py lets upstream's GPU-only DDP path use gloo, and the GPU-count check is
    the one thing bypassed); the record's world size is what the child reported, and a launcher
    that ran fewer ranks than asked is an error, not a quiet one-process run."""
    import dataclasses

    from harness.prepare import build
    from harness.run import distributed
    from _ddp_shim import CPU_DDP_SHIM

    shim = tmp_path / "cpu_ddp_shim.py"
    shim.write_text(CPU_DDP_SHIM)
    real = build.build_variant
    monkeypatch.setattr(build, "build_variant", lambda *a, **k: dataclasses.replace(
        real(*a, **k), modules=real(*a, **k).modules + (shim,)))
    monkeypatch.setattr(distributed, "check_gpus", lambda gpus, device, visible=None: None)
    out = tmp_path / "ddp"
    rec = _train(user_dir, "--output", str(out), "--gpus", "2")
    assert rec["world_size"] == 2 and "torch.distributed.run" in rec["command"]
    log = (out / "train.log").read_text()
    assert "Rank: 0/2" in log and "Rank: 1/2" in log
    assert rec["variant"] == "fused" and "data parallel over 2 ranks" in log  # the engine's own all-reduce
    assert rec["steps_lcurve"] == 10 and (out / "model.ckpt-10.pt").is_file()
    monkeypatch.setattr(distributed, "training_command", lambda backend, gpus, cmd: (cmd, None))  # 1 rank runs
    assert cli.main(["train", str(user_dir / "input.json"), "--device", "cpu", "--gpus", "2",
                     "--output", str(tmp_path / "fell-back")]) == 3  # RunFailed
    assert not (tmp_path / "fell-back" / user_train.RECORD_NAME).exists()


def test_follow_upstream_order_trains_upstreams_trajectory_on_mixed_sizes(baseline, user_dir):
    """--follow-upstream-order: fused on the batches upstream's sampler draws, over two systems of
    different sizes (two shape groups): every full-precision lcurve value equals upstream's to 1e-8."""
    out = user_dir / "follow"
    rec = _train(user_dir, "--variant", "fused", "--follow-upstream-order", "--output", str(out))
    assert rec["follow_upstream_order"] is True and rec["variant"] == "fused"
    rows = [[json.loads(x) for x in (d / "lcurve_full.jsonl").read_text().splitlines()] for d in (baseline, out)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [1, 5, 10]
    for a, b in zip(*rows):
        for part in ("trn", "val"):
            for k, v in a[part].items():
                assert abs(v - b[part][k]) <= 1e-8 * abs(v), (a["step"], part, k, v, b[part][k])
        assert a["lr"] == b["lr"]
    steps = json.loads((out / "steps.json").read_text())
    assert steps["engine"]["order"] == "upstream"
