"""Shared by the fast-path variant tests (graph, fused): the upstream tree on sys.path, small
systems (a triclinic 3-type fcc box with rcut beyond the box, a water subset), upstream inputs
for them, upstream Trainers built from those inputs, and upstream-format batches.

Importing this module skips the importing test module when no upstream tree can be built."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from harness.child import pycode

REPO = Path(__file__).resolve().parents[1]
WATER = REPO / "systems" / "water" / "data"


def upstream_tree() -> Path:
    """The harness's own (cached) baseline build, or DPH_UPSTREAM_TREE when set."""
    if os.environ.get("DPH_UPSTREAM_TREE"):
        return Path(os.environ["DPH_UPSTREAM_TREE"])
    from harness.prepare import build

    return build.build_variant("baseline").tree


TREE = upstream_tree()
if not (TREE / "deepmd").is_dir():
    pytest.skip(f"no upstream tree at {TREE} (set DPH_UPSTREAM_TREE)", allow_module_level=True)
torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
if str(TREE) not in sys.path:
    sys.path.insert(0, str(TREE))


def python_c(code: str, *args: str) -> list[str]:
    """The command of `python -c code args` for a driver that runs upstream's PyTorch backend from
    TREE, spelled `python -m harness.child.pycode` so the fork server serves it (docs/testing.md)."""
    return pycode.command(TREE, code, *args)


def write_system(path: Path, coords, boxes, types, type_map, energy, force, virial=None) -> Path:
    (path / "set.000").mkdir(parents=True, exist_ok=True)
    np.savetxt(path / "type.raw", np.asarray(types, dtype=int), fmt="%d")
    (path / "type_map.raw").write_text("\n".join(type_map) + "\n")
    nf = coords.shape[0]
    np.save(path / "set.000" / "coord.npy", coords.reshape(nf, -1))
    np.save(path / "set.000" / "box.npy", boxes.reshape(nf, 9))
    np.save(path / "set.000" / "energy.npy", energy.reshape(nf))
    np.save(path / "set.000" / "force.npy", force.reshape(nf, -1))
    if virial is not None:
        np.save(path / "set.000" / "virial.npy", virial.reshape(nf, 9))
    return path


def fcc_system(path: Path, nframes: int, seed: int) -> Path:
    """32-atom triclinic fcc cell (~6.4 A) with 3 types, random displacements and labels."""
    rng = np.random.default_rng(seed)
    a = 3.2
    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cells = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)])
    frac = ((cells[:, None, :] + basis[None]) / 2.0).reshape(-1, 3)
    box = np.array([[2 * a, 0, 0], [0.6, 2 * a, 0], [0.3, 0.4, 2 * a]])
    types = np.array([0] * 16 + [1] * 10 + [2] * 6)
    order = rng.permutation(32)
    coords, boxes = [], []
    for _ in range(nframes):
        bx = box * (1 + 0.02 * rng.standard_normal())
        c = frac[order] @ bx + 0.12 * rng.standard_normal((32, 3))
        coords.append(c)
        boxes.append(bx)
    coords, boxes = np.array(coords), np.array(boxes)
    energy = -3.5 * 32 + rng.standard_normal(nframes)
    force = rng.standard_normal((nframes, 32, 3))
    virial = rng.standard_normal((nframes, 9))
    return write_system(path, coords, boxes, types, ["A", "B", "C"], energy, force, virial)


def water_subset(path: Path, src: Path, nframes: int) -> Path:
    s = src / "set.000"
    coords = np.load(s / "coord.npy")[:nframes]
    return write_system(
        path,
        coords,
        np.load(s / "box.npy")[:nframes],
        np.loadtxt(src / "type.raw", dtype=int),
        (src / "type_map.raw").read_text().split(),
        np.load(s / "energy.npy")[:nframes],
        np.load(s / "force.npy")[:nframes],
    )


def _training_section(train, valid, steps: int) -> dict:
    """The `training` input of both test systems: batch 1, one validation batch, lcurve every 10."""
    return {
        "training_data": {"systems": [str(p) for p in train], "batch_size": 1},
        "validation_data": {"systems": [str(p) for p in valid], "batch_size": 1, "numb_btch": 1},
        "numb_steps": steps, "seed": 10, "disp_file": "lcurve.out", "disp_freq": 10, "save_freq": 10,
    }


def fcc_config(train, valid, tos: bool, steps: int = 20, sel=(60, 40, 30), prec="float64") -> dict:
    return {
        "model": {
            "type_map": ["A", "B", "C"],
            "descriptor": {
                "type": "se_e2_a", "sel": list(sel), "rcut_smth": 1.0, "rcut": 7.0,
                "neuron": [8, 16], "resnet_dt": False, "axis_neuron": 4,
                "type_one_side": tos, "precision": prec, "seed": 1,
            },
            "fitting_net": {"neuron": [16, 16], "resnet_dt": True, "precision": prec, "seed": 1},
        },
        "learning_rate": {"type": "exp", "decay_steps": 5, "start_lr": 0.001, "stop_lr": 3.51e-8},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000,
                 "limit_pref_f": 1, "start_pref_v": 0.5, "limit_pref_v": 1},
        "training": _training_section(train, valid, steps),
    }


def water_config(train, valid, tos: bool, steps: int = 20) -> dict:
    return {
        "model": {
            "type_map": ["O", "H"],
            "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut_smth": 0.5, "rcut": 6.0,
                           "neuron": [25, 50, 100], "resnet_dt": False, "axis_neuron": 16,
                           "type_one_side": tos, "precision": "float64", "seed": 1},
            "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "precision": "float64", "seed": 1},
        },
        "learning_rate": {"type": "exp", "decay_steps": 5000, "start_lr": 0.001, "stop_lr": 3.51e-8},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000,
                 "limit_pref_f": 1, "start_pref_v": 0, "limit_pref_v": 0},
        "training": _training_section(train, valid, steps),
    }



def case_config(case: str, data: dict) -> dict:
    """The input of a named test case: "water-..." (skipped without the water data) or the 3-type
    fcc system, with type_one_side true when the name says "tos-true"."""
    import pytest

    if case.startswith("water"):
        if "water_train" not in data:
            pytest.skip("water data not present")
        return water_config(data["water_train"], data["water_valid"], tos="tos-true" in case)
    return fcc_config(data["fcc_train"], data["fcc_valid"], tos="tos-true" in case)

def build_trainer(cfg: dict, workdir: Path):
    """Let upstream's own `dp --pt train` build the Trainer, and stop before training."""
    from deepmd.main import main
    from deepmd.pt.train import training

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "input.json").write_text(json.dumps(cfg))
    box = {}
    orig = training.Trainer.run

    def grab(self):
        box["trainer"] = self

    old = os.getcwd()
    training.Trainer.run = grab
    try:
        os.chdir(workdir)
        main(["--pt", "train", "input.json"])
    finally:
        training.Trainer.run = orig
        os.chdir(old)
    return box["trainer"]


def rel(a, b) -> float:
    a = a.detach().reshape(-1)
    b = b.detach().reshape(-1).to(a.dtype)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("variantdata")
    out = {
        "fcc_train": [fcc_system(d / "fcc0", 4, 0), fcc_system(d / "fcc1", 3, 1)],
        "fcc_valid": [fcc_system(d / "fccv", 2, 2)],
    }
    if (WATER / "data_0" / "set.000").is_dir():
        out["water_train"] = [water_subset(d / "w0", WATER / "data_0", 3)]
        out["water_valid"] = [water_subset(d / "w3", WATER / "data_3", 2)]
    return out


def frames_of(trainer, sid: int = 0, n: int = 3):
    s = trainer.training_dataloader.dataset.systems[sid]
    frs = [s[i] for i in range(min(n, len(s)))]
    coord = torch.tensor(np.stack([f["coord"] for f in frs]))
    atype = torch.tensor(np.stack([f["atype"] for f in frs])).long()
    box = torch.tensor(np.stack([np.asarray(f["box"]) for f in frs]))
    return frs, coord, atype, box


def upstream_forward(tr, coord, atype, box):
    """Upstream's model on frames shaped as frames_of returns them."""
    nf = coord.shape[0]
    return tr.model(coord.reshape(nf, -1), atype, box=box.reshape(nf, 9))


def engine_and_upstream(eng, tr):
    """(the engine's predict_frames, upstream's model) on the trainer's first frames."""
    _, coord, atype, box = frames_of(tr)
    ref = upstream_forward(tr, coord, atype, box)
    return eng.predict_frames(coord, atype, box), ref


def assert_float32_parity(out, ref) -> None:
    """A float32 engine vs upstream in float32: energy to 1e-6, forces and virial to 1e-4."""
    assert rel(out["energy"], ref["energy"]) < 1e-6
    assert rel(out["force"], ref["force"]) < 1e-4
    assert rel(out["virial"], ref["virial"]) < 1e-4



def _upstream_batch(trainer, frame: dict, need_virial: bool):
    """One frame as upstream's wrapper takes it, on the device upstream built its model on."""
    dev = next(trainer.wrapper.parameters()).device
    inp = {
        "coord": torch.tensor(np.asarray(frame["coord"]))[None],
        "atype": torch.tensor(np.asarray(frame["atype"])).long()[None],
        "box": torch.tensor(np.asarray(frame["box"]))[None],
    }
    label = {
        "energy": torch.tensor(np.asarray(frame["energy"]))[None],
        "force": torch.tensor(np.asarray(frame["force"]))[None],
        "find_energy": frame["find_energy"],
        "find_force": frame["find_force"],
    }
    if need_virial:
        label["virial"] = torch.tensor(np.asarray(frame["virial"]))[None]
        label["find_virial"] = frame["find_virial"]
    inp = {k: v.to(dev) for k, v in inp.items()}
    label = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in label.items()}
    return inp, label


def upstream_reference_step(tr, lr):
    """One upstream Adam step (the body of Trainer._run's step) on training frame 1 at `lr`, then
    the weights are put back. Returns params, their start values p0, upstream's loss and metrics,
    gradients and updated values, so a variant's step can be compared from the same state."""
    from types import SimpleNamespace

    params = list(tr.wrapper.parameters())
    p0 = [p.detach().clone() for p in params]
    frame = tr.training_dataloader.dataset.systems[0][1]
    inp, label = _upstream_batch(tr, frame, tr.loss.has_v)
    tr.optimizer.zero_grad(set_to_none=True)
    for g in tr.optimizer.param_groups:
        g["lr"] = lr
    _, loss_u, more_u = tr.wrapper(**inp, cur_lr=lr, label=label)
    loss_u.backward()
    grads_u = [None if p.grad is None else p.grad.detach().clone() for p in params]
    tr.optimizer.step()
    p1_u = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, p0):
            p.copy_(v)
    return SimpleNamespace(params=params, p0=p0, frame=frame, loss_u=loss_u, more_u=more_u,
                           grads_u=grads_u, p1_u=p1_u)


def assert_engine_step_matches(eng, ref, lr, label: str, rtol: float) -> None:
    """A graph-style engine's eager training step on training frame 1 (built data, fresh optimizer)
    against `ref` = upstream_reference_step: loss, metrics, every gradient, the Adam update."""
    eng.build_data()
    eng.make_optimizer()
    G = eng.groups[0]
    idx = torch.tensor([1], device=eng.device)
    eng.opt.zero_grad(set_to_none=True)
    for g in eng.opt.param_groups:
        g["lr"] = lr
    # train_step split open, to look at the gradients before the update
    rt, jac, jidx, diff, labels = eng.gather(G.geom, G.labels, idx)
    pred = eng.predict(rt, jac, jidx, diff, G.tcount, G.bias, create_graph=True)
    loss_g, more_g = eng.loss_and_more(pred, labels, lr, **G.loss_inputs())
    loss_u, more_u = ref.loss_u, ref.more_u
    assert abs(float(loss_g.detach()) - float(loss_u.detach())) <= rtol * abs(float(loss_u))
    for k in more_u:
        if "l2_" not in k and torch.is_tensor(more_u[k]):
            assert abs(float(more_g[k]) - float(more_u[k])) <= 1e-9 * abs(float(more_u[k])), k
    loss_g.backward()
    params, grads_u = ref.params, ref.grads_u
    n_checked = 0
    for p, gu in zip(params, grads_u):
        if gu is None or gu.numel() == 0:
            assert p.grad is None or p.grad.abs().max() == 0
            continue
        assert p.grad is not None
        e = rel(p.grad, gu)
        assert e <= rtol, f"{label}: gradient relative error {e:.3e} for a {tuple(p.shape)} parameter"
        n_checked += 1
    assert n_checked > 4
    gall = torch.cat([p.grad.reshape(-1) for p, gu in zip(params, grads_u) if gu is not None and gu.numel()])
    uall = torch.cat([gu.reshape(-1) for gu in grads_u if gu is not None and gu.numel()])
    assert rel(gall, uall) <= rtol, f"{label}: gradient relative error {rel(gall, uall):.3e} (all parameters)"
    eng.opt.step()
    du = torch.cat([(a - b).reshape(-1) for a, b in zip(ref.p1_u, ref.p0)])
    dg = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, ref.p0)])
    assert float(du.norm()) > 0
    assert rel(dg, du) <= rtol, f"{label}: parameter update relative error {rel(dg, du):.3e}"


def upstream_adam_step(tr, inp: dict, label: dict, lr: float, params=None):
    """One step of upstream's own training on a given batch (tr.wrapper with its EnergyStdLoss,
    then a *fresh* torch Adam, as the gate's parity step does; upstream_reference_step uses the
    trainer's own optimizer on training frame 1) from the current weights, which are put back
    afterwards. Returns (params, weights before, loss, gradients [None where
    a parameter got none], updates), per parameter."""
    params = list(tr.wrapper.parameters()) if params is None else params
    p0 = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    opt.zero_grad(set_to_none=True)
    _, loss, _ = tr.wrapper(**inp, cur_lr=lr, label=label)
    loss.backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    opt.step()
    upd = [p.detach() - a for p, a in zip(params, p0)]
    with torch.no_grad():
        for p, a in zip(params, p0):
            p.copy_(a)
            p.grad = None
    return params, p0, float(loss.detach()), grads, upd


def load_fused_patches(monkeypatch) -> None:
    """Load graph's and fused's patch modules in-process, as the training process does: they set
    the accuracy-gate hooks (harness.child.runtime) and make upstream's Trainer.run train with the
    fused engine, all through harness.core.rebind, and all put back after the test (tests/conftest.py
    runs every test in a rebind scope). `monkeypatch`: kept for the callers' fixtures (knobs)."""
    import importlib.util

    from dpfast import stats

    # install() also replaces upstream's neighbour-list builders (dpfast.stats); they are put back
    # right after loading, so the upstream forward these tests compare with is upstream's own (as
    # the gate's reference, always the unpatched build); tests/engines/test_stats.py tests them.
    # The rest is put back after the test (tests/conftest.py: every test runs in a rebind scope).
    for name, d in (("select_engine", "graph"), ("select_engine", "fused")):
        spec = importlib.util.spec_from_file_location(f"t_{name}", REPO / "patches" / d / f"{name}.py")
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
    stats.uninstall()


@pytest.fixture
def knobs(monkeypatch):
    """fused's options as its manifest sets them (the benchmarked path), applied on CPU with the
    fast aot_eager backend (tests may override); no fallback allowed (a failed compile raises, as
    a fused run without DPH_ENGINE_ALLOW_FALLBACK)."""
    from harness.prepare import variants

    for k, v in variants.chain_env(variants.chain("fused")).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DPH_COMPILE_CPU", "1")
    monkeypatch.setenv("DPH_COMPILE_BACKEND", "aot_eager")
    monkeypatch.delenv("DPH_ENGINE_ALLOW_FALLBACK", raising=False)
    import torch._dynamo

    torch._dynamo.reset()
    yield monkeypatch
    torch._dynamo.reset()


def first_frames(src: Path, dst: Path, n: int) -> Path:
    """A copy of the data set `src` (one set.000) with its first `n` frames, at `dst`."""
    import shutil

    import numpy as np

    (dst / "set.000").mkdir(parents=True)
    for f in ("type.raw", "type_map.raw"):
        shutil.copy(src / f, dst / f)
    for p in (src / "set.000").glob("*.npy"):
        np.save(dst / "set.000" / p.name, np.load(p)[:n])
    return dst
