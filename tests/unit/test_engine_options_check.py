"""harness/prepare/engine_options.py: a bad value of a variable the fast engine reads is refused by
the harness when the variant is built -- one line naming the variable, exit 2, nothing written --
instead of a run that fails inside its training child."""
from __future__ import annotations

import re

import pytest

from harness.cli import main as cli
from harness.core.errors import UserError
from harness.prepare import engine_options
from harness.prepare.variants import ENGINES


def test_the_variants_env_is_checked_over_the_users():
    with pytest.raises(UserError, match=r"variant x: DPH_GEOM='sparse': not one of"):
        engine_options.check(ENGINES / "dpfast", "x", {"DPH_GEOM": "sparse"}, {})
    with pytest.raises(UserError, match=re.escape("variant x: DPH_FUSED_VJP_ROWS=24: not one of 0 | 16 | 32")):
        engine_options.check(ENGINES / "dpfast", "x", {}, {"DPH_FUSED_VJP_ROWS": "24"})
    # the child's environment is the user's with the variant's env over it (train.subprocess_env)
    engine_options.check(ENGINES / "dpfast", "x", {"DPH_GEOM": "compact"}, {"DPH_GEOM": "sparse"})
    engine_options.check(ENGINES / "no-such-engine", "x", {}, {"DPH_GEOM": "sparse"})  # nothing to check


def test_bench_refuses_a_bad_engine_option_before_anything_runs(tiny_system, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPH_FUSED_VJP_WARPS", "3")
    res = tmp_path / "res"
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "fused", "--steps", "2", "--device", "cpu",
                   "--no-baseline", "--results-dir", str(res)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == ("dpharness: error: variant fused: DPH_FUSED_VJP_WARPS=3: "
                                   "not one of 0 | 1 | 2 | 4 | 8"), err
    assert not res.exists()
