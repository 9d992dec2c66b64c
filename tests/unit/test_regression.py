"""harness.results.regression: same-run ratios, overhead, the comparison against the committed reference and
the `regress` exit code (the sweep itself is replaced by synthetic results here)."""
from __future__ import annotations

import argparse
import json

import pytest

from harness.cli import regress
from harness.results import regression
from tests._fixtures_report import run_record, typed


def _sweep(base: float, fp32: float, wall_extra: float = 1.0):
    rows = [run_record("S", "tiny", "baseline", base, base * 0.1, card="cpu", steps=16),
            run_record("S", "tiny", "fp32", fp32, fp32 * 0.1, card="cpu", steps=16)]
    for r in rows:
        t = r["timing"]
        t["startup_s"] = 6.0
        t["wall_s"] = 6.0 + 16 * t["step_s_median"] + wall_extra
    return typed(rows)


def test_committed_reference_is_sane():
    ref = json.loads(regression.REFERENCE.read_text())
    assert ref["schema"] == regression.SCHEMA
    assert 0.2 < ref["ratios"]["fp32/baseline"] < 1.5
    assert set(ref["overhead_s"]) == {"baseline", "fp32"}
    assert all(v["status"] == "ok" for v in ref["variants"].values())


def test_measure_and_overhead():
    m = regression.measure(_sweep(0.07, 0.05, wall_extra=2.5))
    assert m["ratios"]["fp32/baseline"] == pytest.approx(0.05 / 0.07)
    assert m["overhead_s"]["baseline"] == pytest.approx(2.5)


def test_compare_passes_within_and_fails_beyond_thresholds():
    ref = regression.measure(_sweep(0.07, 0.05))
    assert regression.compare(regression.measure(_sweep(0.08, 0.06)), ref) == []
    slow = regression.compare(regression.measure(_sweep(0.07, 0.12)), ref)
    assert any("fp32/baseline" in p and "outside" in p for p in slow)
    over = regression.compare(regression.measure(_sweep(0.07, 0.05, wall_extra=20.0)), ref)
    assert any("overhead" in p for p in over)
    failed = _sweep(0.07, 0.05)
    failed[1].status = "failed"
    failed[1].timing.step_s_median = None
    assert any("fp32: run failed" in p for p in regression.compare(regression.measure(failed), ref))


@pytest.mark.parametrize("fp32, rc", [(0.05, 0), (0.2, 1)])
def test_regress_cli_exit_code(tmp_path, monkeypatch, capsys, fp32, rc):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(regression.measure(_sweep(0.07, 0.05))))
    calls = []
    monkeypatch.setattr(regress, "run_sweep", lambda work, steps, log: calls.append(1) or _sweep(0.07, fp32))
    p = argparse.ArgumentParser()
    regress.register_cli(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["regress", "--reference", str(ref)])
    assert a.func(a) == rc
    out = capsys.readouterr().out
    assert ("REGRESSION CHECK FAILED" in out) == (rc == 1)
    assert len(calls) == (2 if rc else 1)  # one retry before failing


def test_missing_reference_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(regress, "run_sweep", lambda work, steps, log: _sweep(0.07, 0.05))
    p = argparse.ArgumentParser()
    regress.register_cli(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["regress", "--reference", str(tmp_path / "none.json")])
    assert a.func(a) == 1
    assert "no reference" in capsys.readouterr().out
