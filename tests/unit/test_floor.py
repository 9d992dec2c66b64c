"""dpharness floor: water's shapes and FLOPs (the numbers of issue #22), the floor arithmetic, the
record's round trip, the CLI end to end on the CPU, bad input, and the report's Floor section."""
from __future__ import annotations

import json

import pytest

from harness.analyse import floor
from harness.cli import main
from harness.core.floor_record import SCHEMA, FloorRecord, load_floors
from harness.core.records import BadRecord, StoredRun
from harness.prepare.systems import load_system


@pytest.fixture(scope="module")
def water():
    return floor.shapes(load_system("water"))


def test_water_shapes_and_forward_flops(water):
    assert water.nloc_by_type == (64, 128) and water.sel == (46, 92) and water.frames == 1
    assert water.embedding == (1, 25, 50, 100) and water.axis == 16 and water.fitting == (1600, 240, 240, 240, 1)
    assert water.embedding_rows == 26496
    fwd = floor.flops_by_group(floor.forward_gemms(water))
    assert fwd["embedding"] == pytest.approx(332.5248e6)
    assert fwd["fitting"] == pytest.approx(191.78496e6)
    rows = sorted({g.m for g in floor.forward_gemms(water) if g.group == "embedding"})
    assert rows == [2944, 5888, 11776]


def test_step_is_six_gemms_of_equal_flops_per_forward_gemm(water):
    fwd, step = floor.forward_gemms(water), floor.step_gemms(water)
    assert len(step) == 6 * len(fwd)
    assert sum(g.flops for g in step) == pytest.approx(6 * sum(g.flops for g in fwd))
    g = floor.Gemm("fitting", "forward", 64, 1600, 240)
    shapes = [f(g.m, g.k, g.n) for _, f in floor.PASSES]
    assert shapes[1] == (64, 240, 1600) and shapes[2] == (1600, 64, 240)  # force pass; weight grad


def test_floor_arithmetic():
    gemms = [floor.Gemm("embedding", "forward", 10, 20, 30, count=2), floor.Gemm("fitting", "forward", 4, 5, 6)]
    rate = {(10, 20, 30): 24000.0, (4, 5, 6): 240.0}  # 24000 FLOP at 24000/s = 1 s; 240 at 240/s = 1 s
    assert floor.floor_ms(gemms, rate) == pytest.approx(2000.0)
    assert floor.floor_ms(gemms, rate, node_cost_s=0.5, kernels_per_step=4) == pytest.approx(4000.0)
    assert floor.floor_ms(gemms, rate, node_cost_s=0.5, kernels_per_step=None) == pytest.approx(2000.0)


def _record(**kw) -> FloorRecord:
    d = {"schema": SCHEMA, "sweep_id": "S1", "system": "water", "device": "cuda", "card": "NVIDIA H200",
         "dtype": "float64", "gemm_rates": [{"m": 4, "k": 5, "n": 6, "s_median": 1e-6, "s_iqr": 1e-7,
                                              "flops_per_s": 2.4e8}],
         "bandwidth": {"bytes": 1 << 28, "bytes_per_s": 4.0e12}, "graph_node": {"s_per_node": 2e-6, "reason": None},
         "flops_by_group": {"embedding": 2e9}, "kernels_per_step": 100.0, "gemm_ms": 1.0, "node_ms": 0.2,
         "floor_ms": 1.2, "model": "m", "future_key": [1, 2]}
    d.update(kw)
    return FloorRecord.from_dict(d)


def test_record_round_trip_keeps_unknown_keys(tmp_path):
    rec = _record()
    p = tmp_path / "S1-water-floor.json"
    p.write_text(json.dumps(rec.to_dict()))
    back = FloorRecord.from_json(p)
    assert back.to_dict() == rec.to_dict() and back.floor_ms == 1.2 and back.to_dict()["future_key"] == [1, 2]
    (tmp_path / "bad-floor.json").write_text(json.dumps({"schema": "dpharness.run/9"}))
    warned = []
    assert [r.sweep_id for r in load_floors(tmp_path, warned.append)] == ["S1"] and len(warned) == 1
    with pytest.raises(BadRecord, match="not a floor record"):
        FloorRecord.from_json(tmp_path / "bad-floor.json")


def test_cli_on_cpu_writes_a_record(tmp_path, capsys):
    out = tmp_path / "f.json"
    rc = main.main(["floor", "--system", "water", "--device", "cpu", "--repeats", "2", "--sweep-id", "T",
                    "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rec = FloorRecord.from_json(out)
    assert rec.card == "cpu" and rec.sweep_id == "T" and rec.graph_node["s_per_node"] is None
    assert rec.floor_ms > 0 and rec.gemm_ms == pytest.approx(rec.floor_ms) and rec.node_ms is None  # CPU: no graphs
    assert {(g["m"], g["k"], g["n"]) for g in rec.gemms} == {(r["m"], r["k"], r["n"]) for r in rec.gemm_rates}
    assert rec.bandwidth["bytes"] == 64 << 20 and rec.bandwidth["bytes_per_s"] > 0
    assert "floor" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--system", "nosuch"], "unknown system 'nosuch'"),
    (["--repeats", "0"], "--repeats"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "dtype"),
])
def test_bad_input_is_one_line_and_exit_2(argv, says, tmp_path, capsys):
    device = [] if "--device" in argv else ["--device", "cpu"]
    rc = main.main(["floor", *argv, *device, "--out", str(tmp_path / "f.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "f.json").exists()


def test_report_floor_section_renders(tmp_path):
    from harness.report import floor as section
    from harness.report import render

    rec = _record()
    (tmp_path / "floor").mkdir()
    (tmp_path / "floor" / "S1-water-floor.json").write_text(json.dumps(rec.to_dict()))
    html = render.write_report(tmp_path / "runs", tmp_path / "r" / "index.html", convergence_dir=tmp_path / "c",
                               floor_dir=tmp_path / "floor").read_text()
    assert 'id="floor"' in html and "floor 1.200 ms/step" in html and "4000.0 GB/s" in html
    assert "no fused run of water on this card yet" in html
    run = StoredRun.from_dict({"system": "water", "variant": "fused", "status": "ok", "sweep_id": "B",
                               "device": {"kind": "cuda", "name": "NVIDIA H200"}, "timing": {"step_s_median": 0.0036}})
    other = StoredRun.from_dict({"system": "water", "variant": "fused", "status": "ok",
                                 "device": {"kind": "cuda", "name": "NVIDIA A100"}, "timing": {"step_s_median": 1.0}})
    s = section.section(rec, [run, other])
    assert s["fused"] == [{"variant": "fused", "sweep": "B", "ms": "3.600", "ratio": "3.00"}]


def test_kernels_per_step_come_from_the_latest_profiled_fused_run_of_this_card(tmp_path):
    from harness.cli import floor as cli

    def run(run_id, created, card, kernels, variant="fused", system="water"):
        d = {"schema": "dpharness.run/1", "run_id": run_id, "sweep_id": "S", "system": system, "variant": variant,
             "status": "ok", "created": created, "device": {"kind": "cuda", "name": card},
             "profile": {"status": "ok", "kernels_per_step": kernels}}
        (tmp_path / f"{run_id}.json").write_text(json.dumps(d))

    run("old", "2026-01-01T00:00:00Z", "NVIDIA H200", 300.0)
    run("new", "2026-02-01T00:00:00Z", "NVIDIA H200", 120.0)
    run("a100", "2026-03-01T00:00:00Z", "NVIDIA A100", 50.0)
    run("base", "2026-03-01T00:00:00Z", "NVIDIA H200", 900.0, variant="baseline")
    run("cu", "2026-03-01T00:00:00Z", "NVIDIA H200", 10.0, system="copper")
    assert cli.profiled_kernels("water", "NVIDIA H200", tmp_path) == (120.0, "new")
    assert cli.profiled_kernels("water", "cpu", tmp_path) == (None, None)
