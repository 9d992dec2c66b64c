"""`dpharness trajectory` end to end on CPU (issue 41, slice 2): upstream trains twice with one
seed on one thread -- bitwise the same curve and weights -- and fused on upstream's order stays
within the float64 engine's parity of it; the record is written, typed, and the verdict PASS.
Bad input is one line and exit 2 with nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 30


def _dph(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_trajectory_on_cpu_upstream_is_its_own_floor_and_fused_follows(tiny_system, tmp_path) -> None:
    from harness.results import trajectory as store

    r = _dph("trajectory", "--system", str(tiny_system), "--variant", "fused", "--steps", str(STEPS),
             "--device", "cpu", "--out-dir", str(tmp_path / "out"), "--strict")
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = store.load_records(tmp_path / "out")
    assert r.stdout.startswith(f"trajectory {rec.sweep_id}: tinywater, seed 10, {STEPS} steps on cpu: PASS")
    assert [(x.role, x.variant, x.status, x.order) for x in rec.runs] == [
        ("upstream", "baseline", "ok", "upstream"), ("upstream-again", "baseline", "ok", "upstream"),
        ("variant", "fused", "ok", "upstream")]
    assert rec.runs[2].engine["engine"] == "fused" and len(rec.runs[0].rows) == STEPS  # disp_freq 1
    again, fused = rec.comparisons
    assert again.run == "upstream-again" and again.worst == 0 and again.weights_max_rel == 0  # bitwise
    assert fused.run == "fused" and fused.follows and fused.horizon is None
    assert fused.worst <= 1e-8 and fused.weights_max_rel <= 1e-8  # float64 engine parity
    assert set(fused.by_column) >= {"lr", "trn:rmse_e", "trn:rmse_f", "val:rmse_e", "val:rmse_f"}


@pytest.mark.parametrize("args,message", [
    ((), "give a variant"),
    (("--variant", "baseline"), "upstream is the reference"),
    (("--variant", "fused", "--variant", "fused"), "given once"),
    (("--variant", "no-such-variant"), "no-such-variant"),
])
def test_bad_requests_are_one_line_and_exit_2(tiny_system, tmp_path, args, message) -> None:
    r = _dph("trajectory", "--system", str(tiny_system), "--steps", "3", "--device", "cpu",
             "--out-dir", str(tmp_path / "out"), *args, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
