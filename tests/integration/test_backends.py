"""Upstream's other backends through the harness: the step clock hooks their loops, and the
accuracy gate tests their models in their own backend with the unpatched baseline build."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.cli import calibrate
from harness.judge import processes
from harness.cli import main as cli
from harness.child import launch
from harness.run import train


def test_backend_is_read_from_dp_arguments():
    assert launch._backend_of(["--pt", "train", "input.json"]) == "pt"
    assert launch._backend_of(["--jax", "train", "input.json"]) == "jax"
    assert launch._backend_of(["--tf", "train", "input.json"]) == "tf"
    assert launch._backend_of(["train", "input.json"]) == "tf"  # dp's default


def test_missing_backend_is_a_clear_reason():
    why = train.backend_missing("pt")
    assert why is None  # torch is always there
    assert set(launch.STEP_HOOKS) == {"pt", "jax", "tf", "pt-expt", "tf2"}


@pytest.mark.slow
def test_tf_variant_trains_is_timed_and_is_dp_tested_from_a_frozen_graph(tiny_system, tmp_path):
    if train.backend_missing("tf"):
        pytest.skip("TensorFlow is not installed (pip install -r harness/pins/tf.txt)")
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "tf", "--steps", "8", "--device", "cpu",
                   "--results-dir", str(tmp_path)])
    assert rc == 0
    recs = {json.loads(p.read_text())["variant"]: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*")}
    tf = recs["tf"]
    assert tf["status"] == "ok" and tf["backend"] == "tf"
    assert tf["timing"]["steps_measured"] >= 1 and tf["timing"]["step_s_median"] > 0
    dp = tf["accuracy"]["dp_test"]
    assert dp and dp["rmse_f"] > 0  # dp --tf test of the frozen model, by the baseline build
    assert "not applicable to the tf backend" in tf["accuracy"]["detail"]


@pytest.mark.parametrize("backend, ckpt, frozen", [
    ("jax", "model.ckpt-8.jax", "frozen_model.hlo"),  # an orbax directory: frozen from itself
    ("tf", "model.ckpt.index", "frozen_model.pb"),    # a file prefix: frozen from its folder
    ("pt", "model.ckpt-8.pt", None),                   # read as it is
])
def test_dp_test_of_a_jax_or_tf_checkpoint_freezes_it_first(backend, ckpt, frozen, tmp_path, monkeypatch):
    """What the gate runs, without running it: `dp --<backend> freeze` of the training checkpoint,
    then `dp test -m` of the frozen file (upstream's JAX DeepEval reads only .hlo/.savedmodel)."""
    ckpt_path = tmp_path / "run" / ckpt
    if backend == "jax":
        ckpt_path.mkdir(parents=True)
    else:
        ckpt_path.parent.mkdir(parents=True)
        ckpt_path.touch()
    ran, started = [], []

    def fake_run(cmd, **kw):
        ran.append((cmd, kw["env"]))
        Path(cmd[cmd.index("-o") + 1]).touch()
        return processes.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(processes.subprocess, "run", fake_run)
    monkeypatch.setattr(processes.subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw["env"])) or "proc")
    out = tmp_path / "acc"
    proc, _ = processes.start_dp_test(ckpt_path, (tmp_path,), out, "cpu", 2, tmp_path / "tree", backend)
    processes._untrack(proc)
    (test_cmd, env), = started
    dp_test = test_cmd[test_cmd.index("--") + 1:]
    assert dp_test[:2] == [train.BACKEND_FLAG[backend], "test"]
    if frozen is None:
        assert ran == [] and dp_test[dp_test.index("-m") + 1] == str(ckpt_path.resolve())
        return
    (freeze_cmd, _), = ran
    c = ckpt_path if backend == "jax" else ckpt_path.parent
    assert freeze_cmd[freeze_cmd.index("--") + 1:] == [train.BACKEND_FLAG[backend], "freeze", "-c", str(c),
                                                       "-o", str(out / frozen)]
    assert dp_test[dp_test.index("-m") + 1] == str(out / frozen)
    assert (env.get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false") == (backend == "jax")


def test_parity_is_not_applicable_to_a_jax_variant():
    out = calibrate.parity_check("water", "jax-tos")
    assert out["verdict"] == "not applicable" and "jax backend" in out["detail"]


@pytest.mark.slow
def test_jax_tos_trains_and_its_gate_dp_tests_a_frozen_hlo_model(tiny_system, tmp_path):
    """The GPU failure `deep_eval.py: Unsupported file extension`: dp --jax test was given the
    orbax training checkpoint. No baseline run (cost): the gate's dp test still runs, unjudged."""
    if train.backend_missing("jax"):
        pytest.skip("JAX is not installed (pip install -r harness/pins/jax.txt)")
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "jax-tos", "--no-baseline", "--steps", "4",
                   "--device", "cpu", "--results-dir", str(tmp_path)])
    assert rc == 0
    rec, = (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*"))
    assert rec["variant"] == "jax-tos" and rec["status"] == "ok" and rec["backend"] == "jax"
    assert rec["artifacts"]["checkpoint"].endswith(".jax")
    dp = rec["accuracy"]["dp_test"]
    assert dp, rec["accuracy"]["detail"]
    assert math.isfinite(dp["rmse_e_per_atom"]) and math.isfinite(dp["rmse_f"]) and dp["rmse_f"] > 0
    assert (Path(rec["artifacts"]["work_dir"]) / "accuracy" / "frozen_model.hlo").is_file()
