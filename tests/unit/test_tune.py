"""`dpharness tune` picks the fastest legal setting that the accuracy gate passes."""
from __future__ import annotations

from harness.core.records import StoredRun
from harness.run import bench
from harness.cli import main as cli


def _row(variant, ms, verdict, status="ok"):
    return StoredRun.from_dict({"system": "s", "variant": variant, "status": status, "overrides": {}, "memory": {},
                                "timing": {"step_s_median": ms / 1e3, "step_s_iqr": 0.0}, "throughput": {},
                                "world_size": 1, "accuracy": {"verdict": verdict, "detail": "d"}})


def test_tune_skips_a_faster_setting_that_fails_the_gate(monkeypatch, capsys, tmp_path):
    rows = [_row("baseline", 40, "baseline"), _row("fp32", 30, "pass"), _row("tos", 20, "fail"),
            _row("fp32-tos", 25, None, status="failed")]
    seen = {}

    def fake_run(req, log, accuracy_stage):
        seen["variants"] = req.variants
        return rows

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["tune", "--system", "water", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert seen["variants"] == ["baseline", "fp32", "tos", "fp32-tos"]
    assert "best legal configuration for s: fp32 (30.00 ms/step" in out
    assert "fastest overall was tos" in out
