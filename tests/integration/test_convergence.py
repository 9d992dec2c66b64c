"""`dpharness convergence` end to end on CPU: real trainings of tiny water (water's frames and
input with a reduced-size net, conftest's tiny_system; 40 steps, 1 baseline seed + 1 fused seed
side by side), upstream's dp test of each, one record under results/convergence. What is tested
is the command's plumbing (records, splits, rejudging, refusals), not water's science: the
full-size net cost ~4x the minutes for the same assertions."""
from __future__ import annotations

import json
import os

from harness.cli import main
from harness.core.convergence_records import ConvergenceRecord
from harness.results import convergence as store
from harness.run.distributed import cores_share_env


def test_convergence_end_to_end_on_cpu_writes_a_record(tiny_system, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main.main(["convergence", "--system", str(tiny_system), "--variant", "baseline:1", "--variant", "fused:1",
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


def test_each_training_gets_a_share_of_the_cores_unless_omp_num_threads_is_set():
    # convergence's side-by-side trainings take distributed's rule for ranks
    assert cores_share_env(2, 8, environ={}) == {"OMP_NUM_THREADS": "4"}
    assert cores_share_env(3, 2, environ={}) == {"OMP_NUM_THREADS": "1"}
    assert cores_share_env(1, 8, environ={"OMP_NUM_THREADS": "1"}) == {}  # the user's (or the suite's) setting stands


def test_a_time_budget_too_short_for_any_run_records_them_not_started(tiny_system, tmp_path, capsys):
    rc = main.main(["convergence", "--system", str(tiny_system), "--variant", "baseline:2", "--variant", "fused:1",
                    "--steps", "40", "--device", "cpu", "--time-budget", "5", "--out-dir", str(tmp_path),
                    "--work-dir", str(tmp_path / "work")])
    assert rc == 0, capsys.readouterr()
    [rec] = store.load_records(tmp_path)
    assert [r.status for r in rec.runs] == ["not started"] * 3 and rec.verdict == "incomplete"
    assert all("time budget" in r.error for r in rec.runs)


def test_a_proof_split_over_two_calls_reuses_the_first_calls_baseline_seeds(tiny_system, tmp_path, capsys):
    """Call 1 trains the baseline seeds alone; call 2 trains fused against them (--baseline-from),
    as a 10,000-step proof is split when upstream's seeds fill a whole GPU call; a third call of
    another length is refused before it trains."""
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["--system", str(tiny_system), "--device", "cpu", "--out-dir", str(out), "--work-dir", str(work)]
    assert main.main(["convergence", "--variant", "baseline:1", "--steps", "30", *common]) == 0
    [first] = store.load_records(out)
    assert [r.variant for r in first.runs] == ["baseline"] and first.verdict == "incomplete"
    assert first.input_sha256 and set(first.builds) == {"baseline"}
    capsys.readouterr()
    assert main.main(["convergence", "--variant", "fused:1", "--steps", "30", "--baseline-from", str(first.path),
                      *common]) == 0
    assert "baseline seeds from sweeps " + first.sweep_id in capsys.readouterr().out
    second = next(r for r in store.load_records(out) if r.sweep_id != first.sweep_id)
    assert second.baseline_from == [first.sweep_id] and second.input_sha256 == first.input_sha256
    assert [(r.variant, r.sweep_id) for r in second.runs] == [("baseline", first.sweep_id), ("fused", second.sweep_id)]
    assert second.runs[0].lcurve.rmse_f_val == first.runs[0].lcurve.rmse_f_val  # the same seed, not retrained
    assert second.runs[1].status == "ok" and second.runs[1].dp_test["rmse_f"] > 0
    rc = main.main(["convergence", "--variant", "fused:1", "--steps", "20", "--baseline-from", str(first.path), *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "its steps is 30, this run's is 20" in err[-1], err
    assert len(store.load_records(out)) == 2  # the refused call wrote nothing
    # one more baseline seed, trained later (its own call), and the proof judged again with it:
    # the fused training as it was, nothing retrained, a new record beside the old one
    assert main.main(["convergence", "--variant", "baseline:1", "--seed", "11", "--steps", "30", *common]) == 0
    third = next(r for r in store.load_records(out) if r.sweep_id not in (first.sweep_id, second.sweep_id))
    before = second.path.read_bytes()
    capsys.readouterr()
    assert main.main(["convergence", "--rejudge", str(second.path), "--baseline-from", str(third.path),
                      "--out-dir", str(out)]) == 0
    again = next(r for r in store.load_records(out) if r.rejudged_from == second.sweep_id)
    assert [(r.variant, r.seed, r.sweep_id) for r in again.runs] == [
        ("baseline", 10, first.sweep_id), ("baseline", 11, third.sweep_id), ("fused", 10, second.sweep_id)]
    assert again.runs[2].lcurve.rmse_f_val == second.runs[1].lcurve.rmse_f_val
    assert again.baseline_from == [first.sweep_id, third.sweep_id]
    # two baseline seeds are no band (the rule's control, docs/accuracy.md): judged, and said so
    assert again.verdict == "incomplete" and "needs >= 3 finished baseline seeds" in again.checks["fused"]["reasons"][0]
    assert second.verdict == "incomplete" and second.path.read_bytes() == before  # the old record as it was
    assert ConvergenceRecord.from_json(again.path).to_dict() == again.to_dict()
    # one at a time, the cores would be each training's: the suite's one OpenMP thread reached
    # them instead, so the fork server served them (above one, upstream's import starts threads,
    # a fork is not safe, and every training imported torch and deepmd anew)
    if os.environ.get("DPH_FORK_SERVER", "0") != "0":  # (DPH_FORK_SERVER=0 make test: every child plain)
        for d in work.iterdir():
            assert json.loads((d / "steps.json").read_text()).get("launcher") == "fork server", d
    # a seed already in the record is refused, in one line, nothing written
    n = len(store.load_records(out))
    rc = main.main(["convergence", "--rejudge", str(second.path), "--baseline-from", str(first.path), "--out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "baseline seed 10 is in another record too" in err[-1] and len(store.load_records(out)) == n
