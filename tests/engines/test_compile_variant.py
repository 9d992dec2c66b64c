"""Tests of the `compile` variant (patches/compile: make_fx of energy + first derivative, then
torch.compile) and of `compile-naive` (torch.compile of upstream's model, recorded as failed).

Fast tests compile with backend aot_eager (DPH_COMPILE_BACKEND, unless already set): the same
make_fx graph, the same graph repairs and the same AOTAutograd first-order backward as Inductor,
without the C++ code generation that takes minutes on a small CPU. The slow ones use Inductor.

1. energy, atom energy, forces, virial and forward_common's dict (keys, shapes, dtypes) vs
   upstream's eager model on the same weights, float64, relative <= 1e-12: 3-type triclinic fcc
   (type_one_side false and true; an alcumg-like multi-type system) and water;
2. one training step (upstream EnergyStdLoss + Adam): loss, every gradient (<= 1e-10) and every
   update (<= 1e-8) vs upstream;
3. the compile cache: frames of one padded shape share one graph, also with other atom-type
   layouts (type_one_side false: se_e2_a's type masks are a multiply in the trace), and are
   still right; the padding is really there; a data-dependent op left in a graph fails the build;
4. fallbacks: eval mode and a non-se_e2_a descriptor run upstream's code;
5. slow: Inductor on CPU; `bench --variant compile` end to end with the accuracy gate;
   `compile-naive` recorded failed with the double-backward reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from harness.cli import main as cli

from _upstream_fixtures import (  # noqa: E402,F401  (data is a fixture)
    _upstream_batch, build_trainer, case_config, data, fcc_config, frames_of, rel, torch, upstream_adam_step,
)

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "engines" / "dpfast" / "upstream_compile.py"
FTOL = 1e-10
UTOL = 1e-8
PTOL = 1e-12  # forward energy/force/virial vs upstream eager


@pytest.fixture(scope="module")
def cm():
    """The patch module, installed for this module's tests and removed afterwards."""
    old = os.environ.get("DPH_COMPILE_BACKEND")
    os.environ["DPH_COMPILE_BACKEND"] = old or "aot_eager"
    spec = importlib.util.spec_from_file_location("dph_test_compile_model", MODULE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.install()
    try:
        yield mod
    finally:
        mod.uninstall()
        if old is None:
            os.environ.pop("DPH_COMPILE_BACKEND", None)
        else:
            os.environ["DPH_COMPILE_BACKEND"] = old


@contextlib.contextmanager
def upstream_only(cm):
    cm.uninstall()
    try:
        yield
    finally:
        cm.install()


_TRAINERS: dict = {}


def trainer(case: str, data, tmp_path_factory):
    if case not in _TRAINERS:
        _TRAINERS[case] = build_trainer(case_config(case, data), tmp_path_factory.mktemp(case))
    return _TRAINERS[case]


def _forward(model, coord, atype, box):
    return model(coord.reshape(coord.shape[0], -1), atype, box=box)


def _common(model, coord, atype, box):
    return model.forward_common(coord.reshape(coord.shape[0], -1), atype, box=box)


def _assert_same_outputs(out, ref, tol=FTOL):
    assert set(out) == set(ref)
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype, k
        if ref[k].is_floating_point():
            r = rel(out[k], ref[k])
            assert r <= tol, (k, r)
        else:
            assert torch.equal(out[k], ref[k]), k


@pytest.mark.parametrize("case", ["fcc-tos-false", "fcc-tos-true", "water-tos-false"])
def test_forward_matches_upstream_and_takes_the_compiled_path(cm, case, data, tmp_path_factory):
    tr = trainer(case, data, tmp_path_factory)
    model = tr.model
    model.train()
    assert cm.model_reason(model) is None
    _, coord, atype, box = frames_of(tr, 0, 2)
    with upstream_only(cm):
        ref = {k: v.detach() for k, v in _forward(model, coord, atype, box).items()}
        ref_c = {k: v.detach() for k, v in _common(model, coord, atype, box).items()}
    n0 = cm.STATS["compiled_calls"]
    out = _forward(model, coord, atype, box)
    assert cm.STATS["compiled_calls"] == n0 + 1
    assert {"energy", "force", "virial", "atom_energy"} <= set(out)
    print(case, "forward relative error vs upstream:",
          {k: rel(out[k], ref[k]) for k in ref if ref[k].is_floating_point()})
    _assert_same_outputs(out, ref, tol=PTOL)
    assert out["force"].requires_grad and out["energy"].requires_grad  # training graph kept
    out_c = _common(model, coord, atype, box)
    assert cm.STATS["compiled_calls"] == n0 + 2
    _assert_same_outputs(out_c, ref_c)
    assert list(out_c) == list(ref_c)  # same keys in upstream's order
    # the graph was traced for a padded extended region
    keys = list(model.__dict__[cm._CACHE_ATTR])
    assert keys and all(k[2] % cm.bucket() == 0 for k in keys)


def test_frames_of_other_type_layouts_share_one_graph_and_stay_right(cm, data, tmp_path_factory):
    tr = trainer("fcc-tos-false", data, tmp_path_factory)
    model = tr.model
    model.train()
    object.__setattr__(model, cm._CACHE_ATTR, {})
    cache = model.__dict__[cm._CACHE_ATTR]
    _, coord, atype, box = frames_of(tr, 0, 3)
    for i in range(3):  # three frames, different ghosts, one (nf=1) shape bucket
        out = _forward(model, coord[i:i + 1], atype[i:i + 1], box[i:i + 1])
    assert len(cache) == 1
    sea = model.atomic_model.descriptor.sea
    assert "forward" not in sea.__dict__  # the masked forward is only there while tracing
    gen = torch.Generator().manual_seed(3)
    layouts = [atype[:1, torch.randperm(atype.shape[1], generator=gen)],  # types shuffled over sites
               torch.zeros_like(atype[:1]),  # one type only: the other centre types absent
               torch.randint(0, 3, atype[:1].shape, generator=gen)]  # other type counts
    for i, at2 in enumerate(layouts):
        assert not torch.equal(at2, atype[:1])
        with upstream_only(cm):
            ref = {k: v.detach() for k, v in _forward(model, coord[i:i + 1], at2, box[i:i + 1]).items()}
        out = _forward(model, coord[i:i + 1], at2, box[i:i + 1])
        assert len(cache) == 1  # same padded shape, other atom types: the same graph
        print("layout", i, "relative error vs upstream:",
              {k: rel(out[k], ref[k]) for k in ref if ref[k].is_floating_point()})
        _assert_same_outputs(out, ref, tol=PTOL)


def test_a_data_dependent_op_left_in_the_graph_fails_loudly(cm, data, tmp_path_factory, monkeypatch):
    """Without the masked se_e2_a forward, upstream's boolean indexing is traced; the build must
    refuse that graph (never train through something else)."""
    tr = trainer("fcc-tos-false", data, tmp_path_factory)
    model = tr.model
    model.train()
    old = model.__dict__[cm._CACHE_ATTR] if cm._CACHE_ATTR in model.__dict__ else None
    object.__setattr__(model, cm._CACHE_ATTR, {})
    monkeypatch.setattr(cm, "_static_type_masks", lambda block: contextlib.nullcontext())
    _, coord, atype, box = frames_of(tr, 0, 1)
    try:
        with pytest.raises(RuntimeError, match="boolean mask|data-dependent"):
            _forward(model, coord, atype, box)
    finally:
        object.__setattr__(model, cm._CACHE_ATTR, old if old is not None else {})

    def dyn(x):
        return x[x > 0].sum() + x.nonzero().shape[0]

    gm = cm.make_fx(dyn, tracing_mode="real")(torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(RuntimeError, match="data-dependent|boolean mask"):
        cm._check_static(gm)


def _one_step(tr, frame, lr):
    """One upstream Adam step (fresh optimizer) through tr.wrapper; weights put back after."""
    inp, label = _upstream_batch(tr, frame, tr.loss.has_v)
    params = [p for p in tr.wrapper.parameters() if p.requires_grad]
    _, _, loss, grads, upd = upstream_adam_step(tr, inp, label, lr, params)
    return loss, grads, upd


@pytest.mark.parametrize("case", ["fcc-tos-false", "water-tos-false"])
def test_training_step_matches_upstream(cm, case, data, tmp_path_factory):
    tr = trainer(case, data, tmp_path_factory)
    tr.wrapper.train()
    frame = tr.training_dataloader.dataset.systems[0][1]
    lr = 1e-3
    with upstream_only(cm):
        loss_u, grads_u, upd_u = _one_step(tr, frame, lr)
    n0 = cm.STATS["compiled_calls"]
    loss_c, grads_c, upd_c = _one_step(tr, frame, lr)
    assert cm.STATS["compiled_calls"] == n0 + 1
    pairs = [(gc, gu, uc, uu) for gc, gu, uc, uu in zip(grads_c, grads_u, upd_c, upd_u)
             if gu is not None and gu.norm() > 0 and gc is not None]
    print(case, "step vs upstream: loss", abs(loss_c - loss_u) / abs(loss_u),
          "max grad rel", max(rel(gc, gu) for gc, gu, _, _ in pairs),
          "max update rel", max(rel(uc, uu) for _, _, uc, uu in pairs))
    assert abs(loss_c - loss_u) <= FTOL * abs(loss_u)
    checked = 0
    for gc, gu, uc, uu in zip(grads_c, grads_u, upd_c, upd_u):
        if gu is None or gu.norm() == 0:
            continue
        assert gc is not None
        assert rel(gc, gu) <= FTOL, rel(gc, gu)
        assert rel(uc, uu) <= UTOL, rel(uc, uu)
        checked += 1
    assert checked >= len(grads_u) // 2


def test_eval_mode_and_other_descriptors_run_upstream(cm, data, tmp_path_factory, tmp_path):
    tr = trainer("fcc-tos-false", data, tmp_path_factory)
    model = tr.model
    _, coord, atype, box = frames_of(tr, 0, 1)
    model.eval()
    try:
        n0, f0 = cm.STATS["compiled_calls"], cm.STATS["fallback_calls"]
        out = _forward(model, coord, atype, box)
        with upstream_only(cm):
            ref = _forward(model, coord, atype, box)
        assert cm.STATS["compiled_calls"] == n0 and cm.STATS["fallback_calls"] == f0 + 1
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    finally:
        model.train()

    from deepmd.pt.train.training import get_model_for_wrapper
    from harness.child.parity_eval import _config

    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False)
    cfg["model"]["descriptor"] = {"type": "se_e2_r", "sel": [60, 40, 30], "rcut_smth": 1.0, "rcut": 7.0,
                                  "neuron": [4, 8], "seed": 1}
    p = tmp_path / "input.json"
    p.write_text(json.dumps(cfg))
    other = get_model_for_wrapper(_config(p)["model"])
    assert "not se_e2_a" in (cm.model_reason(other) or "")
    cfg["model"]["descriptor"] = dict(fcc_config([], [], tos=False)["model"]["descriptor"],
                                      exclude_types=[[0, 1]])
    p.write_text(json.dumps(cfg))
    excl = get_model_for_wrapper(_config(p)["model"])
    assert "exclude" in (cm.model_reason(excl) or "")


@pytest.mark.slow
def test_inductor_on_cpu_forward_and_step_match_upstream(cm, data, tmp_path_factory, monkeypatch):
    """The default backend for real: Inductor's C++ CPU code (minutes of compile here)."""
    monkeypatch.setenv("DPH_COMPILE_BACKEND", "inductor")
    tr = trainer("fcc-tos-false", data, tmp_path_factory)
    model = tr.model
    model.train()
    object.__setattr__(model, cm._CACHE_ATTR, {})
    torch._dynamo.reset()
    frame = tr.training_dataloader.dataset.systems[0][1]
    _, coord, atype, box = frames_of(tr, 0, 1)
    with upstream_only(cm):
        ref = {k: v.detach() for k, v in _forward(model, coord, atype, box).items()}
        loss_u, grads_u, upd_u = _one_step(tr, frame, 1e-3)
    out = _forward(model, coord, atype, box)
    print("inductor forward relative error vs upstream:",
          {k: rel(out[k], ref[k]) for k in ref if ref[k].is_floating_point()})
    _assert_same_outputs(out, ref, tol=PTOL)
    loss_c, grads_c, upd_c = _one_step(tr, frame, 1e-3)
    assert abs(loss_c - loss_u) <= FTOL * abs(loss_u)
    errs = [(rel(gc, gu), rel(uc, uu)) for gc, gu, uc, uu in zip(grads_c, grads_u, upd_c, upd_u)
            if gu is not None and gu.norm() > 0]
    print("inductor step vs upstream: loss", abs(loss_c - loss_u) / abs(loss_u), "max grad rel",
          max(e[0] for e in errs), "max update rel", max(e[1] for e in errs))
    for eg, eu in errs:
        assert eg <= FTOL and eu <= UTOL
    assert cm.STATS["builds"] >= 1


@pytest.mark.slow
def test_bench_compile_trains_and_passes_the_accuracy_gate(tiny_system, tmp_path, monkeypatch):
    monkeypatch.setenv("DPH_COMPILE_BACKEND", os.environ.get("DPH_COMPILE_BACKEND") or "aot_eager")
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "compile", "--steps", "4",
                   "--device", "cpu", "--results-dir", str(tmp_path)])
    assert rc == 0
    recs = {r["variant"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json"))}
    rec = recs["compile"]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["accuracy"]["verdict"] == "pass", rec["accuracy"]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "work").rglob("*.log"))
    assert "compile: traced" in logs  # the compiled path ran (training and/or the gate)


@pytest.mark.slow
def test_compile_naive_of_upstream_model_is_recorded_failed_with_the_double_backward_reason(tiny_system, tmp_path):
    rc = cli.main(["bench", "--system", str(tiny_system), "--variant", "compile-naive", "--no-baseline", "--steps",
                   "3", "--device", "cpu", "--no-accuracy", "--results-dir", str(tmp_path)])
    assert rc == 3
    (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert rec["status"] == "failed"
    assert "does not currently support double backward" in rec["error"]
