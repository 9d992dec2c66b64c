"""The accuracy gate (harness/judge: gate, processes, parity, calibration): it must FAIL a deliberately broken variant and PASS the
baseline run as a variant and upstream's fp32 override under the float32 class.

The slow tests train a tiny water system (tests/conftest.py) for 5 steps on CPU through the real
pipeline (bench.run -> train -> accuracy stage: dp test with the baseline build, same-weights
and one-step parity in subprocesses). One sweep is shared by the module (~80 s on 2 cores), the
baseline-as-variant run adds one more training (~35 s). The pure tests cover parsing, the
calibration arithmetic and file lookup.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from harness.cli import calibrate
from harness.core import fsutil
from harness.core.errors import RunFailed
from harness.judge import calibration, gate, parity, processes
from harness.run import bench
from harness.run import train
from harness.core.records import RunRecord, RunSpec
from harness.run import timing as timing_mod

STEPS = 5


# ---------------------------------------------------------------- pure tests

DP_TEST_LOG = """\
[x] DEEPMD INFO    # ---------------output of dp test---------------
[x] DEEPMD INFO    Energy RMSE/Natoms : 9.000000e+00 eV
[x] DEEPMD INFO    Force  RMSE        : 9.000000e+00 eV/Å
[x] DEEPMD INFO    # ----------weighted average of errors-----------
[x] DEEPMD INFO    # number of systems : 2
[x] DEEPMD INFO    Energy MAE         : 1.3e+02 eV
[x] DEEPMD INFO    Energy RMSE        : 1.325040e+02 eV
[x] DEEPMD INFO    Energy RMSE/Natoms : 6.901251e-01 eV
[x] DEEPMD INFO    Force  RMSE        : 8.415861e-01 eV/Å
[x] DEEPMD INFO    Virial RMSE        : 3.0e+00 eV
[x] DEEPMD INFO    Virial RMSE/Natoms : 1.500000e-02 eV
"""


def test_parse_dp_test_takes_the_weighted_average_block() -> None:
    d = processes.parse_dp_test(DP_TEST_LOG)
    assert d == {"rmse_e_per_atom": 0.6901251, "rmse_f": 0.8415861, "rmse_v": 0.015}
    no_virial = DP_TEST_LOG.replace("Virial RMSE/Natoms : 1.500000e-02 eV", "")
    assert processes.parse_dp_test(no_virial)["rmse_v"] is None
    with pytest.raises(RuntimeError):
        processes.parse_dp_test("Traceback: boom")


def test_threshold_admits_two_draws_at_the_upper_bound_of_the_seed_spread() -> None:
    st = calibration.summarise([1.0, 1.1, 0.9])
    assert st["mean"] == pytest.approx(1.0) and st["std"] == pytest.approx(0.1)
    # 3 seeds: the 95 % upper bound on sigma is 4.4x the sample std
    assert calibration.std_upper_bound(st) == pytest.approx(0.1 * (2 / 0.1026) ** 0.5)
    assert calibration.derive_threshold(st) == pytest.approx(2.576 * 2 ** 0.5 * 0.1 * (2 / 0.1026) ** 0.5)
    # more seeds, same sample std: a tighter gate
    st8 = dict(st, n=8)
    assert calibration.derive_threshold(st8) < calibration.derive_threshold(st) / 2
    # the observed range is a floor under the statistic
    st = calibration.summarise([1.0] * 9 + [2.0])
    assert calibration.derive_threshold(st) == pytest.approx(
        max(2.576 * 2 ** 0.5 * calibration.std_upper_bound(st) / 1.1, 1.0 / 1.1))
    assert calibration.derive_threshold(calibration.summarise([1.0, 1.0, 1.0])) == 0.0
    assert calibration.derive_threshold(calibration.summarise([1.0, 1.0, 1.0]), offset=0.2) == 0.2


def test_chi2_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k in list(range(1, 16)) + [20, 40, 100]:
        assert calibration.chi2_lower_05(k) == pytest.approx(stats.chi2.ppf(0.05, k), rel=0.01), k


def test_a_correct_variant_rarely_fails_the_calibrated_gate() -> None:
    """Monte Carlo of the gate itself: calibrate on n seeds, then judge one more draw against a
    baseline draw, all from one normal distribution (a correct variant). The false-fail rate
    must stay near the design 1 %, for 3 seeds as for 8 (the old rule, max(3*std, range), failed
    17 % of correct variants with 3 seeds and 6.5 % with 8)."""
    rng = np.random.default_rng(0)
    for n in (3, 8):
        fails = 0
        trials = 4000
        for _ in range(trials):
            seeds = rng.normal(1.0, 0.01, n)
            t = calibration.derive_threshold(calibration.summarise(list(seeds)))
            a, b = rng.normal(1.0, 0.01, 2)
            fails += abs(a - b) / b > t
        assert fails / trials < 0.02, (n, fails / trials)


def _cal_runs(f64: list[float], f32: list[float]) -> dict:
    mk = lambda vals, v: [{"seed": i + 1, "variant": v, "dp_test": {"rmse_e_per_atom": x, "rmse_f": x,
                                                                  "rmse_v": None}}
                          for i, x in enumerate(vals)]
    return {"float64": mk(f64, "baseline"), "float32": mk(f32, "fp32")}


def test_calibration_file_thresholds_lookup_and_verdict(tmp_path: Path) -> None:
    cal = calibration.build_calibration("tiny", "cpu", 50, _cal_runs([1.0, 1.02, 0.98], [1.5, 1.0, 1.0]), 20)
    th = cal["thresholds"]
    st = calibration.summarise([1.0, 1.02, 0.98])
    assert th["float64"]["rmse_f"] == pytest.approx(2.576 * 2 ** 0.5 * calibration.std_upper_bound(st))
    assert "rmse_v" not in th["float64"]  # no virial labels: no virial threshold
    # float32 also admits what upstream's fp32 override changes at the same seed (seed 1: 50 %)
    st32 = calibration.summarise([1.5, 1.0, 1.0])
    assert th["float32"]["rmse_f"] == pytest.approx(
        max(2.576 * 2 ** 0.5 * calibration.std_upper_bound(st32) / (3.5 / 3), 0.5 / (3.5 / 3), 0.5))
    fsutil.atomic_write_json(calibration.calibration_path("tiny", "cpu", 50, tmp_path), cal)
    got, note = calibration.find_calibration("tiny", "cpu", 50, tmp_path)
    assert got["steps"] == 50 and "nearest" not in note
    got, note = calibration.find_calibration("tiny", "cpu", 60, tmp_path)
    assert got["steps"] == 50 and "nearest: 50 steps, none at 60" in note
    got, note = calibration.find_calibration("tiny", "cuda", 50, tmp_path)
    assert got is None and note == "no seed-spread calibration for tiny"
    base = {"rmse_e_per_atom": 1.0, "rmse_f": 1.0, "rmse_v": None}
    assert calibration.dp_test_verdict({"rmse_e_per_atom": 1.05, "rmse_f": 0.96, "rmse_v": None}, base, cal, "float64")[0] == []
    bad, _ = calibration.dp_test_verdict({"rmse_e_per_atom": 1.0, "rmse_f": 1.5, "rmse_v": None}, base, cal, "float64")
    assert len(bad) == 1 and "rmse_f" in bad[0]
    bad, note = calibration.dp_test_verdict({"rmse_e_per_atom": 1.0, "rmse_f": 1.5, "rmse_v": None}, base, cal, "mixed")
    assert bad == [] and "mixed uncalibrated" in note


def test_compare_eval_and_step_relative_errors() -> None:
    rng = np.random.default_rng(0)
    ref = {"energy": rng.normal(size=2), "force": rng.normal(size=(2, 5, 3)), "virial": rng.normal(size=(2, 9))}
    var = {k: v.copy() for k, v in ref.items()}
    var["force"][0, 0, 0] += 1e-7 * np.abs(ref["force"]).max()
    par = parity.compare_eval(ref, var, 1e-10)
    assert par["max_rel_e"] == 0 and par["max_rel_f"] == pytest.approx(1e-7)
    par.update({"step_update_max_rel": 0.0, "step_grad_max_rel": 0.0})
    assert parity.parity_verdict(par, "float32") == []
    assert parity.parity_verdict(par, "float64") and "f rel" in parity.parity_verdict(par, "float64")[0]
    var["force"][1, 1, 1] = np.nan
    assert not parity.parity_verdict(parity.compare_eval(ref, var, 1e-5) | {"step_update_max_rel": None}, "mixed") == []
    # step: an element whose gradient is ~eps (Adam-ill-conditioned) is judged by the gradient only
    g = np.array([1.0, 1e-9, -0.5])
    up = np.array([-1e-3, -1e-4, 1e-3])
    r = {"upd/w": up, "grad/w": g}
    v = {"upd/w": up + np.array([0, 5e-4, 0]), "grad/w": g + np.array([0, 1e-9, 0])}
    st = parity.compare_step(r, v)
    assert st["step_update_max_rel"] == 0 and st["step_update_masked"] == 1
    assert st["step_grad_max_rel"] == pytest.approx(1e-9)
    v["grad/w"] = g * 1.5  # a wrong backward
    assert parity.compare_step(r, v)["step_grad_max_rel"] == pytest.approx(0.5)
    # reduced precision: a small gradient element changes sign within the class's gradient
    # tolerance and Adam's first update flips (2 lr); judged by the gradient, not the update
    g = np.array([1.0, 2e-4, -0.5])
    r = {"upd/w": -1e-3 * np.sign(g), "grad/w": g}
    v = {"upd/w": -1e-3 * np.sign(g * [1, -1, 1]), "grad/w": g * [1, -1, 1]}
    assert parity.compare_step(r, v)["step_update_max_rel"] == pytest.approx(2.0)  # float64: caught
    st = parity.compare_step(r, v, parity.TOLERANCE["mixed"])
    assert st["step_update_max_rel"] == 0 and st["step_update_masked"] == 1
    assert st["step_grad_max_rel"] == pytest.approx(4e-4) and parity.parity_verdict(
        {"max_rel_e": 0, "max_rel_f": 0, "max_rel_v": 0, **st}, "mixed") == []
    # a flipped LARGE element is still a failure at the same class
    v = {"upd/w": -1e-3 * np.sign(g * [1, 1, -1]), "grad/w": g * [1, 1, -1]}
    st = parity.compare_step(r, v, parity.TOLERANCE["mixed"])
    assert st["step_update_max_rel"] == pytest.approx(2.0) and parity.parity_verdict(
        {"max_rel_e": 0, "max_rel_f": 0, "max_rel_v": 0, **st}, "mixed")


def test_broken_force_manifest_says_test_only() -> None:
    from harness.prepare import variants

    v = variants.load_variant("broken-force")
    assert "TEST-ONLY" in v.description and "NEVER SHIP" in v.description
    assert v.accuracy_class == "float64"


# ---------------------------------------------------------------- real runs (slow)

@pytest.fixture(scope="module")
def sweep(tiny_system: Path, tmp_path_factory):
    """One sweep: baseline, fp32, broken-force, fused-bf16, with the real accuracy stage. Returns
    (rows, records) -- records as the stage saw them, for follow-up runs."""
    tmp = tmp_path_factory.mktemp("acc")
    seen: list[RunRecord] = []
    judge = gate.stage(strict=True, calibration_dir=tmp / "nocal")  # isolated from results/calibration

    def capture(rec, previous):
        res = judge(rec, previous)
        seen.append(rec)
        return res

    req = bench.BenchRequest(system=str(tiny_system), variants=["baseline", "fp32", "broken-force", "fused-bf16"],
                             steps=STEPS, device="cpu", seed=7, runs_dir=tmp / "runs", work_root=tmp / "work",
                             gate_jobs=2)  # the deferred, concurrent gates (what GPU sweeps use)
    rows = bench.run(req, log=lambda m: None, accuracy_stage=capture)
    assert [r.status for r in rows] == ["ok"] * 4, [r.error for r in rows]
    order = [r.run_id for r in rows]
    seen.sort(key=lambda rec: order.index(rec.run.run_id))  # the gates ran concurrently
    return rows, seen, tmp


@pytest.mark.slow
def test_baseline_run_is_the_reference(sweep) -> None:
    rows, _, _ = sweep
    acc = rows[0].accuracy
    assert acc.verdict == "baseline"
    dp = acc.dp_test
    assert dp["rmse_v"] is None  # water has no virial labels
    assert 0 < dp["rmse_e_per_atom"] < 100 and 0 < dp["rmse_f"] < 100


def _gated(rows, i: int, variant: str, verdict: str, parity_class: str, tolerance: float):
    """(accuracy, parity) of row i, checked to be `variant`'s with `verdict` under `parity_class`'s
    `tolerance`."""
    acc = rows[i].accuracy
    assert rows[i].variant == variant
    assert acc.verdict == verdict, acc.detail
    par = acc.parity
    assert par["class"] == parity_class and par["tolerance"] == tolerance
    return acc, par


@pytest.mark.slow
def test_gate_fails_the_broken_variant(sweep) -> None:
    rows, _, _ = sweep
    acc, par = _gated(rows, 2, "broken-force", "fail", "float64", 1e-10)
    # a 1e-6 perturbation of the descriptor: forces and the backward are off by orders of magnitude
    assert par["max_rel_f"] > 1e-8 and par["step_grad_max_rel"] > 1e-8
    assert "f rel" in acc.detail
    # and the results JSON carries it
    saved = json.loads(Path(rows[2].path).read_text())
    assert saved["accuracy"]["verdict"] == "fail"


@pytest.mark.slow
def test_gate_fails_a_bfloat16_descriptor_under_the_mixed_class(sweep) -> None:
    """The reduced-precision checks discriminate (issue 40): a legal override that trains (no NaN,
    unlike float16 without loss scaling) but rounds the descriptor to an 8-bit mantissa is failed
    by the mixed class's same-weights parity, on forces and on the training step."""
    rows, _, _ = sweep
    acc, par = _gated(rows, 3, "fused-bf16", "fail", "mixed", 1e-3)
    assert par["max_rel_f"] > 1e-3 and par["step_grad_max_rel"] > 1e-3
    assert "f rel" in acc.detail


@pytest.mark.slow
def test_gate_passes_fp32_under_the_float32_class(sweep) -> None:
    rows, _, _ = sweep
    acc, par = _gated(rows, 1, "fp32", "pass", "float32", 1e-5)
    # fp32 on fp64 weights really differs (it is not a no-op) but within the class tolerance
    assert 1e-9 < par["max_rel_f"] <= 1e-5
    assert par["step_update_max_rel"] <= 1e-3 and par["step_grad_max_rel"] <= 1e-3
    assert "no seed-spread calibration for tinywater" in acc.detail


@pytest.mark.slow
def test_gate_passes_baseline_run_as_a_variant(sweep) -> None:
    rows, seen, tmp = sweep
    base = seen[0]
    assert base.run.variant.name == "baseline"
    copy = dataclasses.replace(base.run.variant, name="baseline-as-variant")
    spec = RunSpec(run_id=base.run.run_id + "-copy", sweep_id=base.run.sweep_id, system=base.run.system,
                   variant=copy, steps=base.run.steps, device=base.run.device, seed=base.run.seed,
                   work_dir=tmp / "work" / "baseline-as-variant")
    tr = train.run_training(spec)
    assert tr.status == "ok", tr.error
    rec = RunRecord(run=spec, train=tr, timing=timing_mod.steady_state(tr.step_s, tr.clock, tr.startup_s, tr.wall_s),
                    environment={})
    acc = gate.stage(strict=True, calibration_dir=tmp / "nocal")(rec, seen)
    assert acc.verdict == "pass", acc.detail
    par = acc.parity
    # same build, same weights: bit-identical on CPU
    assert par["max_abs_f"] == 0 and par["max_abs_e"] == 0 and par["step_update_max_rel"] == 0
    # same seed, same code: dp test identical to the sweep baseline's
    assert acc.dp_test == rows[0].accuracy.dp_test
    # with a calibration whose thresholds are absurdly tight the dp test still agrees exactly
    cal = calibration.build_calibration(base.run.system.name, "cpu", STEPS, _cal_runs([1.0, 1.0 + 1e-9, 1.0], [1.0] * 3), 20)
    fsutil.atomic_write_json(calibration.calibration_path(base.run.system.name, "cpu", STEPS, tmp / "cal"), cal)
    acc2 = gate.stage(strict=True, calibration_dir=tmp / "cal")(rec, seen)
    assert acc2.verdict == "pass", acc2.detail
    assert f"calibration {base.run.system.name}-cpu-{STEPS}.json" in acc2.detail


@pytest.mark.slow
def test_gate_crash_is_a_fail_not_an_exception(sweep) -> None:
    _, seen, _ = sweep
    rec = seen[1]
    broken = dataclasses.replace(rec, train=dataclasses.replace(rec.train, checkpoint=None))
    acc = gate.stage()(broken, seen[:1])
    assert acc.verdict == "fail" and "accuracy gate error" in acc.detail and "checkpoint" in acc.detail


@pytest.mark.slow
def test_without_a_sweep_baseline_the_variant_is_not_judged(sweep) -> None:
    _, seen, tmp = sweep
    rec = seen[1]  # fp32, judged against no baseline
    lenient = gate.stage(strict=False, calibration_dir=tmp / "nocal")(rec, [])
    assert lenient.verdict is None and lenient.detail.startswith("not judged: no baseline run")
    assert lenient.dp_test and not math.isnan(lenient.dp_test["rmse_f"])


def test_multi_gpu_runs_are_judged_against_the_baseline_with_the_same_gpu_count() -> None:
    from types import SimpleNamespace as NS

    def rec(variant, gpus, status="ok"):
        run = NS(variant=NS(name=variant), system=NS(name="water"), seed=1, steps=200, sweep_id="s", gpus=gpus)
        return NS(run=run, train=NS(status=status, checkpoint=Path("x.pt")))

    b1, b2 = rec("baseline", 1), rec("baseline", 2)
    assert gate._find_baseline(rec("fused", 1), [b1, b2]) is b1
    assert gate._find_baseline(rec("fused", 2), [b1, b2]) is b2
    assert gate._find_baseline(rec("fused", 4), [b1, b2]) is b2  # none with 4: the latest
    assert gate._find_baseline(rec("fused", 1), [rec("baseline", 1, "failed")]) is None
    # a seed without a baseline (bench --upstream-once) is judged against the first seed's, still
    # by GPU count
    def seeded(variant, gpus, seed):
        r = rec(variant, gpus)
        r.run.seed = seed
        return r

    s1g1, s1g2, s2g1 = seeded("baseline", 1, 1), seeded("baseline", 2, 1), seeded("baseline", 1, 2)
    assert gate._find_baseline(seeded("fused", 2, 3), [s1g1, s1g2, s2g1]) is s1g2
    assert gate._find_baseline(seeded("fused", 1, 3), [s1g1, s1g2, s2g1]) is s1g1
    assert gate._find_baseline(seeded("fused", 1, 2), [s1g1, s1g2, s2g1]) is s2g1  # its own seed first


def test_a_multi_gpu_baseline_is_judged_against_the_one_gpu_baseline(monkeypatch, tmp_path) -> None:
    """bench --gpus 1,2: baseline-g1 is the reference; baseline-g2 (N times the frames) gets a
    verdict like a variant, and its parity reference is cached for the sweep's 2-GPU variants."""
    from types import SimpleNamespace as NS

    dp = {"rmse_e_per_atom": 0.1, "rmse_f": 0.5, "rmse_v": None}
    arrays = {"energy": np.ones(2), "force": np.ones((2, 3, 3)), "virial": np.ones((2, 9))}
    monkeypatch.setattr(gate, "baseline_tree", lambda prev=None: tmp_path)
    monkeypatch.setattr(gate, "start_dp_test", lambda *a, **k: (None, None))
    monkeypatch.setattr(gate, "finish_dp_test", lambda *a, **k: dict(dp))
    monkeypatch.setattr(gate, "start_parity_eval", lambda *a, **k: (None, None))
    monkeypatch.setattr(gate, "finish_parity_eval", lambda *a, **k: ({"load": "ok", "eval": True}, arrays))
    monkeypatch.setattr(gate, "start_reference", lambda base, tree: (None, None, None))
    cached: list[int] = []
    monkeypatch.setattr(gate, "load_reference",
                        lambda base, tree: (cached.append(base.run.gpus), ({"load": "ok"}, arrays))[1])
    monkeypatch.setattr(gate, "compare_step", lambda ref, var, tol=0.0: {})

    def rec(gpus):
        v = NS(name="baseline", backend="pt", accuracy_class="float64", tree=tmp_path, modules=(), env={})
        run = NS(variant=v, system=NS(name="w", validation=(tmp_path,), train=(tmp_path,)), seed=1, steps=20,
                 sweep_id="s", gpus=gpus, device="cpu")
        tr = NS(status="ok", checkpoint=tmp_path / f"g{gpus}.pt", work_dir=tmp_path / f"g{gpus}",
                input_path=tmp_path / "input.json")
        return NS(run=run, train=tr, accuracy=None)

    judge = gate.stage(calibration_dir=tmp_path / "nocal")
    g1, g2 = rec(1), rec(2)
    g1.accuracy = judge(g1, [])
    assert g1.accuracy.verdict == "baseline" and cached == []
    g2.accuracy = judge(g2, [g1])
    assert g2.accuracy.verdict == "pass", g2.accuracy.detail
    assert cached[-1] == 2  # the 2-GPU reference is cached for the 2-GPU variants


def test_calibration_from_runs_keeps_every_finished_seed(tmp_path: Path) -> None:
    """A calibration call cut by its time limit: the finished seeds' run records rebuild the file
    (newest record per seed; other systems, devices, step counts, failed runs ignored)."""
    runs = tmp_path / "runs"
    runs.mkdir()

    def rec(i, variant, seed, f, status="ok", system="tiny", kind="cuda", steps=200, created="2026-11-27T20:00:00Z"):
        d = {"schema": "dpharness.run/1", "run_id": f"r{i}", "sweep_id": "s", "system": system, "variant": variant, "seed": seed,
             "status": status, "steps": steps, "device": {"kind": kind}, "created": created,
             "accuracy": {"dp_test": {"rmse_e_per_atom": 0.1, "rmse_f": f, "rmse_v": None, "numb_test": 0}}}
        (runs / f"r{i}.json").write_text(json.dumps(d))

    for s, f in zip(range(1, 6), [1.0, 1.01, 0.99, 1.02, 0.98]):
        rec(s, "baseline", s, f)
    rec(10, "baseline", 1, 5.0, created="2026-11-27T19:00:00Z")  # an older record of seed 1: superseded
    rec(11, "baseline", 6, 9.0, status="failed")
    rec(12, "baseline", 7, 9.0, kind="cpu")
    rec(13, "baseline", 8, 9.0, steps=20)
    rec(14, "fp32", 1, 1.1)
    rec(15, "fp32", 2, 1.1)  # only 2 float32 seeds: that class is left out
    path = calibrate.calibration_from_runs("tiny", "cuda", 200, tmp_path)
    cal = json.loads(path.read_text())
    assert path.name == "tiny-cuda-200.json"
    assert [r["seed"] for r in cal["runs"]["float64"]] == [1, 2, 3, 4, 5]
    assert cal["stats"]["float64"]["rmse_f"]["max"] == pytest.approx(1.02)
    assert "float32" not in cal["runs"]
    with pytest.raises(RunFailed, match="fewer than 3"):
        calibrate.calibration_from_runs("other", "cuda", 200, tmp_path)


def test_a_stand_in_reference_calibrates_under_its_own_name_and_judges_no_gate(tmp_path: Path, capsys) -> None:
    """calibrate --reference fused-follow (Al-Cu-Mg's lengths upstream cannot train in a GPU call):
    its float64 seeds alone build <system>-<device>-<steps>-fused-follow.json, which says so and
    which find_calibration (the gate's lookup) never returns, exact or nearest; upstream's own
    baseline runs of that length are not mixed in. A reference that is not a float64 variant, or
    another class beside it, is refused with exit 2."""
    from harness.cli import main as cli

    runs = tmp_path / "runs"
    runs.mkdir()
    for i, (variant, seed, f) in enumerate([("fused-follow", 1, 0.30), ("fused-follow", 2, 0.31),
                                            ("fused-follow", 3, 0.29), ("baseline", 1, 0.9), ("baseline", 2, 0.9)]):
        (runs / f"r{i}.json").write_text(json.dumps({
            "schema": "dpharness.run/1", "run_id": f"r{i}", "sweep_id": "s", "system": "tiny", "variant": variant,
            "seed": seed, "status": "ok", "steps": 8000, "device": {"kind": "cuda"}, "created": "2026-12-07T04:00:00Z",
            "accuracy": {"dp_test": {"rmse_e_per_atom": 0.1, "rmse_f": f, "rmse_v": None, "numb_test": 0}}}))
    path = calibrate.calibration_from_runs("tiny", "cuda", 8000, tmp_path, reference="fused-follow")
    cal = json.loads(path.read_text())
    assert path.name == "tiny-cuda-8000-fused-follow.json" and cal["reference"] == "fused-follow"
    assert [r["variant"] for r in cal["runs"]["float64"]] == ["fused-follow"] * 3
    assert cal["stats"]["float64"]["rmse_f"]["mean"] == pytest.approx(0.30)
    assert calibration.find_calibration("tiny", "cuda", 8000, tmp_path) == (None, "no seed-spread calibration for tiny")
    with pytest.raises(RunFailed, match="fewer than 3 finished baseline seeds"):
        calibrate.calibration_from_runs("tiny", "cuda", 8000, tmp_path)  # upstream's two seeds are not three
    assert calibration.rederive(cal)["reference"] == "fused-follow"
    for argv, why in ((["--reference", "fp32", "--classes", "float64"], "accuracy class is float32"),
                      (["--reference", "fused-follow"], "calibrates the float64 class only"),
                      (["--reference", "no-such-variant", "--classes", "float64"], "--reference no-such-variant"),
                      (["--reference", "fp32", "--from-runs", "--steps", "8000", "--device", "cuda"], "float32")):
        assert cli.main(["calibrate", "--system", "tiny", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_upstream_once_judges_every_seed_against_the_first_seeds_baseline(tiny_system: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """`bench --seeds --upstream-once` (issue 40: an equivalence sweep whose upstream seeds would
    not fit one GPU call): the baseline trains on the first seed only, the variant on every seed,
    and every seed's same-weights parity really runs against that baseline -- broken-force fails
    it on each seed, the later seeds saying which baseline they were judged against."""
    from harness.cli import main

    rc = main.main(["bench", "--system", str(tiny_system), "--variant", "broken-force", "--seeds", "1,2,3",
                    "--upstream-once", "--steps", "3", "--device", "cpu", "--results-dir", str(tmp_path)])
    assert rc == 0
    recs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted((r["variant"], r["seed"]) for r in recs) == [
        ("baseline", 1), ("broken-force", 1), ("broken-force", 2), ("broken-force", 3)]
    assert len({r["sweep_id"] for r in recs}) == 1
    for r in recs:
        assert r["status"] == "ok", r["error"]
        if r["variant"] == "broken-force":
            acc = r["accuracy"]
            assert acc["verdict"] == "fail" and acc["parity"]["max_rel_f"] > 1e-8, acc["detail"]
            other = "judged against the sweep's baseline of seed 1" in acc["detail"]
            assert other == (r["seed"] != 1), acc["detail"]
    capsys.readouterr()
    for args, needle in ((["--variant", "broken-force"], "--upstream-once needs --seeds"),
                         (["--variant", "fp32", "--seeds", "1,2,3"], "every variant is upstream's own code")):
        rc = main.main(["bench", "--system", str(tiny_system), *args, "--upstream-once", "--steps", "3",
                        "--device", "cpu", "--results-dir", str(tmp_path / "refused")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and needle in err[-1], err
        assert not (tmp_path / "refused" / "runs").exists()
