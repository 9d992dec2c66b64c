"""What `dpharness train` refuses before it trains: values upstream's input schema accepts but a
training cannot use, read from the input as upstream normalised it (its defaults filled in), and
the data they meet. Each refusal is one line naming the input file, the key as the user writes it,
its value and why (UserError: exit 2), raised before the output folder is touched. Pure checks of
the input and the data sets; the checkpoint files are checked by upstream's own reader in a child
(harness/prepare/checkpoint_check.py)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from harness.core.errors import UserError
from harness.prepare.train_support import dotted

BATCH_RULE = re.compile(r"(auto|max|filter):(\d+)")  # upstream 3.2.0 deepmd/pt/utils/dataloader.py
LABEL_FILES = {"e": "energy.npy", "f": "force.npy", "v": "virial.npy"}


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _refuse(where: str, key: str, value: Any, why: str) -> UserError:
    return UserError(f"{where}: {key} = {value!r}: {why}")


def check_batch_size(value: Any, key: str, natoms: list[int], where: str) -> None:
    """The forms upstream's PyTorch data loader takes: a positive int, a list of them (one per
    system), "auto", "auto:N", "max:N", "filter:N" with N >= 1 ("filter" keeps some system)."""
    if isinstance(value, bool) or (_number(value) and (int(value) != value or value < 1)):
        raise _refuse(where, key, value, "a batch size is a whole number of frames >= 1")
    if isinstance(value, list):
        if len(value) != len(natoms):
            raise _refuse(where, key, value, f"one batch size per system: {len(natoms)} systems, {len(value)} sizes")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _refuse(where, key, value, f"{v!r} is no batch size (a whole number of frames >= 1)")
    if isinstance(value, str) and value != "auto":
        m = BATCH_RULE.fullmatch(value)
        if m is None:
            raise _refuse(where, key, value, "upstream's PyTorch trainer takes an integer, a list, \"auto\", "
                                             "\"auto:N\", \"max:N\" or \"filter:N\"")
        n = int(m.group(2))
        if n < 1:
            raise _refuse(where, key, value, "the rule's atom count must be >= 1 (it gives batches of 0 frames)")
        if m.group(1) == "filter" and natoms and min(natoms) > n:
            raise _refuse(where, key, value, f"removes every system (the smallest has {min(natoms)} atoms)")


def check_steps(inp: dict, where: str, start_step: int = 0) -> None:
    tr = inp.get("training") or {}
    steps = tr.get("numb_steps")
    if not _number(steps) or steps < 1 or int(steps) != steps:
        raise _refuse(where, "training.numb_steps", steps, "no step to train (a whole number >= 1)")
    if start_step and steps <= start_step:
        raise _refuse(where, "training.numb_steps", steps,
                      f"the checkpoint is at step {start_step} already: nothing left to train (raise numb_steps)")
    for key in ("disp_freq", "save_freq"):
        v = tr.get(key)
        if v is not None and (not _number(v) or v < 1 or int(v) != v):
            raise _refuse(where, f"training.{key}", v, "a frequency in steps is a whole number >= 1")


def check_learning_rate(inp: dict, where: str) -> None:
    """(decay_steps <= 0 and decay_rate outside (0, 1] are refused by upstream's schema itself.)"""
    lr = inp.get("learning_rate") or {}
    if lr.get("type", "exp") != "exp":
        return  # cosine/wsd: upstream's own checks
    for key in ("start_lr", "stop_lr", "decay_rate", "stop_lr_ratio"):
        v = lr.get(key)
        if v is not None and (not _number(v) or not math.isfinite(v) or v <= 0):
            raise _refuse(where, f"learning_rate.{key}", v, "a learning rate setting must be a finite number > 0")
    start, stop = lr.get("start_lr"), lr.get("stop_lr")
    if start is not None and stop is not None and lr.get("decay_rate") is None and stop > start:
        raise _refuse(where, "learning_rate.stop_lr", stop,
                      f"above start_lr {start!r}: an exponential decay cannot rise")
    if lr.get("stop_lr_ratio") is not None and lr["stop_lr_ratio"] > 1:
        raise _refuse(where, "learning_rate.stop_lr_ratio", lr["stop_lr_ratio"], "above 1 the rate cannot decay")


def check_loss(inp: dict, where: str, labels: dict[str, bool]) -> None:
    """Prefactors: none negative; some label term on (start or limit non-zero) whose label the
    training data has (`labels`: 'e'/'f'/'v' -> some training system has it)."""
    loss = inp.get("loss") or {}
    if loss.get("type", "ener") != "ener":
        return
    prefs = {k: v for k, v in loss.items() if re.fullmatch(r"(start|limit)_pref_\w+", k)}
    for k, v in prefs.items():
        if not _number(v) or not math.isfinite(v) or v < 0:
            raise _refuse(where, f"loss.{k}", v, "a loss prefactor is a finite number >= 0")
    on = [t for t in sorted({k.split("_pref_")[1] for k in prefs})
          if (prefs.get(f"start_pref_{t}") or 0) != 0 or (prefs.get(f"limit_pref_{t}") or 0) != 0]
    if not on:
        raise _refuse(where, "loss", {k: v for k, v in prefs.items()}, "every prefactor is 0: no label trains")
    usable = [t for t in on if labels.get(t, t not in LABEL_FILES)]
    if not usable:
        missing = ", ".join(LABEL_FILES[t] for t in on if t in LABEL_FILES)
        raise _refuse(where, "loss", {f"start_pref_{t}": prefs.get(f"start_pref_{t}") for t in on},
                      f"only labels the training data lacks ({missing}) are switched on: nothing trains")


def check_model(inp: dict, where: str, type_map: list[str]) -> None:
    desc = dotted(inp, "model.descriptor") or {}
    if desc.get("type") not in ("se_e2_a", "se_a"):
        return
    sel = desc.get("sel")
    if isinstance(sel, list):
        if len(sel) != len(type_map):
            raise _refuse(where, "model.descriptor.sel", sel, f"one entry per type of type_map {type_map}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sel) or sum(sel) == 0:
            raise _refuse(where, "model.descriptor.sel", sel, "whole numbers >= 0, not all 0")
    rc, rs = desc.get("rcut"), desc.get("rcut_smth")
    if _number(rc) and rc <= 0:
        raise _refuse(where, "model.descriptor.rcut", rc, "the cut-off radius must be > 0")
    if _number(rc) and _number(rs) and not 0 <= rs < rc:
        raise _refuse(where, "model.descriptor.rcut_smth", rs, f"must lie in [0, rcut = {rc!r})")


def check_sel_covers(inp: dict, where: str, stats: dict) -> None:
    """sel >= the largest neighbour count per type within rcut that the data has (upstream would
    drop the farthest neighbours of a crowded atom: a different model, not an error)."""
    sel, most = stats.get("sel"), stats.get("max_neighbours")
    if not isinstance(sel, list) or most is None:
        return
    short = [(i, s, m) for i, (s, m) in enumerate(zip(sel, most)) if int(s) < int(m)]
    if short:
        i, s, m = short[0]
        raise _refuse(where, "model.descriptor.sel", sel,
                      f"type {i} has up to {m} neighbours within rcut {stats['rcut']:g} in the data, sel allows "
                      f"{s} (set sel >= {list(map(int, most))}, or \"auto\")")


def check_validation(inp: dict, where: str) -> None:
    n = dotted(inp, "training.validation_data.numb_btch")
    if n is not None and (not _number(n) or n < 1 or int(n) != n):
        raise _refuse(where, "training.validation_data.numb_btch", n, "a whole number of batches >= 1")


def labels_present(datasets: list[Path]) -> dict[str, bool]:
    """Which labels some training system has in every one of its sets."""
    out = {}
    for t, name in LABEL_FILES.items():
        out[t] = any(all((s / name).is_file() for s in Path(d).glob("set.*") if s.is_dir()) for d in datasets)
    return out


def natoms_of(datasets: list[Path]) -> list[int]:
    out = []
    for d in datasets:
        with open(Path(d) / "type.raw") as f:
            out.append(len(f.read().split()))
    return out


def preflight(inp: dict, where: str, type_map: list[str], train: list[Path], validation: list[Path],
              start_step: int = 0, neighbour_stats: dict | None = None) -> None:
    """Every check above on the normalised input; UserError at the first that fails."""
    check_steps(inp, where, start_step)
    for part, sets in (("training_data", train), ("validation_data", validation)):
        bs = dotted(inp, f"training.{part}.batch_size")
        if bs is not None and sets:
            check_batch_size(bs, f"training.{part}.batch_size", natoms_of(sets), where)
    check_validation(inp, where)
    check_learning_rate(inp, where)
    check_loss(inp, where, labels_present(train))
    check_model(inp, where, type_map)
    if neighbour_stats is not None:
        check_sel_covers(inp, where, neighbour_stats)
