"""dpharness train's input space without training: the engine's input-level check, the refusal
lines (CLI-side and child-side), per-system validation of mixed sizes, bare input.json systems."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.cli.main import main
from harness.core.errors import UserError
from harness.prepare import systems, train_support
from harness.run import train, user_train

REPO = Path(__file__).resolve().parents[2]
COPPER = REPO / "systems" / "copper"


def copper_input() -> dict:
    return json.loads((COPPER / "input.json").read_text())


def test_copper_and_water_inputs_are_engine_inputs():
    assert train_support.engine_refusal(copper_input()) is None
    assert train_support.engine_refusal(json.loads((REPO / "systems/water/input.json").read_text())) is None


@pytest.mark.parametrize("edit, key", [
    (lambda i: i["model"]["descriptor"].update(type="se_atten"), "model.descriptor.type = 'se_atten'"),
    (lambda i: i["model"].update(type_embedding={"neuron": [8]}), "model.type_embedding"),
    (lambda i: i["model"]["fitting_net"].update(type="dipole"), "model.fitting_net.type = 'dipole'"),
    (lambda i: i.update(model={"model_dict": {"a": i["model"]}}), "model.model_dict"),
    (lambda i: i["loss"].update(type="tensor"), "loss.type = 'tensor'"),
    (lambda i: i["loss"].update(start_pref_ae=1.0, limit_pref_ae=1.0), "loss.start_pref_ae"),
    (lambda i: i["training"].update(enable_ema=True), "training.enable_ema"),
    (lambda i: i["training"].update(gradient_max_norm=5.0), "training.gradient_max_norm"),
    (lambda i: i["model"]["fitting_net"].update(numb_fparam=2), "model.fitting_net.numb_fparam"),
    (lambda i: i["model"]["descriptor"].update(exclude_types=[[0, 0]]), "model.descriptor.exclude_types"),
    (lambda i: i.update(optimizer={"type": "LKF"}), "optimizer 'LKF'"),
    (lambda i: i["model"]["fitting_net"].update(activation_function="gelu"), "activation_function = 'gelu'"),
])
def test_engine_refusal_names_the_key(edit, key):
    inp = copper_input()
    edit(inp)
    why = train_support.engine_refusal(inp)
    assert why is not None and key in why
    with pytest.raises(UserError) as e:
        train_support.check_engine_input(inp, "fused", "in.json")
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "`--variant baseline`" in msg


def test_loss_terms_switched_off_are_no_refusal():
    inp = copper_input()
    inp["loss"].update(start_pref_ae=0.0, limit_pref_ae=0.0, start_pref_pf=1.0, limit_pref_pf=0.0)
    assert train_support.engine_refusal(inp) is None  # upstream's has_pf needs both non-zero


def test_activation_only_matters_to_fused():
    inp = copper_input()
    inp["model"]["fitting_net"]["activation_function"] = "gelu"
    assert train_support.engine_refusal(inp, "graph") is None


def test_child_refusal_from_a_training_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("Traceback (most recent call last):\n"
                   '  File "/x/engines/dpfast/device_data.py", line 125, in build_data\n'
                   "dpfast.support.Unsupported: graph variant: unsupported input: atoms not sorted by type "
                   "(set sort_atoms)\n")
    err = train.diagnose(log, 1)
    line = train_support.child_refusal(err, "fused", "in.json")
    assert line == ("in.json: variant fused does not train atoms not sorted by type (set sort_atoms); "
                    "`--variant baseline` (upstream) trains it")
    assert train_support.child_refusal("RuntimeError: boom", "fused", "in.json") is None


def test_default_variant_is_decided_before_training():
    inp = copper_input()
    assert user_train.choose_variant(inp, None, Path("x"))[0] == "fused"
    inp["model"]["descriptor"]["type"] = "se_atten"
    v, why = user_train.choose_variant(inp, None, Path("x"))
    assert v == "baseline" and "se_atten" in why
    assert user_train.choose_variant(inp, "baseline", Path("x"))[0] == "baseline"
    with pytest.raises(UserError, match="model.descriptor.type"):
        user_train.choose_variant(inp, "fused", Path("x"))


def _mixed_dir(tmp_path: Path) -> Path:
    """copper's fcc_300K (108 atoms) and a 216-atom system of another composition (two types)."""
    d = tmp_path / "mixed"
    shutil.copytree(COPPER / "data" / "fcc_300K", d / "a108")
    big = d / "b216"
    (big / "set.000").mkdir(parents=True)
    src = COPPER / "data" / "fcc_300K" / "set.000"
    c = np.load(src / "coord.npy")[:3].reshape(3, 108, 3)
    box = np.load(src / "box.npy")[:3]
    shift = box.reshape(3, 3, 3)[:, 0:1, :]
    np.save(big / "set.000" / "coord.npy", np.concatenate([c, c + shift], axis=1).reshape(3, -1))
    np.save(big / "set.000" / "box.npy", box * np.array([2, 2, 2, 1, 1, 1, 1, 1, 1]))
    np.save(big / "set.000" / "energy.npy", np.load(src / "energy.npy")[:3] * 2)
    (big / "type.raw").write_text("\n".join(["0"] * 108 + ["1"] * 108) + "\n")
    inp = copper_input()
    inp["model"]["type_map"] = ["Cu", "Ag", "Au"]  # Au is in no system
    inp["model"]["descriptor"]["sel"] = [230, 230, 230]
    inp["training"]["training_data"]["systems"] = ["a108", "b216"]
    inp["training"]["validation_data"]["systems"] = "."  # a directory: every system under it
    (d / "input.json").write_text(json.dumps(inp))
    return d


def test_bare_input_dir_is_a_system_of_mixed_sizes(tmp_path):
    d = _mixed_dir(tmp_path)
    s = systems.load_system(str(d))
    assert [p.name for p in s.train] == ["a108", "b216"] and [p.name for p in s.validation] == ["a108", "b216"]
    assert s.atoms_per_frame == 216 and s.type_map == ("Cu", "Ag", "Au")
    assert systems.validate_system(s) == {"train": 63, "validation": 63}
    inp, sysd = user_train.load_input(d / "input.json")
    run = user_train.absolute_data(inp, d)
    assert run["training"]["training_data"]["systems"] == [str(d / "a108"), str(d / "b216")]
    assert run["training"]["validation_data"]["systems"] == str(d)
    rest = copy.deepcopy(run)
    rest["training"]["training_data"]["systems"] = inp["training"]["training_data"]["systems"]
    rest["training"]["validation_data"]["systems"] = inp["training"]["validation_data"]["systems"]
    assert rest == inp  # nothing but the data paths changes


def test_system_yaml_without_atoms_per_frame_validates_per_system(tmp_path):
    d = _mixed_dir(tmp_path)
    (d / "system.yaml").write_text("name: mixed\ntype_map: [Cu, Ag, Au]\ntrain: [a108, b216]\nvalidation: [a108]\n")
    assert systems.validate_system(systems.load_system(str(d)))["train"] == 63
    (d / "system.yaml").write_text("name: mixed\ntype_map: [Cu, Ag, Au]\natoms_per_frame: 108\n"
                                   "train: [a108, b216]\nvalidation: [a108]\n")
    with pytest.raises(UserError, match="216 atoms, system.yaml says 108"):
        systems.validate_system(systems.load_system(str(d)))


def test_bad_data_in_one_system_is_named(tmp_path):
    d = _mixed_dir(tmp_path)
    np.save(d / "b216" / "set.000" / "energy.npy", np.zeros(2))
    with pytest.raises(UserError, match="b216/set.000/energy.npy: 2 frames"):
        user_train.load_input(d / "input.json")


def test_read_lcurve_takes_upstreams_header(tmp_path):
    p = tmp_path / "lcurve.out"
    p.write_text("# step rmse_val rmse_trn lr\n# If there is no available reference data, rmse_* nan\n"
                 "      1  2.0e+01  1.0e+01  1.0e-03\n     5  1.5e+01  9.0e+00  5.0e-04\n")
    cols, rows = user_train.read_lcurve(p)
    assert cols == ["step", "rmse_val", "rmse_trn", "lr"] and rows[-1] == {
        "step": 5.0, "rmse_val": 15.0, "rmse_trn": 9.0, "lr": 5e-4}


def test_cli_bad_input_path_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json: input file not found" in err[0]


def test_cli_refuses_se_atten_for_fused_before_building(tmp_path, capsys, monkeypatch):
    d = _mixed_dir(tmp_path)
    inp = json.loads((d / "input.json").read_text())
    inp["model"]["descriptor"]["type"] = "se_atten"
    (d / "input.json").write_text(json.dumps(inp))
    from harness.prepare import build

    monkeypatch.setattr(build, "build_variant", lambda *a, **k: pytest.fail("built before refusing"))
    assert main(["train", str(d / "input.json"), "--variant", "fused", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.descriptor.type = 'se_atten'" in err[0] and "--variant baseline" in err[0]
    assert not (d / "train-fused").exists()


def _record(**over) -> dict:
    rec = user_train.TrainingRecord(
        variant="fused", variant_hash="h", chose="user", input="/x/input.json", input_sha256="s", device="cpu",
        numb_steps=10, steps_lcurve=10, wall_s=1.0, returncode=0, lcurve_columns=["step", "lr"],
        final_lcurve={"step": 10.0, "lr": 1e-4}, restart=None, init_model=None, command=["dp"])
    return {**user_train.asdict(rec), **over}


def test_record_reads_back_typed_and_refuses_another_file(tmp_path):
    p = tmp_path / user_train.RECORD_NAME
    p.write_text(json.dumps(_record()))
    rec = user_train.read_record(p)
    assert isinstance(rec, user_train.TrainingRecord) and rec.final_lcurve == {"step": 10.0, "lr": 1e-4}
    bad = _record()
    del bad["wall_s"]
    p.write_text(json.dumps({**bad, "extra": 1}))
    with pytest.raises(UserError, match=r"not a dpharness_train.json record .*'extra', 'wall_s'"):
        user_train.read_record(p)
    p.write_text("{half")
    with pytest.raises(UserError, match="not a dpharness_train.json record"):
        user_train.read_record(p)
    older = _record()
    del older["world_size"]  # a record from before --gpus: one process
    p.write_text(json.dumps(older))
    assert user_train.read_record(p).world_size == 1


@pytest.mark.parametrize("gpus, says", [("2", "multi-GPU runs need --device cuda"), ("x", "--gpus must be a whole"),
                                        ("0", "--gpus must be at least 1")])
def test_cli_refuses_gpus_it_cannot_have_before_building(tmp_path, capsys, monkeypatch, gpus, says):
    d = _mixed_dir(tmp_path)
    from harness.prepare import build

    monkeypatch.setattr(build, "build_variant", lambda *a, **k: pytest.fail("built before refusing"))
    assert main(["train", str(d / "input.json"), "--gpus", gpus, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not any(p.name.startswith("train-") for p in d.iterdir())


def test_restart_step_comes_from_the_checkpoint_name(tmp_path):
    (tmp_path / "model.ckpt-30.pt").write_bytes(b"")
    (tmp_path / "model.ckpt.pt").symlink_to("model.ckpt-30.pt")
    assert user_train.checkpoint_step(tmp_path / "model.ckpt.pt") == 30
    assert user_train.checkpoint_step(tmp_path / "model.ckpt-30.pt") == 30
    assert user_train.checkpoint_step(tmp_path / "mine.pt") == 0  # name says nothing: count from 0
