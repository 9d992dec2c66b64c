"""The proof over a full training, without training: the rule (band, dp test, missing rows), the
time-to-RMSE figure, the record's round trip, the CLI's bad input, the report's Training section."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from harness.cli import main
from harness.core.convergence_records import SCHEMA, ConvergenceRecord, ConvergenceRun, LcurveRows
from harness.core.records import BadRecord
from harness.judge import convergence_rule as rule
from harness.results import convergence as store
from harness.run import convergence

STEPS = 10000
ROWS = np.arange(0, STEPS + 1, 100)


def curve(seed: int, scale: float = 1.0, noise: float = 0.15) -> dict[str, list]:
    """A decaying learning curve with multiplicative per-row noise, as lcurve's val columns are."""
    rng = np.random.default_rng(seed)
    decay = np.exp(-ROWS / 3000.0)
    e = scale * (0.05 * decay + 0.002) * np.exp(rng.normal(0, noise, ROWS.size))
    f = scale * (1.0 * decay + 0.04) * np.exp(rng.normal(0, noise, ROWS.size))
    return {"step": ROWS.tolist(), "rmse_e_val": e.tolist(), "rmse_f_val": f.tolist()}


def finals(e: float, f: float) -> dict[str, float]:
    return {"rmse_e_per_atom": e, "rmse_f": f}


BASE = {10: curve(10), 11: curve(11), 12: curve(12)}  # rule.MIN_BASELINE_SEEDS
BASE_FINAL = {10: finals(0.0021, 0.041), 11: finals(0.0023, 0.043), 12: finals(0.0022, 0.042)}


def test_smooth_is_a_trailing_geometric_mean_and_skips_missing_rows():
    sm = rule.smooth([0, 1, 2, 3], [1.0, None, 100.0, float("nan")], window=3)
    assert sm == {0: 1.0, 2: pytest.approx(10.0)}  # rows 1 and 3 neither get a value nor enter one
    # the window is in steps (intervals x the row gap): a hole shortens it, it does not reach back
    assert rule.smooth([0, 1, 2, 3], [1.0, None, 100.0, float("nan")], window=2)[2] == pytest.approx(100.0)


def test_a_seed_of_the_same_training_passes():
    v = rule.evaluate(BASE, {10: curve(20), 11: curve(21), 12: curve(22)}, BASE_FINAL,
                      {s: finals(0.0022, 0.042) for s in (10, 11, 12)}, STEPS)
    assert v.verdict == "pass", v.reasons
    assert len(v.bands) == 6 and all(b.rows == 90 for b in v.bands)  # rows after the first 10 %
    assert v.spread_source["rmse_f_val"] == "baseline seeds' own spread"


def test_a_curve_outside_the_band_fails():
    v = rule.evaluate(BASE, {10: curve(20, scale=1.6)}, BASE_FINAL, {10: finals(0.0022, 0.042)}, STEPS)
    assert v.verdict == "fail"
    assert any(b.metric == "rmse_f_val" and not b.ok for b in v.bands)


def test_a_late_divergence_fails_through_the_final_dp_test():
    v = rule.evaluate(BASE, {10: curve(20)}, BASE_FINAL, {10: finals(0.0022, 0.08)}, STEPS)
    assert v.verdict == "fail"
    assert [f.metric for f in v.finals if not f.ok] == ["rmse_f"]


def test_missing_rows_are_skipped_and_a_seed_without_rows_fails():
    holed = curve(20)
    for i in range(20, 40):
        holed["rmse_f_val"][i] = None
    v = rule.evaluate(BASE, {10: holed}, BASE_FINAL, {10: finals(0.0022, 0.042)}, STEPS)
    assert v.verdict == "pass", v.reasons
    assert next(b for b in v.bands if b.metric == "rmse_f_val").rows < 90
    empty = {"step": [], "rmse_e_val": [], "rmse_f_val": []}
    v = rule.evaluate(BASE, {10: empty}, BASE_FINAL, {10: finals(0.0022, 0.042)}, STEPS)
    assert v.verdict == "fail"
    v = rule.evaluate(BASE, {10: curve(20)}, BASE_FINAL, {}, STEPS)  # no dp test
    assert v.verdict == "fail"


def test_one_or_two_baseline_seeds_are_incomplete():
    v = rule.evaluate({10: BASE[10]}, {10: curve(20)}, BASE_FINAL, {10: finals(0.0022, 0.042)}, STEPS)
    assert v.verdict == "incomplete"
    two = {s: BASE[s] for s in (10, 11)}
    v = rule.evaluate(two, {10: curve(20)}, BASE_FINAL, {10: finals(0.0022, 0.042)}, STEPS)
    assert v.verdict == "incomplete" and "needs >= 3 finished baseline seeds" in v.reasons[0]


def test_the_control_holds_each_baseline_seed_out():
    four = {**BASE, 13: curve(13)}
    four_final = {**BASE_FINAL, 13: finals(0.0022, 0.042)}
    held = rule.control(four, four_final, STEPS)
    assert sorted(held) == [10, 11, 12, 13] and all(v.verdict == "pass" for v in held.values())
    assert rule.control(BASE, BASE_FINAL, STEPS) == {}  # three seeds: none to spare
    odd = {**BASE, 13: curve(13, scale=1.6)}  # one "baseline" seed that trained differently
    held = rule.control(odd, four_final, STEPS)
    assert held[13].verdict == "fail"


def test_a_failed_control_makes_the_proof_incomplete():
    runs = [_run("baseline", s, c) for s, c in BASE.items()] + [_run("baseline", 13, curve(13, scale=1.6))]
    runs += [_run("fused", 10, curve(20))]
    verdict, checks, _, control = convergence.judge(runs, STEPS)
    assert control["verdict"] == "fail" and control["seeds"]["13"]["verdict"] == "fail"
    assert verdict == "incomplete"
    verdict, _, _, control = convergence.judge([r for r in runs if r.seed != 13 or r.variant != "baseline"]
                                               + [_run("baseline", 13, curve(13))], STEPS)
    assert control["verdict"] == "pass" and verdict == "pass"


def test_the_rules_control_on_the_committed_h100_records():
    """Issue 41's control (H100, water, 4000 steps): four upstream seeds, each passes the rule
    against the other three; with only two of them in the band upstream fails its own rule in
    most combinations (why the rule asks for three); broken-lr (half upstream's learning rate)
    fails; broken-force (descriptor x (1 + 1e-6), a same-weights parity fault) is below what any
    training curve shows and passes -- it is caught by parity, not by this rule."""
    import itertools
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "results" / "convergence"
    rec = ConvergenceRecord.from_json(root / "20261206T080829Z-edd480-water.json")
    base = [r for r in rec.runs if r.variant == "baseline"]
    assert len(base) == 4 and rec.card.startswith("NVIDIA H100")
    verdict, checks, _, control = convergence.judge(rec.runs, rec.steps)
    assert control["verdict"] == "pass" and verdict == "pass"
    assert checks["fused"]["verdict"] == "pass" and checks["broken-force"]["verdict"] == "pass"
    curves = {r.seed: r.lcurve.to_dict() for r in base}
    fin = {r.seed: r.dp_test for r in base}
    pairs = [rule.evaluate({s: curves[s] for s in (a, b)}, {k: curves[k]}, {s: fin[s] for s in (a, b)},
                           {k: fin[k]}, rec.steps).verdict
             for k in curves for a, b in itertools.combinations(sorted(set(curves) - {k}), 2)]
    assert pairs.count("incomplete") == 12  # two seeds are no band under the rule now
    lr = ConvergenceRecord.from_json(root / "20261206T082122Z-eb44b4-water.json")
    verdict, checks, _, control = convergence.judge(lr.runs, lr.steps)
    assert checks["broken-lr"]["verdict"] == "fail" and control["verdict"] == "pass" and verdict == "fail"
    (blr,) = [r for r in lr.runs if r.variant == "broken-lr"]
    assert blr.lcurve.lr[0] == pytest.approx(0.5 * base[0].lcurve.lr[0])  # what the variant changes, and only that


def test_broken_lr_manifest_says_test_only() -> None:
    from harness.prepare import variants

    v = variants.load_variant("broken-lr")
    assert "TEST-ONLY" in v.description and "NEVER SHIP" in v.description and v.overrides == {}


def test_final_band_uses_a_calibrated_threshold_when_given():
    lo, hi, src = rule.final_band([1.0, 1.1], rel_tol=0.5)
    assert (lo, hi) == (0.5, pytest.approx(1.65)) and "calibrated" in src
    lo, hi, _ = rule.final_band([1.0, 1.1])
    rel = rule.K_FINAL * 0.1 / 1.05
    assert (lo, hi) == (pytest.approx(1 - rel), pytest.approx(1.1 * (1 + rel)))


def test_time_to_rmse_is_the_wall_time_of_the_first_smoothed_row_at_the_target():
    steps = list(range(0, 50, 10))
    vals = [8.0, 4.0, 2.0, 1.0, 1.0]
    wall = rule.wall_at_steps(5.0, [0.5] * 40, steps)
    assert wall == {0: 5.0, 10: 10.0, 20: 15.0, 30: 20.0, 40: 25.0}
    # smoothed with window 10: geometric means 8, sqrt(32), 4, 2^1.5, 2^1.2
    assert rule.time_to_rmse(steps, vals, wall, 2 ** 1.5 + 1e-9) == 20.0
    assert rule.time_to_rmse(steps, vals, wall, 0.5) is None
    assert rule.target_rmse({1: {"step": steps, "rmse_f_val": vals}}) == pytest.approx(2 ** 1.2)


def test_learning_rate_follows_upstreams_rule():
    from harness.prepare import systems

    s = convergence.scaled_input(systems.load_system("water"), 10000)
    lr = s.input["learning_rate"]
    assert lr["decay_steps"] == 100 and lr["start_lr"] == 1e-3 and lr["stop_lr"] == 3.51e-8
    assert s.input["training"]["disp_freq"] == 100
    assert convergence.upstream_default_decay_steps(40) == 1
    assert systems.load_system("water").input["learning_rate"]["decay_steps"] == 5000  # not mutated


def _run(v: str, seed: int, c: dict) -> ConvergenceRun:
    wall = [1.0 + s * 0.01 for s in c["step"]]
    return ConvergenceRun(variant=v, seed=seed, status="ok", wall_s=120.0, step_ms_median=1.1,
                          concurrent=2, dp_test=finals(0.0022, 0.042),
                          lcurve=LcurveRows(step=c["step"], rmse_e_val=c["rmse_e_val"],
                                            rmse_f_val=c["rmse_f_val"], lr=[1e-3] * len(c["step"]), wall_s=wall))


def _record() -> ConvergenceRecord:
    runs = [_run(v, seed, c) for v, seed, c in [("baseline", 10, BASE[10]), ("baseline", 11, BASE[11]),
                                                ("baseline", 12, BASE[12]), ("fused", 10, curve(20))]]
    runs.append(ConvergenceRun(variant="fused", seed=11, status="not started", error="time budget"))
    verdict, checks, ttr, _ = convergence.judge(runs, STEPS)
    return ConvergenceRecord(schema=SCHEMA, sweep_id="20261204T000000Z-abcdef", system="water", steps=STEPS,
                             device="cuda", card="NVIDIA H200", parallel=3, rule=rule.RULE_TEXT,
                             verdict=verdict, checks=checks, time_to_rmse=ttr, runs=runs)


def test_judge_and_record_round_trip(tmp_path):
    rec = _record()
    assert rec.verdict == "pass", rec.checks
    assert rec.time_to_rmse["by_variant"]["fused"]["10"] is not None
    path = store.write(rec, tmp_path)
    back = ConvergenceRecord.from_json(path)
    assert back.to_dict() == json.loads(path.read_text())
    assert back.runs[3].lcurve.rmse_f_val == rec.runs[3].lcurve.rmse_f_val and back.runs[4].status == "not started"
    assert [r.sweep_id for r in store.load_records(tmp_path)] == [rec.sweep_id]
    (tmp_path / "junk.json").write_text("{")
    warned = []
    assert len(store.load_records(tmp_path, warn=warned.append)) == 1 and "junk.json" in warned[0]
    with pytest.raises(BadRecord):
        ConvergenceRecord.from_json(tmp_path / "junk.json")


@pytest.mark.parametrize("argv, says", [
    (["--variant", "fused:3", "--steps", "40"], "baseline"),
    (["--variant", "baseline:2", "--variant", "fused", "--steps", "40", "--baseline-from", "x.json"], "not both"),
    (["--variant", "fused", "--steps", "40", "--baseline-from", "no-such-record.json"], "unreadable"),
    (["--variant", "baseline:x", "--variant", "fused", "--steps", "40"], "integer"),
    (["--variant", "baseline:2", "--variant", "fused", "--steps", "40", "--parallel", "0"], "--parallel"),
    (["--variant", "baseline:2", "--variant", "fused", "--steps", "1"], "--steps"),
    (["--variant", "baseline:2", "--variant", "nosuch", "--steps", "40", "--device", "cpu"], "nosuch"),
    (["--variant", "baseline:2", "--variant", "fused", "--steps", "40", "--time-budget", "-1"], "--time-budget"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, tmp_path, capsys):
    rc = main.main(["convergence", "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                    "--work-dir", str(tmp_path / "work"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "out").exists()


def test_report_training_section_renders(tmp_path):
    from harness.report import render

    rec = _record()
    store.write(rec, tmp_path / "conv")
    out = render.write_report(tmp_path / "runs", tmp_path / "report" / "index.html",
                              convergence_dir=tmp_path / "conv")
    html = out.read_text()
    assert 'id="training"' in html and "PASS" in html and "data:image/png;base64," in html
    assert "Wall time to the baseline seeds' final force RMSE" in html and "not started" in html
    assert math.isfinite(rec.time_to_rmse["target"])


def test_report_shows_a_split_proof_once_with_its_baseline_sweeps(tmp_path):
    from harness.report import training

    half = dataclasses.replace(_record(), sweep_id="20261204T000001Z-aaaaaa",
                               runs=[r for r in _record().runs if r.variant == "baseline"])
    proof = dataclasses.replace(_record(), sweep_id="20261204T000002Z-bbbbbb", baseline_from=[half.sweep_id])
    proof.runs[0].sweep_id = half.sweep_id
    secs = training.sections([proof, half])
    assert [s["sweep"] for s in secs] == [proof.sweep_id] and secs[0]["baseline_from"] == half.sweep_id
    assert secs[0]["runs"][0]["sweep"] == half.sweep_id and secs[0]["runs"][2]["sweep"] == proof.sweep_id
    assert [s["sweep"] for s in training.sections([half])] == [half.sweep_id]  # alone it is shown


def test_a_calibration_of_this_length_sets_the_final_band(tmp_path, monkeypatch):
    from harness.judge import calibration

    assert convergence.calibrated_final_tol("water", "cuda", 12345) is None  # none at this length
    monkeypatch.setattr(calibration, "CALIBRATION", tmp_path)
    monkeypatch.setattr(calibration.calibration_path, "__defaults__", (tmp_path, "baseline"))
    (tmp_path / "water-cuda-12345.json").write_text(json.dumps(
        {"thresholds": {"float64": {"rmse_e_per_atom": 0.2, "rmse_f": 0.05}}}))
    tol = convergence.calibrated_final_tol("water", "cuda", 12345)
    assert tol == {"rmse_e_per_atom": 0.2, "rmse_f": 0.05}
    rec = _record()
    verdict, checks, _, _ = convergence.judge(rec.runs, STEPS, tol)
    assert "calibrated" in checks["fused"]["spread_source"]["rmse_f"]
    assert (checks["fused"]["seeds_finished"], checks["fused"]["seeds_planned"]) == (1, 2)


def _system(tmp_path, lr=None):
    from harness.core.records import System

    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "type.raw").write_text("0 1 1\n")
    inp = {"learning_rate": lr or {"type": "exp", "start_lr": 1e-3, "stop_lr": 3.51e-8, "decay_steps": 100},
           "training": {"training_data": {"systems": [str(data)]}, "validation_data": {"systems": [str(data)]}}}
    return System(name="water", directory=tmp_path, type_map=("O", "H"), atoms_per_frame=3, train=(data,),
                  validation=(data,), input=inp, spec={})


def test_baseline_seeds_are_reused_only_from_the_same_training(tmp_path):
    system = _system(tmp_path)
    ident = convergence.training_identity(system)
    moved = _system(tmp_path / "elsewhere")  # the same input and data in another folder: the same training
    assert convergence.training_identity(moved) == ident
    rec = _record()
    rec.learning_rate, rec.input_sha256, rec.builds = system.input["learning_rate"], ident, {"baseline": "b1"}
    path = store.write(rec, tmp_path / "conv")
    old = convergence.read_baseline_record(path)
    got = convergence.reused_baseline(old, system, STEPS, "cuda", "NVIDIA H200", "b1", ident)
    assert [(r.variant, r.seed, r.sweep_id) for r in got] == [("baseline", s, rec.sweep_id) for s in (10, 11, 12)]
    for args, says in [((STEPS, "cuda", "NVIDIA H200", "b2", ident), "baseline build"),
                       ((5000, "cuda", "NVIDIA H200", "b1", ident), "steps"),
                       ((STEPS, "cuda", "NVIDIA A100", "b1", ident), "card"),
                       ((STEPS, "cuda", "NVIDIA H200", "b1", "0" * 64), "input_sha256")]:
        with pytest.raises(convergence.UserError, match=says):
            convergence.reused_baseline(old, system, *args)
    (tmp_path / "data" / "type.raw").write_text("1 0 1\n")  # other labels: another training
    assert convergence.training_identity(system) != ident
    other_lr = _system(tmp_path, {"type": "exp", "start_lr": 2e-3, "stop_lr": 3.51e-8, "decay_steps": 100})
    with pytest.raises(convergence.UserError, match="learning_rate"):
        convergence.reused_baseline(old, other_lr, STEPS, "cuda", "NVIDIA H200", "b1", ident)
    one, two = (store.write(dataclasses.replace(rec, sweep_id=f"20261204T00000{i}Z-abcdef",
                                                runs=[r for r in rec.runs if r.seed == seed]), tmp_path / "split")
                for i, seed in ((1, 10), (2, 11)))
    olds = [convergence.read_baseline_record(p) for p in (one, two)]
    got = convergence.reused_baselines(olds, system, STEPS, "cuda", "NVIDIA H200", "b1", ident, log=lambda m: None)
    assert [(r.seed, r.sweep_id) for r in got] == [(10, "20261204T000001Z-abcdef"), (11, "20261204T000002Z-abcdef")]
    with pytest.raises(convergence.UserError, match="seed 10 is in another record"):
        convergence.reused_baselines([olds[0], olds[0]], system, STEPS, "cuda", "NVIDIA H200", "b1", ident)
    rec.runs = [r for r in rec.runs if r.variant != "baseline"]
    with pytest.raises(convergence.UserError, match="no finished baseline"):
        convergence.reused_baseline(convergence.read_baseline_record(store.write(rec, tmp_path / "c2")),
                                    system, STEPS, "cuda", "NVIDIA H200", "b1", ident)


def test_rejudge_without_new_seeds_only_under_a_changed_rule(tmp_path):
    rec = _record()
    rec.rule = "an older rule"
    old = store.write(rec, tmp_path)
    again = convergence.rejudge(old, [], tmp_path, log=lambda m: None)
    assert again.rejudged_from == rec.sweep_id and again.rule == rule.RULE_TEXT and again.verdict == "pass"
    assert [r.seed for r in again.runs if r.variant == "baseline"] == [10, 11, 12]
    with pytest.raises(convergence.UserError, match="judged by the rule in force already"):
        convergence.rejudge(again.path, [], tmp_path, log=lambda m: None)
