"""`dpharness convergence` end to end on CPU: real trainings of water (40 steps, 1 baseline seed +
1 fused seed side by side), upstream's dp test of each, one record under results/convergence."""
from __future__ import annotations

import json

from harness.cli import main
from harness.core.convergence_records import ConvergenceRecord
from harness.results import convergence as store


def test_convergence_end_to_end_on_cpu_writes_a_record(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main.main(["convergence", "--system", "water", "--variant", "baseline:1", "--variant", "fused:1",
                    "--steps", "40", "--device", "cpu", "--parallel", "2", "--out-dir", str(out),
                    "--work-dir", str(tmp_path / "work")])
    text = capsys.readouterr().out
    assert rc == 0, text
    [rec] = store.load_records(out)
    assert rec.path.parent == out and json.loads(rec.path.read_text())["schema"] == "dpharness.convergence/1"
    assert rec.verdict == "incomplete"  # one baseline seed: no spread to judge by (said so)
    assert rec.learning_rate["decay_steps"] == 1 and rec.learning_rate["stop_lr"] == 3.51e-08
    assert [(r.variant, r.seed, r.status) for r in rec.runs] == [("baseline", 10, "ok"), ("fused", 10, "ok")]
    for r in rec.runs:
        assert r.lcurve.step[-1] == 40 and len(r.lcurve.step) == 40  # disp_freq 1: every step
        assert r.lcurve.lr[0] > 10 * r.lcurve.lr[-1]  # the rate decays over the run
        assert all(w is not None and w > 0 for w in r.lcurve.wall_s)
        assert r.dp_test["rmse_f"] > 0 and r.step_ms_median > 0 and r.concurrent in (1, 2)
    assert set(rec.time_to_rmse["by_variant"]) == {"baseline", "fused"}
    assert rec.time_to_rmse["by_variant"]["baseline"]["10"] is not None  # it reaches its own final value
    assert "INCOMPLETE" in text and "wall time to the baseline" in text
    assert ConvergenceRecord.from_json(rec.path).to_dict() == rec.to_dict()


def test_a_time_budget_too_short_for_any_run_records_them_not_started(tmp_path, capsys):
    rc = main.main(["convergence", "--system", "water", "--variant", "baseline:2", "--variant", "fused:1",
                    "--steps", "40", "--device", "cpu", "--time-budget", "5", "--out-dir", str(tmp_path),
                    "--work-dir", str(tmp_path / "work")])
    assert rc == 0, capsys.readouterr()
    [rec] = store.load_records(tmp_path)
    assert [r.status for r in rec.runs] == ["not started"] * 3 and rec.verdict == "incomplete"
    assert all("time budget" in r.error for r in rec.runs)
