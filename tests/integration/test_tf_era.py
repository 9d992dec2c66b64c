"""The TF v2 family (the competition's era) for real on CPU: its Python 3.8 environment built from
the pins (deepmd-kit 2.0.3's wheel, sha256-checked; TensorFlow 2.6.0), deepmd's C++ ops loading,
then water trained by v2's own `dp train`, frozen to a .pb and tested by v2's `dp test`; with
--xla, XLA really compiles clusters (counted from its dump, not assumed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main as cli
from harness.prepare import tf_era

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def era():
    if tf_era.find_python(tf_era.load_pin().python) is None:
        pytest.skip("no CPython 3.8 on this machine (pyenv install 3.8, or DPH_TF_ERA_PYTHON)")
    return tf_era.build_env()


def test_the_environment_loads_deepmds_ops(era):
    assert era.versions.startswith("deepmd 2.0.3 tensorflow 2.6.0 ops ") and era.dp.is_file()
    again = tf_era.build_env()
    assert again.cached and again.root == era.root  # a second build is the stamp check


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
    monkeypatch.setattr(tf_era.build_env, "__defaults__", (None, tmp_path))
    assert cli.main(["tf-era"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs CPython 3.8" in err[0]
    assert not list(Path(tmp_path).iterdir())  # nothing half-built
