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


def test_tune_seeds_judges_each_setting_by_its_last_seed_and_fails_on_any_failed_seed(monkeypatch, capsys, tmp_path):
    """tune --seeds: one sweep, each seed a bench; a setting's verdict is its last seed's run (which
    holds the training-equivalence test), a fail of any seed fails it; ms/step is the median."""
    per_seed = {
        1: [_row("baseline", 40, "baseline"), _row("fp32", 30, "pass"), _row("tos", 20, "pass"),
            _row("fp32-tos", 19, "pass")],
        2: [_row("baseline", 41, "baseline"), _row("fp32", 32, "pass"), _row("tos", 21, "fail"),
            _row("fp32-tos", 18, "pass")],
        3: [_row("baseline", 42, "baseline"), _row("fp32", 31, "pass"), _row("tos", 22, "pass"),
            _row("fp32-tos", 17, "fail")],
    }
    seen = []

    def fake_run(req, log, accuracy_stage):
        seen.append((req.seed, req.seed_in_id, req.sweep_id))
        return [StoredRun.from_dict({**r.to_dict(), "sweep_id": "sw", "seed": req.seed}) for r in per_seed[req.seed]]

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["tune", "--system", "water", "--seeds", "1,2,3", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert seen == [(1, True, None), (2, True, "sw"), (3, True, "sw")]
    assert "best legal configuration for s: fp32 (31.00 ms/step, overrides none, 3 seeds)" in out
    assert "fastest overall was fp32-tos" in out
