"""A real client uses a fused-trained model: water trained by `dpharness train` (fused, tiny nets)
and frozen by upstream, then 1 ps of NVE through upstream's ASE calculator (`dpharness md`),
its energy drift per atom inside the limits fixed in harness/judge/md_nve.py; and the negative
control: the same model with its forces scaled by 1.05 (no longer its energy's gradient) fails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main as cli
from harness.judge import md_nve
from harness.prepare import build

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WATER = REPO / "systems" / "water"


@pytest.fixture(scope="module")
def water_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mdwater")
    inp = json.loads((WATER / "input.json").read_text())
    inp["model"]["descriptor"].update(neuron=[4, 8, 16], axis_neuron=4)
    inp["model"]["fitting_net"].update(neuron=[16, 16])
    t = inp["training"]
    t["training_data"] = {"systems": [str(WATER / "data" / "data_0")], "batch_size": "auto"}
    t["validation_data"] = {"systems": [str(WATER / "data" / "data_3")], "batch_size": 1, "numb_btch": 1}
    t.update(numb_steps=50, disp_freq=10, save_freq=50)
    (d / "input.json").write_text(json.dumps(inp, indent=1))
    assert cli.main(["train", str(d / "input.json"), "--variant", "fused", "--device", "cpu", "--freeze",
                     "--output", str(d / "out")]) == 0
    return d / "out" / "frozen_model.pth"


def test_one_ps_of_nve_water_conserves_energy(water_model, tmp_path, capsys):
    out = tmp_path / "nve"
    assert cli.main(["md", str(water_model), "--system", "water", "--ps", "1", "--out", str(out), "--strict"]) == 0
    text = capsys.readouterr().out
    assert "NVE 192 atoms, 1 ps at 0.5 fs" in text and "PASS" in text, text
    v = json.loads((out / "nve_verdict.json").read_text())
    assert v["ok"] and v["steps"] == 2000 and abs(v["drift_ev_atom_ps"]) <= md_nve.DRIFT_LIMIT
    assert 150 < v["mean_temperature_K"] < 450  # the run moved: kinetic energy is there throughout
    traj = json.loads((out / "nve.json").read_text())
    assert traj["time_ps"][-1] == pytest.approx(1.0) and len(traj["etot"]) == 201


def test_forces_that_are_not_the_energys_gradient_drift_and_fail(water_model, tmp_path):
    res = md_nve.run(water_model, WATER / "data" / "data_3", tmp_path / "bad", build.build_variant("baseline").tree,
                     ps=0.2, force_scale=1.05)
    assert not res.ok and any("energy drift" in r for r in res.reasons), res


def test_bad_md_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["md", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "frozen model not found" in err[0]
    (tmp_path / "m.pth").write_text("x")
    assert cli.main(["md", str(tmp_path / "m.pth"), "--ps", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "must be positive" in capsys.readouterr().err and not (tmp_path / "o").exists()
