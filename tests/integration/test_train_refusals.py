"""`dpharness train` refuses before it trains (issue 38, slice 1): values upstream's schema
accepts but no training can use, and files that are not what their flag claims. Each case: exit
2, one line naming the input file or the flag, the key and why, and no output folder (so no
checkpoint). The input is the tiny water system's, as a user would write it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.cli import main as cli


def _input(tiny: Path) -> dict:
    inp = json.loads((tiny / "input.json").read_text())
    inp["training"]["training_data"] = {"systems": ["data/train_0"], "batch_size": 1}
    inp["training"]["validation_data"] = {"systems": ["data/valid_0"], "batch_size": 1, "numb_btch": 1}
    inp["training"].update(numb_steps=2, disp_freq=1, save_freq=2, seed=1)
    return inp


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *head, last = path.split(".")
    node = d
    for k in head:
        node = node.setdefault(k, {})
    node[last] = value
    return d


# (case id, key path, value, words the one line must hold)
VALUES = [
    ("steps-0", "training.numb_steps", 0, "training.numb_steps = 0: no step to train"),
    ("steps-negative", "training.numb_steps", -5, "training.numb_steps = -5"),
    ("disp-freq-0", "training.disp_freq", 0, "training.disp_freq = 0"),
    ("save-freq-0", "training.save_freq", 0, "training.save_freq = 0"),
    ("batch-0", "training.training_data.batch_size", 0, "batch_size = 0: a batch size is a whole number"),
    ("batch-negative", "training.training_data.batch_size", -1, "batch_size = -1"),
    ("batch-bool", "training.training_data.batch_size", True, "batch_size = True"),
    ("batch-mixed", "training.training_data.batch_size", "mixed:4", "batch_size = 'mixed:4'"),
    ("batch-auto-0", "training.training_data.batch_size", "auto:0", "batch_size = 'auto:0'"),
    ("batch-filter-all", "training.training_data.batch_size", "filter:10", "removes every system"),
    ("batch-list-length", "training.training_data.batch_size", [1, 2], "one batch size per system"),
    ("batch-list-zero", "training.training_data.batch_size", [0], "0 is no batch size"),
    ("batch-word", "training.training_data.batch_size", "sometimes", "batch_size = 'sometimes'"),
    ("valid-batch-0", "training.validation_data.batch_size", 0, "validation_data.batch_size = 0"),
    ("valid-numb-btch-0", "training.validation_data.numb_btch", 0, "numb_btch = 0"),
    ("start-lr-0", "learning_rate.start_lr", 0.0, "learning_rate.start_lr = 0.0"),
    ("start-lr-negative", "learning_rate.start_lr", -1e-3, "learning_rate.start_lr = -0.001"),
    ("stop-lr-above-start", "learning_rate.stop_lr", 1e-2, "an exponential decay cannot rise"),
    ("decay-steps-0", "learning_rate.decay_steps", 0, "decay_steps (0) must be positive"),  # upstream's schema
    ("pref-negative", "loss.start_pref_f", -1.0, "loss.start_pref_f = -1.0"),
    ("sel-length", "model.descriptor.sel", [46], "one entry per type"),
    ("sel-too-small", "model.descriptor.sel", [2, 4], "neighbours within rcut"),
    ("rcut-smth-above-rcut", "model.descriptor.rcut_smth", 7.0, "model.descriptor.rcut_smth = 7.0"),
]


def _refused(tmp_path: Path, inp: dict, *args: str, capsys) -> str:
    f = tmp_path / "input.json"
    f.write_text(json.dumps(inp))
    out = tmp_path / "out"
    rc = cli.main(["train", str(f), "--device", "cpu", "--output", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err[-5:]
    errors = [x for x in err if x.startswith("dpharness: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err[-5:]
    assert not out.exists()  # nothing written: no checkpoint
    return errors[0]


@pytest.fixture
def user_dir(tiny_system, tmp_path) -> Path:
    (tmp_path / "data").symlink_to(tiny_system / "data")
    return tmp_path


@pytest.mark.parametrize("case,key,value,words", VALUES, ids=[v[0] for v in VALUES])
def test_a_value_no_training_can_use_is_refused(user_dir, tiny_system, capsys, case, key, value, words):
    line = _refused(user_dir, _set(_input(tiny_system), key, value), capsys=capsys)
    assert str(user_dir / "input.json") in line and words in line, line


def test_a_decay_rate_above_one_and_every_prefactor_off_are_refused(user_dir, tiny_system, capsys):
    inp = _set(_input(tiny_system), "learning_rate.decay_rate", 1.5)
    assert "decay_rate (1.5) must be in (0, 1]" in _refused(user_dir, inp, capsys=capsys)  # upstream's schema
    off = _input(tiny_system)
    off["loss"] = {"type": "ener", **{f"{w}_pref_{t}": 0.0 for w in ("start", "limit") for t in "efv"}}
    assert "every prefactor is 0: no label trains" in _refused(user_dir, off, capsys=capsys)
    virial_only = _input(tiny_system)
    virial_only["loss"] = {"type": "ener", "start_pref_e": 0.0, "limit_pref_e": 0.0, "start_pref_f": 0.0,
                           "limit_pref_f": 0.0, "start_pref_v": 1.0, "limit_pref_v": 1.0}
    assert "only labels the training data lacks (virial.npy)" in _refused(user_dir, virial_only, capsys=capsys)


@pytest.fixture(scope="module")
def trained(tiny_system, tmp_path_factory) -> Path:
    """A 2-step baseline checkpoint and its frozen model, the files the flags below are given."""
    d = tmp_path_factory.mktemp("ckpt")
    (d / "data").symlink_to(tiny_system / "data")
    (d / "input.json").write_text(json.dumps(_input(tiny_system)))
    assert cli.main(["train", str(d / "input.json"), "--variant", "baseline", "--device", "cpu",
                     "--output", str(d / "run"), "--freeze"]) == 0
    return d / "run"


def test_files_that_are_not_checkpoints_of_this_model_are_refused(user_dir, tiny_system, trained, capsys):
    inp = _input(tiny_system)
    text = user_dir / "notes.pt"
    text.write_text("not a checkpoint\n")
    ckpt = trained / "model.ckpt-2.pt"
    cases = [
        (("--restart", str(text)), "not a PyTorch checkpoint"),
        (("--init-model", str(text)), "not a PyTorch checkpoint"),
        (("--restart", str(trained)), "a folder, not a checkpoint"),
        (("--restart", str(trained / "frozen_model.pth")), "a frozen model (TorchScript"),
        (("--init-model", str(trained / "frozen_model.pth")), "a frozen model (TorchScript"),
        (("--restart", str(trained / "input.json")), "not a PyTorch checkpoint"),
    ]
    for args, words in cases:
        line = _refused(user_dir, inp, *args, capsys=capsys)
        assert f"{args[0]} {args[1]}: " in line and words in line, line
    other = _set(inp, "model.fitting_net.neuron", [8, 8])  # another model shape than the checkpoint's
    line = _refused(user_dir, other, "--init-model", str(ckpt), capsys=capsys)
    assert "of another model" in line and "fitting" in line and "shape" in line, line
    line = _refused(user_dir, inp, "--restart", str(ckpt), capsys=capsys)  # at step 2 of numb_steps 2
    assert "checkpoint is at step 2 already: nothing left to train" in line, line


def test_a_good_restart_still_trains(user_dir, tiny_system, trained) -> None:
    """The checks refuse only what cannot train: the same checkpoint restarts a longer run."""
    inp = _set(_input(tiny_system), "training.numb_steps", 4)
    (user_dir / "input.json").write_text(json.dumps(inp))
    assert cli.main(["train", str(user_dir / "input.json"), "--variant", "baseline", "--device", "cpu",
                     "--output", str(user_dir / "more"), "--restart", str(trained / "model.ckpt-2.pt")]) == 0
    assert (user_dir / "more" / "model.ckpt-4.pt").is_file()
    assert not [p for p in (user_dir / "more").iterdir() if ".tmp" in p.name]  # checkpoints written atomically


def test_a_folder_another_training_writes_to_is_refused(user_dir, tiny_system, capsys) -> None:
    from filelock import FileLock

    from harness.run import user_train

    (user_dir / "input.json").write_text(json.dumps(_input(tiny_system)))
    out = user_dir / "busy"
    out.mkdir()
    args = ["train", str(user_dir / "input.json"), "--variant", "baseline", "--device", "cpu", "--output", str(out)]
    with FileLock(str(out / user_train.LOCK_NAME)):  # as a running `dpharness train` holds it
        assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "another dpharness train is writing there" in err[-1] and len([x for x in err if "error" in x]) == 1
    assert not list(out.glob("model.ckpt*"))
    assert cli.main(args) == 0  # released (as when its holder exits or is killed): it trains
    assert (out / "model.ckpt-2.pt").is_file()
