"""Tests of fused's compiled whole step (patches/fused's env: DPH_FUSED_COMPILE_STEP=1 and
DPH_FLAT_ADAM_COMPILE=1, CUDA only unless DPH_COMPILE_CPU=1; variant fused-predict turns both off).

1. the step function (gather -> analytic energy/forces -> upstream's EnergyStdLoss) traces into
   ONE dynamo graph with no break (torch._dynamo.explain, CPU), loss included;
2. one training step of the engine with both knobs (DPH_COMPILE_CPU=1; backend aot_eager via the
   test-only DPH_COMPILE_BACKEND, which traces the same graph without Inductor's CPU compile)
   vs upstream's Trainer step: loss, every gradient, updated parameters <= 1e-10 relative
   (compact, on-the-fly and precomputed geometry; tos true/false; water);
   and a broken derivative makes the compiled step disagree (the check can fail);
3. the compiled FlatAdam (Inductor, one fused kernel per bucket) vs torch.optim.Adam/AdamW
   (capturable False and True) and the eager FlatAdam, several steps, <= 1e-12 relative;
4. the accuracy-gate hook parity_train_step runs the compiled step when the knobs are set;
5. (slow) the whole step with Inductor on CPU (both knobs) vs upstream.
The end-to-end `dp --pt train` run of the variant is tests/engines/test_graph_variant.py's
test_end_to_end_train_then_upstream_test[fused].
"""
from __future__ import annotations

import os
import sys
import time
import unittest.mock as um
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from _upstream_fixtures import (  # noqa: E402,F401  (data is a fixture)
    fcc_config, build_trainer, rel, data, _upstream_batch, upstream_reference_step, torch,
    upstream_adam_step, load_fused_patches, case_config, knobs,
)


RTOL = 1e-10




# ------------------------------------------------------------------- 1. one graph
@pytest.mark.parametrize("case,geom", [("fcc-tos-false", "compact"), ("water-tos-false", "compact"),
                                       ("fcc-tos-true", "onthefly"), ("fcc-tos-false", "precomputed")])
def test_step_traces_as_one_graph(case, geom, data, tmp_path, knobs):
    import torch._dynamo
    from dpfast import fused as fused_engine

    knobs.setenv("DPH_GEOM", geom)
    tr = build_trainer(case_config(case, data), tmp_path)
    eng = fused_engine.FusedEngine(tr)
    eng.build_data()
    G = eng.groups[0]
    S = eng._step_view(G)
    ex = torch._dynamo.explain(eng._step_core)(S, torch.tensor([1]), torch.tensor(1e-3, dtype=torch.float64))
    reasons = [r.reason for r in ex.break_reasons]
    assert ex.graph_count == 1 and ex.graph_break_count == 0, reasons
    ops = [str(n.target) for gm in ex.graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert any("index_select" in o for o in ops)  # the gather is inside
    assert any("sqrt" in o for o in ops)  # the loss's rmse metrics are inside
    assert sum("square" in o for o in ops) >= 2  # energy and force terms of the loss


def test_f32flag_product_traces_and_rounds_like_upstream():
    """tensor * F32Flag (upstream's `pref_e * find_energy`): float32-rounded as upstream's
    np.float32 flag rounds, eager and compiled alike, and traced without a graph break."""
    import numpy as np
    import torch._dynamo
    from dpfast import device_data

    lr = torch.tensor(3.3e-4, dtype=torch.float64)

    def pref(lr, flag):
        p = 0.02 + (1000.0 - 0.02) * (lr / 1e-3)
        return p * flag

    f = device_data.F32Flag(1.0)
    want = (0.02 + (1000.0 - 0.02) * (3.3e-4 / 1e-3)) * np.float32(1.0)
    assert float(pref(lr, f)) == float(want) != 0.02 + (1000.0 - 0.02) * 0.33
    torch._dynamo.reset()
    ex = torch._dynamo.explain(pref)(lr, f)
    assert ex.graph_break_count == 0
    assert float(torch.compile(pref, backend="aot_eager", fullgraph=True)(lr, f)) == float(want)
    assert float(pref(lr, device_data.F32Flag(0.0))) == 0.0
    assert 2.0 * f == 2.0  # host floats unchanged


# ------------------------------------------------------------ 2. one training step
def _compiled_step_matches(eng, ref, lr, label, rtol, expect_compiled_adam=True):
    """The engine's forward_backward (compiled step) + update (compiled FlatAdam) on training
    frame 1 against upstream_reference_step. Returns (loss, grads, new params)."""
    import torch._dynamo

    eng.build_data()
    eng.make_optimizer()
    assert eng.compiled_step_wanted()
    assert (eng.opt.compiled is not None) == expect_compiled_adam
    G = eng.groups[0]
    idx = torch.tensor([1], device=eng.device)
    eng.opt.zero_grad(set_to_none=True)
    for g in eng.opt.param_groups:
        g["lr"] = lr
    torch._dynamo.utils.counters.clear()
    loss_g, more_g = eng.forward_backward(G, lr, idx)
    assert eng._step_compiled is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really went through dynamo
    assert abs(float(loss_g) - float(ref.loss_u)) <= rtol * abs(float(ref.loss_u)), (float(loss_g), float(ref.loss_u))
    for k, v in ref.more_u.items():
        if "l2_" not in k and torch.is_tensor(v):
            assert abs(float(more_g[k]) - float(v)) <= 1e-9 * abs(float(v)), k
    n = 0
    for p, gu in zip(ref.params, ref.grads_u):
        if gu is None or gu.numel() == 0:
            assert p.grad is None or p.grad.abs().max() == 0
            continue
        e = rel(p.grad, gu)
        assert e <= rtol, f"{label}: gradient relative error {e:.3e} for a {tuple(p.shape)} parameter"
        n += 1
    assert n > 4
    gall = torch.cat([p.grad.reshape(-1) for p, gu in zip(ref.params, ref.grads_u) if gu is not None and gu.numel()])
    uall = torch.cat([gu.reshape(-1) for gu in ref.grads_u if gu is not None and gu.numel()])
    eg = rel(gall, uall)
    assert eg <= rtol, f"{label}: gradient relative error {eg:.3e}"
    eng.update()
    du = torch.cat([(a - b).reshape(-1) for a, b in zip(ref.p1_u, ref.p0)])
    dg = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(ref.params, ref.p0)])
    assert float(du.norm()) > 0
    eu = rel(dg, du)
    assert eu <= rtol, f"{label}: parameter update relative error {eu:.3e}"
    pg = torch.cat([p.detach().reshape(-1) for p in ref.params])
    pu = torch.cat([p.reshape(-1) for p in ref.p1_u])
    print(f"{label}: loss rel {abs(float(loss_g) - float(ref.loss_u)) / abs(float(ref.loss_u)):.2e} "
          f"grad rel {eg:.2e} update rel {eu:.2e} params rel {rel(pg, pu):.2e}")
    return eg, eu


@pytest.mark.parametrize("case,geom", [("fcc-tos-false", "compact"), ("fcc-tos-true", "compact"),
                                       ("water-tos-false", "compact"), ("fcc-tos-false", "onthefly"),
                                       ("fcc-tos-false", "precomputed")])
def test_compiled_step_parity(case, geom, data, tmp_path, knobs):
    from dpfast import fused as fused_engine

    knobs.setenv("DPH_GEOM", geom)
    tr = build_trainer(case_config(case, data), tmp_path)
    lr = tr.lr_schedule.value(3)  # mid-schedule loss prefactors
    ref = upstream_reference_step(tr, lr)
    eng = fused_engine.FusedEngine(tr)
    _compiled_step_matches(eng, ref, lr, f"{case}/{geom}", RTOL)


def test_compiled_step_detects_a_wrong_derivative(data, tmp_path, knobs):
    """Drop the dG/ds term: the compiled step must then disagree with upstream (so the parity
    above is a real check of the code the compiled step runs)."""
    from dpfast import analytic_nets, fused as fused_engine

    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)
    orig = analytic_nets.embed_with_tangent
    orig_g = analytic_nets.embed_grouped_with_tangent
    orig_p = analytic_nets.embed_packed_with_tangent
    knobs.setattr(analytic_nets, "embed_with_tangent", lambda s, layers: (orig(s, layers)[0], 0.0 * orig(s, layers)[1]))
    knobs.setattr(analytic_nets, "embed_grouped_with_tangent",  # grouped nets, per-block contractions
                  lambda cols, lls: [(G, 0.0 * dG) for G, dG in orig_g(cols, lls)])
    knobs.setattr(analytic_nets, "embed_packed_with_tangent",  # the default path (nets + contractions grouped)
                  lambda x, nets: (orig_p(x, nets)[0], 0.0 * orig_p(x, nets)[1]))
    eng = fused_engine.FusedEngine(tr)
    assert eng.grouped and eng.grouped_contract
    with pytest.raises(AssertionError, match="relative error|loss"):
        _compiled_step_matches(eng, ref, lr, "broken", RTOL)


def test_knobs_off_on_cpu_without_cpu_knob(data, tmp_path, monkeypatch):
    """CUDA-only by default: on CPU the knobs alone change nothing (eager step, eager Adam)."""
    from dpfast import fused as fused_engine

    monkeypatch.setenv("DPH_FUSED_COMPILE_STEP", "1")
    monkeypatch.setenv("DPH_FLAT_ADAM_COMPILE", "1")
    monkeypatch.delenv("DPH_COMPILE_CPU", raising=False)
    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    eng = fused_engine.FusedEngine(tr)
    eng.build_data()
    eng.make_optimizer()
    assert not eng.compiled_step_wanted() and eng.opt.compiled is None


# ------------------------------------------------------------- 3. compiled FlatAdam
def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3),
                               torch.nn.Linear(3, 1)).to(torch.float64)


def _net_loss(m, x, step):
    return (m(x) ** 2).sum() * (1.0 + 0.1 * step)


def _torch_step(opt, capturable):
    if not capturable:
        return opt.step()
    # torch refuses capturable=True off CUDA by a device check skipped while compiling; patched
    # off here to run its capturable single-tensor branch (tensor step, bias corrections on the
    # device) on CPU. The default dtype is float64 then, so its step tensor is float64 as ours.
    with um.patch.object(torch.compiler, "is_compiling", lambda: True):
        opt.step()


@pytest.mark.parametrize("kind,wd", [("Adam", 0.0), ("Adam", 0.05), ("AdamW", 0.05)])
@pytest.mark.parametrize("capturable", [False, True])
def test_flat_adam_compiled_equals_torch(kind, wd, capturable, monkeypatch):
    from dpfast import flat_optim

    monkeypatch.delenv("DPH_COMPILE_BACKEND", raising=False)  # Inductor (C++ on CPU)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, mine, eag = _net(), _net(), _net()
        cls = torch.optim.Adam if kind == "Adam" else torch.optim.AdamW
        topt = cls(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, capturable=capturable)
        flat, flat_e = flat_optim.FlatParams(mine.parameters()), flat_optim.FlatParams(eag.parameters())
        lr = torch.tensor(1e-2, dtype=torch.float64)
        kw = dict(decoupled=kind == "AdamW", lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
        fopt = flat_optim.FlatAdam(flat, compile=True, **kw)
        eopt = flat_optim.FlatAdam(flat_e, compile=False, **kw)
        assert fopt.compiled is not None and eopt.compiled is None
        x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        t0 = time.time()
        for step in range(8):
            lr_s = 1e-2 * 0.7**step
            for g in topt.param_groups:
                g["lr"] = lr_s
            lr.fill_(lr_s)
            topt.zero_grad(set_to_none=True)
            _net_loss(ref, x, step).backward()
            _torch_step(topt, capturable)
            flat.grads_from_loss(_net_loss(mine, x, step))
            fopt.step()
            flat_e.grads_from_loss(_net_loss(eag, x, step))
            eopt.step()
            if step == 0:
                print(f"compiled FlatAdam first step (compile) {time.time() - t0:.1f} s")
        vt = rel(torch.cat([p.reshape(-1) for p in mine.parameters()]), torch.cat([p.reshape(-1) for p in ref.parameters()]))
        ve = rel(torch.cat([p.reshape(-1) for p in mine.parameters()]), torch.cat([p.reshape(-1) for p in eag.parameters()]))
        per = max(rel(p, q) for p, q in zip(mine.parameters(), ref.parameters()))
        print(f"{kind} wd={wd} capturable={capturable}: vs torch {vt:.2e} (worst tensor {per:.2e}), vs eager FlatAdam {ve:.2e}")
        assert vt <= 1e-12 and per <= 1e-12 and ve <= 1e-12
        # moments too
        assert float(fopt.step_t) == 8
        tst = [topt.state[p] for p in ref.parameters()]
        m_t = torch.cat([s["exp_avg"].reshape(-1) for s in tst])
        m_f = torch.cat([m.reshape(-1) for _, m, _ in fopt._views()])
        assert rel(m_f, m_t) <= 1e-12
        # a wrong beta is detected (the comparison can fail)
        bad = flat_optim.FlatAdam(flat_optim.FlatParams(_net().parameters()), compile=True,
                                  **dict(kw, betas=(0.8, 0.99)))
        bad.flat.grads_from_loss(_net_loss(_net(), x, 0))
        for b in bad.flat.buckets:
            b["grad"].normal_()
        bad.step()
        assert rel(bad.flat.buckets[0]["flat"], flat_e.buckets[0]["flat"]) > 1e-6
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------ 4. gate hook
def test_gate_hook_runs_compiled_step(data, tmp_path, knobs):
    import torch._dynamo

    from harness.child import runtime

    load_fused_patches(knobs)
    from dpfast import fused as fused_engine, gate

    assert runtime.parity_train_step is gate.fused_parity_train_step
    # sel large enough that no neighbour list is truncated: upstream's answer is then
    # independent of the atom order, and the batch is shuffled (the hook sorts atoms + labels)
    tr = build_trainer(fcc_config(data["fcc_train"], data["fcc_valid"], tos=False, sel=(100, 70, 50)), tmp_path)
    params = list(tr.wrapper.parameters())
    lr = tr.lr_schedule.value(0)
    frame = tr.training_dataloader.dataset.systems[0][0]
    inp, label = _upstream_batch(tr, frame, tr.loss.has_v)
    nat = inp["coord"].shape[1] // 3 if inp["coord"].dim() == 2 else inp["coord"].shape[1]
    perm = torch.randperm(nat, generator=torch.Generator().manual_seed(0))
    inp = dict(inp, coord=inp["coord"].reshape(1, -1, 3)[:, perm].reshape(inp["coord"].shape), atype=inp["atype"][:, perm])
    label = dict(label, force=label["force"].reshape(1, -1, 3)[:, perm].reshape(label["force"].shape))
    _, p0, _, gu, upd = upstream_adam_step(tr, inp, label, lr, params)
    gu = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gu)]
    du = torch.cat([u.reshape(-1) for u in upd])
    calls = []
    orig = fused_engine.FusedEngine.enable_step_compile
    knobs.setattr(fused_engine.FusedEngine, "enable_step_compile", lambda self: (calls.append(1), orig(self))[1])
    torch._dynamo.utils.counters.clear()
    optim = {"type": "Adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "gradient_max_norm": 0.0}
    runtime.parity_train_step(tr.model, tr.loss, {"input": inp, "label": label, "optim": optim}, lr)
    assert calls == [1] and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # step + Adam
    gf = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    eg = rel(gf, torch.cat([g.reshape(-1) for g in gu]))
    df = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, p0)])
    eu = rel(df, du)
    print(f"gate hook (compiled step): gradient rel {eg:.2e}, update rel {eu:.2e}")
    assert eg <= RTOL and eu <= RTOL


# ------------------------------------------------------------- 5. Inductor (slow)
@pytest.mark.slow  # Inductor's CPU (C++) compile of the whole step: minutes on 2 cores
def test_compiled_step_parity_inductor(data, tmp_path, knobs):
    import shutil

    from dpfast import fused as fused_engine

    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for Inductor's CPU backend")
    knobs.delenv("DPH_COMPILE_BACKEND")
    knobs.setenv("DPH_GEOM", "compact")
    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)
    eng = fused_engine.FusedEngine(tr)
    t0 = time.time()
    _compiled_step_matches(eng, ref, lr, "inductor fcc-tos-false/compact", RTOL)
    print(f"Inductor CPU: compiled step + compiled Adam, first step (compile) {time.time() - t0:.0f} s")
