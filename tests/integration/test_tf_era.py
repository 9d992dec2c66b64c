"""The TF v2 family (the competition's era) for real on CPU: its Python 3.8 environment built from
the pins (deepmd-kit 2.0.3's wheel, sha256-checked; TensorFlow 2.6.0), deepmd's C++ ops loading,
then water trained by v2's own `dp train`, frozen to a .pb and tested by v2's `dp test`; with
--xla, XLA really compiles clusters (counted from its dump, not assumed). The asc-* variants
through `dpharness bench` (timed by the hook on v2's loop, gated by v2's dp test against the 3.2.0
baseline's seed spread), and Horovod built from its sdist running 2 processes (Gloo) with the
world size read from v2's own log."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.cli import main as cli
from harness.prepare import tf_era

pytestmark = pytest.mark.slow
# an asc-2022 checkout, for the one test that builds it; every other test builds from the sdist
ASC2022_CHECKOUT = os.environ.get(tf_era.SOURCE_DIR_VAR)


@pytest.fixture(autouse=True)
def _sdist_unless_asked(monkeypatch):
    monkeypatch.delenv(tf_era.SOURCE_DIR_VAR, raising=False)


@pytest.fixture(scope="module")
def era():
    if tf_era.find_python(tf_era.load_pin().python) is None:
        pytest.skip("no CPython 3.8 on this machine (pyenv install 3.8, or DPH_TF_ERA_PYTHON)")
    return tf_era.build_env()


def test_the_environment_is_built_from_source_and_loads_deepmds_ops(era):
    assert era.versions.startswith("deepmd 2.0.3 tensorflow 2.6.0 ops ") and era.dp.is_file()
    assert era.versions.endswith("built from deepmd-kit 2.0.3 sdist (sha256 30a6867d7cd0)")
    log = (era.root / "build.log").read_text()
    assert "sha256 30a6867d7cd0… verified against the pin" in log and "C++ ops: upstream's CMake" in log
    again = tf_era.build_env()
    assert again.cached and again.root == era.root  # a second build is the stamp check


def test_the_asc2022_commit_itself_builds_and_trains(tmp_path):
    """Where $DEEPMD_SOURCE_DIR names a checkout holding the asc-2022 commit (CI's fresh clone has
    none): that commit is exported, compiled and trained by bench as asc-baseline."""
    src = ASC2022_CHECKOUT
    if not src or tf_era.find_python("3.8") is None:
        pytest.skip("no asc-2022 checkout ($DEEPMD_SOURCE_DIR) or no CPython 3.8")
    env = tf_era.build_env(source=tf_era.resolve_source(src))
    assert env.versions.startswith("deepmd 2.0.2.dev59+gc5f88f3b tensorflow 2.6.0 ops ")
    assert "built from asc-2022 c5f88f3ba760" in env.versions
    recs = {r["variant"]: r for r in _bench(tmp_path, "--steps", "20", "--variant", "asc-baseline",
                                            "--upstream-source", src)}
    r = recs["asc-baseline"]
    assert r["status"] == "ok" and "2.0.2.dev59+gc5f88f3b" in r["environment"]["family_runtime"]
    assert r["accuracy"]["verdict"] == "pass" and r["timing"]["steps_measured"] == 14


def test_a_checkout_without_the_commit_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "not-a-checkout").mkdir()
    assert cli.main(["bench", "--system", "water", "--device", "cpu", "--variant", "asc-baseline", "--steps", "4",
                     "--upstream-source", str(tmp_path / "not-a-checkout"), "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a git checkout holding asc-2022 commit c5f88f3ba760" in err[0]
    assert not (tmp_path / "r").exists()
    assert cli.main(["bench", "--system", "water", "--device", "cpu", "--variant", "fused", "--steps", "4",
                     "--upstream-source", str(tmp_path), "--results-dir", str(tmp_path / "r")]) == 2
    assert "builds the TF v2 family" in capsys.readouterr().err


@pytest.mark.parametrize("xla", [False, True])
def test_v2_trains_freezes_and_tests_water(era, tmp_path, xla, capsys):
    wd = tmp_path / "smoke"
    assert cli.main(["tf-era", "--smoke", "6", "--work", str(wd), *(["--xla"] if xla else [])]) == 0
    out = json.loads((wd / "smoke.json").read_text())
    assert out["versions"] == era.versions and out["steps"] == 6 and (wd / "frozen_model.pb").is_file()
    assert out["dp_test"]["rmse_f"] > 0 and out["dp_test"]["rmse_e_per_atom"] > 0
    rows = [l for l in (wd / "lcurve.out").read_text().splitlines() if not l.startswith("#")]
    assert int(rows[-1].split()[0]) == 6
    assert (out["xla_modules"] or 0) > 0 if xla else out["xla_modules"] is None
    assert "frozen_model.pb dp test" in capsys.readouterr().out


def test_no_python_38_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tf_era, "find_python", lambda version: None)
    monkeypatch.setattr(tf_era, "BUILD", tmp_path)
    monkeypatch.setattr(tf_era.build_env, "__defaults__", (None, tmp_path, None))
    assert cli.main(["tf-era"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs CPython 3.8" in err[0]
    assert not list(Path(tmp_path).iterdir())  # nothing half-built


def _bench(tmp_path, *args) -> list[dict]:
    out = tmp_path / "results"
    assert cli.main(["bench", "--system", "water", "--device", "cpu", "--results-dir", str(out), *args]) == 0
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def test_asc_variants_train_timed_and_gated_by_v2s_dp_test(era, tmp_path):
    recs = {r["variant"]: r for r in _bench(tmp_path, "--steps", "20", "--variant", "asc-baseline",
                                            "--variant", "asc-fp32", "--variant", "asc-tos", "--variant", "asc-xla",
                                            "--variant", "asc-mixed")}
    assert set(recs) == {"baseline", "asc-baseline", "asc-fp32", "asc-tos", "asc-xla", "asc-mixed"}
    for name in ("asc-baseline", "asc-fp32", "asc-tos", "asc-xla", "asc-mixed"):
        r = recs[name]
        assert r["status"] == "ok" and r["backend"] == "tf-v2", (name, r["error"])
        assert r["environment"]["family_runtime"] == era.versions
        # the hook on v2's loop ticked every step (warm-up and the last interval dropped)
        assert r["timing"]["step_s_median"] > 0 and r["timing"]["steps_measured"] == 20 - 5 - 1
        inp = json.loads(Path(r["artifacts"]["input"]).read_text())
        assert inp["training"]["numb_steps"] == 20
        work = Path(r["artifacts"]["work_dir"])
        assert (work / "accuracy" / "frozen_model.pb").is_file()  # v2 froze it; v2 tested it
        assert "dp test vs calibrated seed spread" in r["accuracy"]["detail"]
        assert r["accuracy"]["dp_test"]["rmse_f"] > 0
    assert recs["asc-fp32"]["overrides"] == {"model/descriptor/precision": "float32",
                                             "model/fitting_net/precision": "float32"}
    assert json.loads(Path(recs["asc-tos"]["artifacts"]["input"]).read_text())["model"]["descriptor"]["type_one_side"] is True
    assert list((Path(recs["asc-xla"]["artifacts"]["work_dir"]) / "xla_dump").glob("*.before_optimizations.txt"))
    # same science across families: v2's float64 model within the 3.2.0 baseline's seed spread
    # asc-mixed: v2 took its interface precision (its log says float), nets float32, class mixed
    assert "build float prec:     float" in Path(recs["asc-mixed"]["artifacts"]["log"]).read_text()
    assert recs["asc-mixed"]["accuracy_class"] == "mixed" and recs["asc-mixed"]["accuracy"]["verdict"] in ("pass", "fail")
    assert recs["asc-baseline"]["accuracy"]["verdict"] == "pass"
    assert recs["asc-xla"]["accuracy"]["verdict"] == "pass"


def test_horovod_two_processes_world_size_from_v2s_log(era, tmp_path):
    hv = tf_era.build_horovod(era)
    assert "TensorFlow" in hv.check_build and "controllers: Gloo" in hv.check_build
    recs = {(r["variant"], r["world_size"]): r for r in _bench(
        tmp_path, "--steps", "12", "--no-accuracy", "--variant", "asc-baseline", "--gpus", "2", "--launcher", "horovod")}
    assert set(recs) == {("baseline", 1), ("asc-baseline", 2)}  # the PyTorch reference: one process
    r = recs[("asc-baseline", 2)]
    assert r["status"] == "ok", r["error"]
    log = Path(r["artifacts"]["log"]).read_text()
    assert "[0]<stderr>:DEEPMD INFO    world size:           2" in log and "[1]<stderr>" in log
    assert r["throughput"]["global_batch"] == 2 * r["throughput"]["batch_size_per_rank"]


def test_a_serial_fallback_is_a_failed_run_not_a_two_process_one(tmp_path):
    from harness.run import train

    log = tmp_path / "train.log"
    prec = "DEEPMD INFO    build float prec:     double\n"
    log.write_text(prec + "WARNING Switch to serial execution due to lack of horovod module.\n")
    size, why = train.tf_v2_check(log, tmp_path, 2, xla=False)
    assert size == 1 and "fell back to serial" in why
    log.write_text(prec + "[0]<stderr>:DEEPMD INFO    world size:           3\n")
    assert "world size 3, not 2" in train.tf_v2_check(log, tmp_path, 2, xla=False)[1]
    log.write_text(prec + "[0]<stderr>:DEEPMD INFO    world size:           2\n")
    assert train.tf_v2_check(log, tmp_path, 2, xla=False) == (2, None)
    # XLA flags set but nothing compiled: not a run of XLA
    assert "XLA compiled no cluster" in train.tf_v2_check(log, tmp_path, 2, xla=True)[1]
    # DP_INTERFACE_PREC=low that v2 did not take (its log says double): not a mixed run
    assert "build float prec double, not float" in train.tf_v2_check(log, tmp_path, 1, False, "low")[1]


def test_where_the_family_cannot_be_built_its_runs_are_unavailable(tmp_path, monkeypatch):
    from harness.core.errors import UserError

    def no_env(*a, **k):
        raise UserError("the TF v2 family needs CPython 3.8 (set DPH_TF_ERA_PYTHON, or `pyenv install 3.8`): none found")

    monkeypatch.setattr(tf_era, "build_env", no_env)
    recs = {r["variant"]: r for r in _bench(tmp_path, "--steps", "4", "--no-accuracy", "--variant", "asc-xla")}
    assert recs["asc-xla"]["status"] == "unavailable" and "needs CPython 3.8" in recs["asc-xla"]["error"]
    assert recs["baseline"]["status"] == "ok"
