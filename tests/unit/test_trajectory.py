"""The trajectory judge (harness/judge/trajectory.py), its typed record and the report's part:
relative differences per display step, the 1e-3 horizon, weights, and the committed H100 record
read back."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest

from harness.core.trajectory_records import SCHEMA, TrajectoryComparison, TrajectoryRecord, TrajectoryRun
from harness.judge import trajectory as tj

REPO = Path(__file__).resolve().parents[2]


def _curve(n: int = 10, every: int = 10) -> list[dict]:
    return [{"step": max(1, i * every), "lr": 1e-3 * 0.9 ** i,
             "trn": {"rmse_e": 0.1 / (i + 1), "rmse_f": 0.9 / (i + 1)},
             "val": {"rmse_e": 0.12 / (i + 1), "rmse_f": 0.95 / (i + 1)}} for i in range(n)]


def test_identical_curves_never_diverge() -> None:
    d = tj.divergence(_curve(), _curve())
    assert d.worst == 0 and d.horizon is None and not d.problems
    assert d.steps == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert set(d.by_column) == {"lr", "trn:rmse_e", "trn:rmse_f", "val:rmse_e", "val:rmse_f"}


@pytest.mark.parametrize("rel,horizon", [(5e-4, None), (2e-3, 40)])
def test_the_horizon_is_the_first_row_beyond_1e_3(rel: float, horizon: int | None) -> None:
    other = copy.deepcopy(_curve())
    for row in other[4:]:  # from step 40 on
        row["val"]["rmse_f"] *= 1 + rel
    d = tj.divergence(_curve(), other)
    assert d.horizon == horizon
    assert d.worst == pytest.approx(rel / (1 + rel), rel=1e-6)
    assert "val:rmse_f" in d.worst_at and d.max_rel[3] == 0


def test_a_missing_row_or_value_counts_as_diverged() -> None:
    other = _curve()[:-1]  # the last row lost
    d = tj.divergence(_curve(), other)
    assert d.horizon == 90 and math.isinf(d.max_rel[-1]) and d.problems == ["step 90: in the reference only"]
    nan = _curve()
    nan[2]["trn"]["rmse_f"] = float("nan")
    d = tj.divergence(_curve(), nan)
    assert d.horizon == 20 and d.to_dict()["max_rel"][2] is None  # JSON has no inf: null


def test_multi_task_rows_flatten_per_task() -> None:
    row = {"step": 1, "lr": 1e-3, "trn": {"water": {"rmse_f": 1.0}, "cu": {"rmse_f": 2.0}}}
    assert tj.columns(row) == {"lr": 1e-3, "trn:water:rmse_f": 1.0, "trn:cu:rmse_f": 2.0}


def test_weights_divergence() -> None:
    a = {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3)}
    assert tj.weights_divergence(a, copy.deepcopy(a)) == (0.0, "")
    b = copy.deepcopy(a)
    b["w"][1, 2] += 5e-6  # max |w| is 5
    w, where = tj.weights_divergence(a, b)
    assert where == "w" and w == pytest.approx(1e-6, rel=1e-3)
    assert math.isinf(tj.weights_divergence(a, {"w": a["w"]})[0])
    assert math.isinf(tj.weights_divergence(a, {**a, "b": np.zeros(4)})[0])


def test_follows_compares_horizons_with_upstreams_own() -> None:
    never, at50, at20 = tj.Divergence(horizon=None), tj.Divergence(horizon=50), tj.Divergence(horizon=20)
    assert tj.follows(never, never, 100) and tj.follows(never, at50, 100) and tj.follows(at50, at50, 100)
    assert not tj.follows(at20, at50, 100) and not tj.follows(at50, never, 100)
    assert not tj.follows(tj.Divergence(horizon=None, problems=["step 1: in the reference only"]), never, 100)


def test_record_round_trip(tmp_path: Path) -> None:
    from harness.results import trajectory as store

    d = tj.divergence(_curve(), _curve())
    rec = TrajectoryRecord(schema=SCHEMA, sweep_id="20990101T000000Z-abcdef", system="w", steps=90, seed=10,
                           horizon_rtol=tj.HORIZON_RTOL, verdict="pass",
                           runs=[TrajectoryRun(role="upstream", variant="baseline", status="ok", rows=_curve())],
                           comparisons=[TrajectoryComparison(run="fused", follows=True, **d.to_dict())])
    p = store.write(rec, tmp_path)
    back = store.load_records(tmp_path)
    assert len(back) == 1 and back[0].to_dict() == rec.to_dict() and back[0].path == p
    (tmp_path / "broken.json").write_text("{")
    warned: list[str] = []
    assert len(store.load_records(tmp_path, warn=warned.append)) == 1 and "broken.json" in warned[0]


def test_the_committed_h100_record_reads_back_and_renders() -> None:
    """The GPU evidence (issue 41): fused and graph on upstream's order stay within 1e-3 of
    upstream for all 2,000 steps, as long as upstream stays on its own."""
    from harness.report import trajectory as part
    from harness.results import trajectory as store

    recs = [r for r in store.load_records(REPO / "results" / "trajectory") if r.sweep_id == "20261206T082122Z-cdcf5f"]
    assert len(recs) == 1
    rec = recs[0]
    assert rec.verdict == "pass" and rec.steps == 2000 and rec.card.startswith("NVIDIA H100")
    by = {c.run: c for c in rec.comparisons}
    assert set(by) == {"upstream-again", "fused", "graph"}
    assert all(c.horizon is None for c in by.values()) and by["fused"].follows and by["graph"].follows
    assert by["fused"].worst < 1e-3 and by["upstream-again"].worst < 1e-9
    assert all(r.order == "upstream" for r in rec.runs)
    s = part.section(rec)
    assert s["img"].startswith("data:image/png;base64,") and [r["follows"] for r in s["rows"]] == ["-", "yes", "yes"]
