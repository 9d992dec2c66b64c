"""The gate's use of the training-equivalence test (harness/judge/gate.py, seeds.py): for a
reduced-precision class at the system's gate_steps with seeds on both sides it replaces the
single-run dp-test check; without gate_steps it says "not calibrated" and today's check stays;
float64 classes never get it. dp test and parity subprocesses are replaced by fixed results."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from harness.core import fsutil
from harness.core.errors import UserError
from harness.core.records import AccuracyResult, StoredRun
from harness.judge import calibration, gate
from harness.report.render import equivalence_cell

STEPS = 20
BASE_F = [0.300, 0.303, 0.297, 0.301]  # calibration seeds 1-4 of the float64 baseline


def _dp(f: float) -> dict:
    return {"rmse_e_per_atom": None, "rmse_f": f, "rmse_v": None, "numb_test": 20}


@pytest.fixture()
def judge(monkeypatch, tmp_path):
    """gate.evaluate with every subprocess replaced: the variant's dp test is `dp_now[0]`,
    parity is exact. A calibration at (w, cpu, STEPS) holds BASE_F."""
    arrays = {"energy": np.ones(2), "force": np.ones((2, 3, 3)), "virial": np.ones((2, 9))}
    dp_now = [_dp(0.3)]
    monkeypatch.setattr(gate, "baseline_tree", lambda prev=None: tmp_path)
    monkeypatch.setattr(gate, "start_dp_test", lambda *a, **k: (None, None))
    monkeypatch.setattr(gate, "finish_dp_test", lambda *a, **k: dict(dp_now[0]))
    monkeypatch.setattr(gate, "start_parity_eval", lambda *a, **k: (None, None))
    monkeypatch.setattr(gate, "finish_parity_eval", lambda *a, **k: ({"load": "ok", "eval": True}, arrays))
    monkeypatch.setattr(gate, "load_reference", lambda base, tree: ({"load": "ok"}, arrays))
    monkeypatch.setattr(gate, "compare_step", lambda ref, var, tol=0.0: {})
    cal_dir = tmp_path / "cal"
    runs = {"float64": [{"seed": s + 1, "variant": "baseline", "dp_test": _dp(f)} for s, f in enumerate(BASE_F)],
            "float32": [{"seed": s + 1, "variant": "fp32", "dp_test": _dp(f)} for s, f in enumerate(BASE_F)]}
    fsutil.atomic_write_json(calibration.calibration_path("w", "cpu", STEPS, cal_dir),
                             calibration.build_calibration("w", "cpu", STEPS, runs, 20))

    def rec(variant: str, seed: int, cls: str = "float32", spec: dict | None = None, sweep_dp: float = 0.3):
        v = NS(name=variant, backend="pt", accuracy_class=cls, tree=tmp_path, modules=(), env={})
        system = NS(name="w", validation=(tmp_path,), train=(tmp_path,),
                    spec={"gate_steps": STEPS} if spec is None else spec)
        run = NS(variant=v, system=system, seed=seed, steps=STEPS, sweep_id="sw", gpus=1, device="cpu")
        tr = NS(status="ok", checkpoint=tmp_path / "c.pt", work_dir=tmp_path / variant, input_path=tmp_path / "i.json")
        return NS(run=run, train=tr, accuracy=AccuracyResult(dp_test=_dp(sweep_dp)))

    def peer(variant: str, seed: int, f: float) -> StoredRun:
        return StoredRun.from_dict({"variant": variant, "system": "w", "sweep_id": "sw", "steps": STEPS, "seed": seed,
                                    "status": "ok", "device": {"kind": "cpu"}, "world_size": 1,
                                    "accuracy": {"dp_test": _dp(f)}})

    def run(f_now: float, peer_f: list[float], seed: int = 30, planned=None, base_peer_f=(), cal=None,
            **kw) -> AccuracyResult:
        dp_now[0] = _dp(f_now)
        r = rec(kw.pop("variant", "fp32"), seed, **kw)
        base = rec("baseline", seed, "float64", sweep_dp=kw.get("sweep_dp", 0.3))
        peers = [peer(r.run.variant.name, 10 + i, f) for i, f in enumerate(peer_f)]
        peers += [peer("baseline", 10 + i, f) for i, f in enumerate(base_peer_f)]
        return gate.evaluate(r, [base], calibration_dir=cal or cal_dir, peers=peers, planned=planned)

    return run


def test_equivalent_seeds_pass_although_the_single_run_check_would_fail(judge) -> None:
    # the sweep's same-seed baseline is 12 % off: the single-run rule (tolerance 8.9 % from 4 seeds) fails it
    res = judge(0.301, [0.299, 0.300], sweep_dp=0.34)
    e = res.equivalence
    assert res.verdict == "pass", res.detail
    assert e.verdict == "pass" and e.seeds_variant == [10, 11, 30] and e.seeds_baseline == [1, 2, 3, 4]
    assert e.calibration == "w-cpu-20.json" and e.metrics["rmse_f"]["outcome"] == "equivalent"
    assert e.metrics["rmse_f"]["ci90"][0] < 0 < e.metrics["rmse_f"]["ci90"][1]
    back = AccuracyResult.from_dict(res.to_dict())  # the typed part survives the JSON
    assert back.equivalence.metrics["rmse_f"]["margin_rel"] == 0.05 and back.equivalence.verdict == "pass"
    assert equivalence_cell(back.equivalence) == "pass (n 3/4): rmse_f -0.1% [-1.1%, +0.9%] (±5%) equivalent"
    old_rule = judge(0.301, [0.299, 0.300], sweep_dp=0.34, spec={})  # gate_steps not calibrated
    assert old_rule.verdict == "fail" and "dp test rmse_f" in old_rule.detail


def test_shifted_seeds_fail_and_better_ones_say_so(judge) -> None:
    worse = judge(0.33, [0.331, 0.329])
    assert worse.verdict == "fail" and "rmse_f worse" in worse.detail
    better = judge(0.25, [0.251, 0.249])
    assert better.verdict == "fail" and better.equivalence.metrics["rmse_f"]["not_worse"]
    assert "not worse: rmse_f better than the baseline" in better.detail


def test_an_inconclusive_record_and_its_report_cell_say_how_many_seeds_would_resolve_it(judge) -> None:
    res = judge(0.30, [0.33, 0.27])  # 10 % seed spread against a 5 % margin: 3 seeds cannot tell
    m = res.equivalence.metrics["rmse_f"]
    assert res.verdict == "fail" and m["outcome"] == "inconclusive" and m["seeds_needed"] > 4
    back = AccuracyResult.from_dict(res.to_dict())
    assert f"inconclusive (~{m['seeds_needed']} seeds/side to resolve)" in equivalence_cell(back.equivalence)


def test_too_few_seeds_falls_back_to_the_single_run_check(judge) -> None:
    res = judge(0.30, [0.30])
    assert res.equivalence.verdict is None and "needs >= 3 seeds" in res.equivalence.detail
    assert res.verdict == "pass" and "single-run dp test vs seed spread instead" in res.detail


def test_not_calibrated_gate_steps_and_other_lengths_are_said(judge) -> None:
    res = judge(0.30, [0.30, 0.30], spec={})
    assert res.equivalence.verdict is None and res.equivalence.detail.startswith("not calibrated")
    assert "not calibrated" in res.detail
    res = judge(0.30, [0.30, 0.30], spec={"gate_steps": 5000})
    assert "gate_steps is 5000" in res.equivalence.detail


def test_an_earlier_seed_of_the_sweep_is_pending(judge) -> None:
    res = judge(0.40, [], seed=1, planned=[1, 2, 3])  # 33 % off, yet no single-run verdict on it
    assert res.verdict == "pass" and res.equivalence.detail.startswith("pending: seed 1 of 1,2,3")


def test_without_calibration_the_sweeps_baseline_seeds_count_the_judged_one_too(judge, tmp_path) -> None:
    """bench --seeds 10,11,30 without a calibration file: the baseline of seed 30 (the one the gate
    judges against, not among the stored peers) is the third baseline seed."""
    res = judge(0.301, [0.299, 0.300], base_peer_f=[0.300, 0.302], cal=tmp_path / "no-cal")
    e = res.equivalence
    assert e.verdict == "pass", e.detail
    assert e.seeds_baseline == [10, 11, 30] and "baseline runs of sweep sw" in (e.calibration or e.detail)


def test_float64_classes_keep_todays_gate(judge) -> None:
    res = judge(0.30, [0.30, 0.30], variant="fused", cls="float64")
    assert res.equivalence is None and "training equivalence" not in res.detail


def test_gate_steps_must_be_an_integer(tmp_path: Path) -> None:
    from harness.prepare import systems

    d = tmp_path / "s"
    d.mkdir()
    (d / "input.json").write_text("{}")
    base = "name: s\ntype_map: [A]\natoms_per_frame: 1\ntrain: []\nvalidation: []\n"
    (d / "system.yaml").write_text(base + "gate_steps: 3000\n")
    assert systems.load_system(str(d)).spec["gate_steps"] == 3000
    (d / "system.yaml").write_text(base + "gate_steps: lots\n")
    with pytest.raises(UserError, match="gate_steps must be an integer"):
        systems.load_system(str(d))


def test_bench_seeds_needs_three_distinct_integers() -> None:
    from harness.cli.main import parse_seeds

    assert parse_seeds("1,2,3,2") == [1, 2, 3]
    with pytest.raises(UserError, match="at least 3"):
        parse_seeds("1,1,2")
    with pytest.raises(UserError, match="comma list of integers"):
        parse_seeds("1,x,3")


def test_upstream_once_keeps_our_variants_for_the_later_seeds_and_shares_the_budget_by_runs() -> None:
    """`bench --seeds --upstream-once`: the later seeds train our variants only (upstream-only
    settings such as fp32-tos and ptx-tf32 drop out); the time budget is shared by runs, so the
    first seed's bench, which also trains upstream, gets more than an equal share."""
    from harness.cli.main import budget_share, upstream_once

    first = ["baseline", "fp32-tos", "ptx-tf32", "fused", "fused-fp32"]
    later = upstream_once(first, [1, 2, 3])
    assert later == ["fused", "fused-fp32"]
    plans = [first, later, later]
    assert budget_share(plans, 0) == pytest.approx(5 / 9)
    assert budget_share(plans, 1) == pytest.approx(1 / 2) and budget_share(plans, 2) == 1.0
    assert budget_share([first] * 3, 0) == pytest.approx(1 / 3)  # same variants: equal shares
    with pytest.raises(UserError, match="needs --seeds"):
        upstream_once(first, [10])
    with pytest.raises(UserError, match="upstream's own code"):
        upstream_once(["baseline", "fp32-tos"], [1, 2, 3])


def test_calibrate_prints_the_seeds_its_spread_asks_of_the_equivalence_test(capsys) -> None:
    """`calibrate` tells before any variant trains what the seed spread costs: water's GPU
    calibration at gate_steps (force CV 5.4 %) needs ~20 seeds per side, a tight one 3."""
    from harness.cli.calibrate import _print_calibration

    def cal(fs):
        runs = {"float64": [{"seed": i + 1, "variant": "baseline", "dp_test": _dp(f)} for i, f in enumerate(fs)]}
        return calibration.build_calibration("w", "cuda", 2000, runs, 0)

    _print_calibration(cal([0.2322099, 0.2568767, 0.2465499, 0.2286506]))
    wide = capsys.readouterr().out
    n = int(wide.split("equivalence at margin 5%: ~")[1].split()[0])
    assert 15 <= n <= 30 and "seeds per side for 80 % power" in wide
    _print_calibration(cal(BASE_F))
    assert "equivalence at margin 5%: ~3 seeds per side" in capsys.readouterr().out
