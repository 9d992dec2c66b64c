"""Tests of the ``fused`` variant (patches/fused): analytic forces and one-backward training.

1. analytic dE/dR~ forces (hand-written fitting / descriptor / embedding derivatives) vs
   graph's autograd forces and upstream's model, float64, relative <= 1e-12 (water-like and
   a small triclinic 3-type fcc box; type_one_side true and false);
2. one training step (one ordinary backward through the analytic forces): loss, every
   parameter gradient and the Adam update vs upstream's Trainer step, relative <= 1e-10;
3. the accuracy-gate hooks (parity_forward / parity_train_step) registered by the patch module;
4. torch.compile (Inductor, CPU C++ backend) of the analytic energy+force function: same
   forces and gradients (skipped only if Inductor cannot compile here);
5. the precision-flavour manifests resolve (fused-fp32, fused-mixed) and float32 forces;
6. on-the-fly geometry (fused's default): R~ and its closed-form Jacobian from the stored
   displacements vs the precomputed (autograd) ones, incl. padding, pairs at rcut_smth and
   rcut, a small periodic cell whose images matter, protection > 0, float32; and the engine's
   predictions in both modes;
7. compact geometry (bitwise the on-the-fly displacements; one dynamo graph, grouped or not);
8. grouped nets (DPH_FUSED_GROUPED, the default): chunk_plan; all blocks' embedding nets in one
   batched GEMM per layer and all types' fitting nets likewise, and all blocks' contractions
   (R~^T G, G gxyz^T, R~ gxyz) in one bmm each over sub-atoms, vs the per-block loop
   (energies, forces, virials, parameter gradients <= 1e-12; padding exercised); GEMM counts of
   the traced forward and backward graphs.

Upstream tree: env var DPH_UPSTREAM_TREE, else the harness's own cached baseline build.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WATER = REPO / "systems" / "water" / "data"


from _upstream_fixtures import (  # noqa: E402,F401  (data is a fixture)
    fcc_config, build_trainer, rel, data, frames_of, _upstream_batch, upstream_reference_step, assert_engine_step_matches, torch,
    upstream_adam_step, load_fused_patches, case_config, upstream_forward, engine_and_upstream, assert_float32_parity,
)


RTOL = 1e-10
FTOL = 1e-12


# ----------------------------------------------------------------------------- data
def _geometry(eng, coord, atype, box):
    """Precomputed geometry (rt, jac, jidx, diff) whatever the engine's mode."""
    nf, nloc = coord.shape[0], coord.reshape(coord.shape[0], -1, 3).shape[1]
    at = atype.reshape(nf, -1)[0]
    tcount = [int((at == t).sum()) for t in range(eng.ntypes)]
    geom = eng.frames_geometry(coord, at, box, env=True)
    jidx = geom["jidx"].long() + (torch.arange(nf) * nloc)[:, None, None]
    return geom, jidx, tcount





def _GRAPH_PREDICT(eng, *args, **kwargs):
    """graph's autograd prediction, the reference of the analytic path: FusedEngine's base class's
    predict (FusedEngine overrides it with the analytic path)."""
    from dpfast import fused as fused_engine

    return fused_engine.FusedEngine.__bases__[0].predict(eng, *args, **kwargs)


# ------------------------------------------------------- 1. analytic vs autograd forces
@pytest.mark.parametrize("case", ["fcc-tos-false", "fcc-tos-true", "water-tos-false", "water-tos-true"])
def test_analytic_forces_match_autograd(case, data, tmp_path, monkeypatch):
    from dpfast import fused as fused_engine

    monkeypatch.setenv("DPH_GEOM", "onthefly")
    tr = build_trainer(case_config(case, data), tmp_path)
    eng = fused_engine.FusedEngine(tr)
    _, coord, atype, box = frames_of(tr)
    geom, jidx, tcount = _geometry(eng, coord, atype, box)
    bias = eng.out_bias_per_type()
    fused = eng._predict_core(geom["rt"], geom["jac"], jidx, geom["diff"], tcount, bias)
    auto = _GRAPH_PREDICT(eng, geom["rt"], geom["jac"], jidx, geom["diff"], tcount, bias, create_graph=False)
    # the fused path must not touch autograd w.r.t. R~ (no grad graph on the geometry)
    assert not geom["rt"].requires_grad
    assert not eng.batched  # default: per-block embedding nets (measured faster on H200)
    eng.batched = True  # opt-in: all embedding/fitting nets in one padded stacked-weight GEMM per layer
    batched = eng._predict_core(geom["rt"], geom["jac"], jidx, geom["diff"], tcount, bias)
    eng.batched = False
    for k in ("energy", "force", "virial"):
        e = rel(batched[k], fused[k])
        assert e <= FTOL, f"{case}: {k} batched vs per-block relative error {e:.3e}"
    for k in ("energy", "force", "virial"):
        e = rel(fused[k], auto[k])
        assert e <= FTOL, f"{case}: {k} analytic vs autograd relative error {e:.3e}"
    # on-the-fly geometry: R~ and its Jacobian formed from diff in the core
    assert eng.geom_mode == "onthefly"
    otf = eng._predict_core(None, None, jidx, geom["diff"], tcount, bias)
    for k in ("energy", "force", "virial"):
        e = rel(otf[k], fused[k])
        assert e <= FTOL, f"{case}: {k} on-the-fly vs precomputed geometry relative error {e:.3e}"
    ref = upstream_forward(tr, coord, atype, box)
    out = eng.predict_frames(coord, atype, box)
    for k in ("energy", "force", "virial"):
        e = rel(out[k], ref[k])
        assert e <= RTOL, f"{case}: {k} vs upstream relative error {e:.3e}"


# DPH_FUSED_GROUPED modes as engine attributes (grouped, grouped_fit, grouped_contract)
MODES = {"1": (True, True, True), "nets": (True, True, False), "emb": (True, False, False), "0": (False, False, False)}


def set_mode(eng, mode: str) -> None:
    eng.grouped, eng.grouped_fit, eng.grouped_contract = MODES[mode]


def drop_tangent(monkeypatch, analytic_nets) -> None:
    """Break the analytic derivative: dG/ds := 0 in the per-block embedding, the grouped one and
    the packed one (grouped nets + contractions, the default)."""
    orig = analytic_nets.embed_with_tangent
    orig_g = analytic_nets.embed_grouped_with_tangent
    orig_p = analytic_nets.embed_packed_with_tangent

    def no_tangent_packed(x, nets):
        G, dG = orig_p(x, nets)
        return G, 0.0 * dG

    monkeypatch.setattr(analytic_nets, "embed_packed_with_tangent", no_tangent_packed)

    def no_tangent(s, layers):
        G, dG = orig(s, layers)
        return G, 0.0 * dG

    def no_tangent_grouped(cols, layer_lists):
        return [(G, 0.0 * dG) for G, dG in orig_g(cols, layer_lists)]

    monkeypatch.setattr(analytic_nets, "embed_with_tangent", no_tangent)
    monkeypatch.setattr(analytic_nets, "embed_grouped_with_tangent", no_tangent_grouped)


@pytest.mark.parametrize("mode", ["1", "nets", "0"])
def test_analytic_forces_detect_a_wrong_derivative(mode, data, tmp_path, monkeypatch):
    """The parity check can fail: drop the dG/ds term and the forces must disagree (default
    grouped nets + contractions, grouped nets only, per-block)."""
    from dpfast import analytic_nets, fused as fused_engine

    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    eng = fused_engine.FusedEngine(tr)
    assert (eng.grouped, eng.grouped_fit, eng.grouped_contract) == MODES["1"]  # the default
    _, coord, atype, box = frames_of(tr)
    geom, jidx, tcount = _geometry(eng, coord, atype, box)
    bias = eng.out_bias_per_type()
    drop_tangent(monkeypatch, analytic_nets)
    eng.batched = False
    set_mode(eng, mode)
    fused = eng._predict_core(geom["rt"], geom["jac"], jidx, geom["diff"], tcount, bias)
    auto = _GRAPH_PREDICT(eng, geom["rt"], geom["jac"], jidx, geom["diff"], tcount, bias, create_graph=False)
    assert rel(fused["force"], auto["force"]) > 1e-3


# ------------------------------------------------------------- 2. one training step
def _step_parity(case, data, tmp_path, compiled=False, batched=False, grouped=True):
    from dpfast import fused as fused_engine

    tr = build_trainer(case_config(case, data), tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)  # upstream Adam step; weights restored after it
    eng = fused_engine.FusedEngine(tr)
    assert eng.grouped  # DPH_FUSED_GROUPED's default
    eng.batched = batched
    eng.grouped = grouped
    if compiled:
        eng.enable_compile()
    assert_engine_step_matches(eng, ref, lr, case, RTOL)


@pytest.mark.parametrize("case", ["fcc-tos-false", "fcc-tos-true", "water-tos-false", "fcc-tos-false-batched",
                                  "fcc-tos-true-batched", "fcc-tos-false-blocks"])
def test_one_step_parity(case, data, tmp_path):
    """Grouped nets (the default), the padded batched path, and the per-block loop ("blocks",
    DPH_FUSED_GROUPED=0, variant fused-blocks) vs upstream's Trainer step."""
    _step_parity(case, data, tmp_path, batched=case.endswith("batched"), grouped=not case.endswith("blocks"))


# ------------------------------------------------------------ 3. accuracy-gate hooks
def test_gate_hooks(data, tmp_path, monkeypatch):
    from harness.child import runtime

    load_fused_patches(monkeypatch)
    from dpfast import gate

    assert runtime.parity_forward is gate.fused_parity_forward
    assert runtime.parity_train_step is gate.fused_parity_train_step
    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    _, coord, atype, box = frames_of(tr)
    nf = coord.shape[0]
    # shuffled atom order: the hook sorts and un-sorts
    perm = torch.randperm(coord.shape[1], generator=torch.Generator().manual_seed(0))
    c, t = coord.reshape(nf, -1, 3)[:, perm], atype[:, perm]
    ref = tr.model(coord.reshape(nf, -1), atype, box=box.reshape(nf, 9))
    with torch.no_grad():
        out = runtime.parity_forward(tr.model, coord.reshape(nf, -1, 3), atype, box.reshape(nf, 9))
        outp = runtime.parity_forward(tr.model, c, t, box.reshape(nf, 9))
    for k in ("energy", "force", "virial"):
        assert rel(out[k], ref[k]) <= RTOL, k
    # shuffled atom order: the hook sorts and un-sorts (sel truncation makes upstream's
    # own answer order-dependent at the 1e-8 level here, so compare with the hook itself)
    assert rel(outp["force"], out["force"][:, perm]) <= 1e-12
    assert rel(outp["energy"], out["energy"]) <= 1e-12
    # train-step hook vs upstream's wrapper + Adam
    params = list(tr.wrapper.parameters())
    lr = tr.lr_schedule.value(0)
    frame = tr.training_dataloader.dataset.systems[0][0]
    inp, label = _upstream_batch(tr, frame, tr.loss.has_v)
    _, p0, _, gu, upd = upstream_adam_step(tr, inp, label, lr, params)
    gu = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gu)]
    du = torch.cat([u.reshape(-1) for u in upd])
    optim = {"type": "Adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "gradient_max_norm": 0.0}
    runtime.parity_train_step(tr.model, tr.loss, {"input": inp, "label": label, "optim": optim}, lr)
    gf = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])
    assert rel(gf, torch.cat([g.reshape(-1) for g in gu])) <= RTOL
    df = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, p0)])
    assert rel(df, du) <= RTOL


# ------------------------------------------------------------------ 4. torch.compile
@pytest.mark.slow  # Inductor's CPU compile of the whole energy+force graph: ~3 min on 2 cores
@pytest.mark.parametrize("geom", ["onthefly", "compact"])
def test_compiled_step_parity(geom, data, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("DPH_GEOM", geom)

    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for Inductor's CPU backend")
    try:
        _step_parity("fcc-tos-false", data, tmp_path, compiled=True)
    except Exception as e:  # noqa: BLE001
        if "InductorError" in type(e).__name__ or "BackendCompilerFailed" in type(e).__name__:
            pytest.skip(f"Inductor cannot compile here: {str(e)[:200]}")
        raise


# --------------------------------------------------------------- 5. flavours
def test_flavour_manifests():
    from harness.prepare import variants

    names = {v.name: v for v in variants.discover()} if hasattr(variants, "discover") else None
    for flav, acc in (("fused", "float64"), ("fused-fp32", "float32"), ("fused-mixed", "mixed")):
        d = REPO / "patches" / flav
        assert (d / "manifest.yaml").is_file(), flav
        text = (d / "manifest.yaml").read_text()
        assert f"name: {flav}" in text and f"accuracy_class: {acc}" in text
    if names is not None:
        assert names["fused-fp32"].base == "fused"


def test_forces_float32(data, tmp_path):
    from dpfast import fused as fused_engine

    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False, prec="float32")
    tr = build_trainer(cfg, tmp_path)
    out, ref = engine_and_upstream(fused_engine.FusedEngine(tr), tr)
    assert_float32_parity(out, ref)


# ------------------------------------------------------- 6. on-the-fly geometry
def _cell(seed, a=3.61, ncell=2, jitter=0.1):
    """fcc cell (copper-like, 2 types), triclinic, ncell^3 conventional cells."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.tensor([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]], dtype=torch.float64)
    cells = torch.tensor([[i, j, k] for i in range(ncell) for j in range(ncell) for k in range(ncell)], dtype=torch.float64)
    frac = ((cells[:, None] + basis[None]) / ncell).reshape(-1, 3)
    box = torch.tensor([[ncell * a, 0, 0], [0.3, ncell * a, 0], [0.2, -0.25, ncell * a]], dtype=torch.float64)
    nat = frac.shape[0]
    coord = frac @ box + jitter * torch.randn(nat, 3, dtype=torch.float64, generator=g)
    atype = torch.tensor([0] * (nat - nat // 3) + [1] * (nat // 3))
    return coord[None], atype, box.reshape(1, 9)


def _env_cases():
    """(coord, atype, box, rcut, rcut_smth, sel, protection): images beyond the nearest one
    (rcut > cell), padding (sel > neighbours), truncation, and pairs put at rcut_smth / rcut."""
    from dpfast import geometry as geo

    coord, atype, box = _cell(0)
    cases = [(coord, atype, box, 8.0, 2.0, [180, 120], 0.0),  # 5x5x5 images, padding
             (coord, atype, box, 8.0, 2.0, [100, 30], 0.3),  # truncated, protection
             (coord, atype, None, 5.0, 0.5, [20, 12], 0.0)]  # no periodicity
    # rcut_smth / rcut placed 1e-7 around actual pair distances (both sides of each)
    _, diff, mask = geo.batch_neighbors(coord, atype, box, 6.0, [300, 200])
    r = torch.unique(diff.norm(dim=-1)[mask])
    d_s, d_c = float(r[len(r) // 8]), float(r[(7 * len(r)) // 8])
    cases.append((coord, atype, box, d_c + 1e-7, d_s - 1e-7, [300, 200], 0.0))
    cases.append((coord, atype, box, d_c - 1e-7, d_s + 1e-7, [300, 200], 0.0))
    return cases


def test_onthefly_env_matches_precomputed():
    """Closed-form R~ / dR~/dd / g.dR~/dd vs the precomputed (autograd) ones, float64.

    Near rcut the reference autograd derivative of the switch polynomial (expanded form) loses
    relative precision by cancellation (e.g. 2e-11 relative at 1e-3 A below rcut, checked with
    mpmath) while the closed form uses -30 u^2 (u-1)^2; so entries are compared on the scale of
    the whole tensor (max abs error / max abs value) as well as in norm, both <= 1e-14."""
    from dpfast import geometry as geo

    g = torch.Generator().manual_seed(1)
    near = {"smth": 0, "rcut": 0, "pad": 0}
    for coord, atype, box, rcut, rs, sel, prot in _env_cases():
        jloc, diff, mask = geo.batch_neighbors(coord, atype, box, rcut, sel)
        nnei = sum(sel)
        davg = 0.1 * torch.randn(2, nnei, 4, dtype=torch.float64, generator=g)
        dstd = 0.5 + torch.rand(2, nnei, 4, dtype=torch.float64, generator=g)
        ct = atype[None]
        rt0, jac0 = geo.env_and_jacobian(diff, mask, ct, davg, dstd, rcut, rs, prot)
        rt1, fac = geo.env_closed_form(diff, davg[ct], dstd[ct], rcut, rs, prot)
        jac1 = geo.jacobian_dense(diff, fac)
        gr = torch.randn(rt0.shape, dtype=torch.float64, generator=g)
        v0 = torch.matmul(gr.unsqueeze(-2), jac0).squeeze(-2)
        v1 = geo.jacobian_vjp(gr, diff, fac)
        for name, x, y in (("rt", rt1, rt0), ("jac", jac1, jac0), ("vjp", v1, v0)):
            assert rel(x, y) <= 1e-14, f"{name} rcut={rcut} rs={rs}: norm relative {rel(x, y):.2e}"
            e = float((x - y).abs().max() / y.abs().max())
            assert e <= 1e-14, f"{name} rcut={rcut} rs={rs}: max abs error / max {e:.2e}"
        # padding entries: exactly -davg/dstd and a zero Jacobian
        pad = ~mask
        near["pad"] += int(pad.sum())
        assert torch.equal(rt1[pad], (-davg[ct] / dstd[ct])[pad])
        assert torch.equal(jac1[pad], torch.zeros_like(jac1[pad]))
        rr = diff.norm(dim=-1)[mask]
        near["smth"] += int(((rr - rs).abs() < 1e-6).sum())
        near["rcut"] += int(((rr - rcut).abs() < 1e-6).sum())
    assert near["smth"] >= 2 and near["rcut"] >= 1 and near["pad"] > 0, near  # edge cases exercised


def test_onthefly_env_float32():
    from dpfast import geometry as geo

    coord, atype, box, rcut, rs, sel, prot = _env_cases()[0]
    jloc, diff, mask = geo.batch_neighbors(coord, atype, box, rcut, sel)
    nnei = sum(sel)
    davg = torch.zeros(2, nnei, 4, dtype=torch.float64)
    dstd = torch.ones(2, nnei, 4, dtype=torch.float64)
    ct = atype[None]
    rt0, jac0 = geo.env_and_jacobian(diff, mask, ct, davg, dstd, rcut, rs, prot)
    d32 = diff.to(torch.float32)
    rt1, fac = geo.env_closed_form(d32, davg[ct].float(), dstd[ct].float(), rcut, rs, prot)
    jac1 = geo.jacobian_dense(d32, fac)
    assert rt1.dtype == torch.float32 and jac1.dtype == torch.float32
    assert rel(rt1, rt0) < 1e-6 and rel(jac1, jac0) < 1e-6


def test_onthefly_engine_storage(data, tmp_path):
    """fused defaults to compact storage; with DPH_GEOM=onthefly it keeps only jidx + diff per
    frame (no R~ / Jacobian) and its step gathers no rt/jac; graph stays precomputed; DPH_GEOM
    switches either engine."""
    from dpfast import fused as fused_engine

    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    old = os.environ.pop("DPH_GEOM", None)
    try:
        assert fused_engine.FusedEngine(tr).geom_mode == "compact"
        os.environ["DPH_GEOM"] = "onthefly"
        eng = fused_engine.FusedEngine(tr)
    finally:
        if old is None:
            os.environ.pop("DPH_GEOM", None)
        else:
            os.environ["DPH_GEOM"] = old
    eng.build_data()
    G = eng.groups[0]
    assert G.geom["rt"] is None and G.geom["jac"] is None and G.geom["diff"] is not None
    nloc, nnei = G.nloc, eng.nnei
    nfr = G.geom["jidx"].shape[0]
    per_pair = 4 + 8 * 3  # int32 index + float64 displacement
    labels = sum(v.numel() * v.element_size() for v in G.labels.values())
    assert G.nbytes == nfr * nloc * nnei * per_pair + labels
    rt, jac, jidx, diff, _ = eng.gather(G.geom, G.labels, torch.tensor([0]))
    assert rt is None and jac is None and diff.shape == (1, nloc, nnei, 3)
    GraphEngine = fused_engine.FusedEngine.__bases__[0]  # graph_engine.GraphEngine may be patched (gate hooks)
    geng = GraphEngine(tr)
    assert geng.geom_mode == "precomputed"
    old = os.environ.get("DPH_GEOM")
    try:
        os.environ["DPH_GEOM"] = "precomputed"
        assert fused_engine.FusedEngine(tr).geom_mode == "precomputed"
        os.environ["DPH_GEOM"] = "onthefly"
        geng2 = GraphEngine(tr)
        assert geng2.geom_mode == "onthefly"
        # graph's autograd path in on-the-fly mode agrees with its precomputed path
        _, coord, atype, box = frames_of(tr)
        a = geng.predict_frames(coord, atype, box)
        b = geng2.predict_frames(coord, atype, box)
        for k in ("energy", "force", "virial"):
            assert rel(b[k], a[k]) <= FTOL, k
    finally:
        if old is None:
            os.environ.pop("DPH_GEOM", None)
        else:
            os.environ["DPH_GEOM"] = old


# ------------------------------------------------------- 7. compact geometry (DPH_GEOM=compact)
def test_compact_diff_bitwise():
    """diff re-formed from wrapped coordinates + per-frame shift vectors + one int32 s*nloc + j
    equals batch_neighbors' diff bit for bit (5x5x5 images of a ~7.2 A triclinic cell at rcut 8,
    truncation, padding, no periodicity, rcut/rcut_smth edges), so R~ does too; and several
    frames with different cells (each frame its own shift table)."""
    from dpfast import geometry as geo

    for coord, atype, box, rcut, rs, sel, prot in _env_cases():
        jloc, diff, mask, im = geo.batch_neighbors(coord, atype, box, rcut, sel, images=True)
        nloc = coord.shape[1]
        self_idx = torch.arange(nloc)[None, :, None].expand_as(jloc)
        pidx = torch.where(mask, im["pidx"], self_idx).to(torch.int32)
        if box is not None and rcut >= 8.0:
            assert im["shifts"].shape[1] == 125  # 5x5x5 images
            used = im["shifts"][0][pidx.long() // nloc].norm(dim=-1)
            assert float(used.max()) > 1.5 * 7.2  # second-nearest images (|n_k| = 2) really used
        jf, d = geo.compact_diff(pidx, im["coord"], im["shifts"])
        assert d.dtype == torch.float64
        assert torch.equal(d, diff), f"rcut={rcut}: max |diff| error {float((d - diff).abs().max()):.3e}"
        assert torch.equal(jf, torch.where(mask, jloc, self_idx))
        assert torch.equal(d.float(), diff.float())  # float32 models round the same float64 value
        nnei = sum(sel)
        avg = torch.zeros(1, nloc, nnei, 4, dtype=torch.float64)
        std = torch.ones(1, nloc, nnei, 4, dtype=torch.float64)
        assert torch.equal(geo.env_closed_form(d, avg, std, rcut, rs, prot)[0],
                           geo.env_closed_form(diff, avg, std, rcut, rs, prot)[0])
    # three frames, different cell sizes (one call: one integer image set, per-frame vectors)
    c0, atype, b0 = _cell(3)
    scale = torch.tensor([1.0, 1.3, 0.9], dtype=torch.float64)
    coord = c0 * scale[:, None, None]
    box = b0 * scale[:, None]
    jloc, diff, mask, im = geo.batch_neighbors(coord, atype, box, 8.0, [180, 120], images=True)
    self_idx = torch.arange(coord.shape[1])[None, :, None].expand_as(jloc)
    jf, d = geo.compact_diff(torch.where(mask, im["pidx"], self_idx), im["coord"], im["shifts"])
    assert torch.equal(d, diff)


def _with_geom(monkeypatch, mode):
    monkeypatch.setenv("DPH_GEOM", mode)


@pytest.mark.parametrize("case", ["fcc-tos-false", "water-tos-false"])
def test_compact_engine_matches_onthefly(case, data, tmp_path, monkeypatch):
    """Compact storage (int32 s*nloc + j per pair; float64 coordinates and image shift vectors per
    frame): stored bytes as logged, the step's diff bitwise equal to the on-the-fly one, and
    energy/force/virial bitwise equal (fused analytic and graph's autograd path); vs upstream
    <= 1e-10. fcc: 3 types, ~6.4 A triclinic cell at rcut 7 (5x5x5 images); water: 2 types."""
    from dpfast import fused as fused_engine

    tr = build_trainer(case_config(case, data), tmp_path)
    _with_geom(monkeypatch, "onthefly")
    otf = fused_engine.FusedEngine(tr)
    otf.build_data()
    _with_geom(monkeypatch, "compact")
    eng = fused_engine.FusedEngine(tr)
    assert eng.geom_mode == "compact"
    eng.build_data()
    for G0, G in zip(otf.groups, eng.groups):
        assert G.geom["rt"] is None and G.geom["jac"] is None and G.geom["diff"] is None and G.geom["jidx"] is None
        assert G.geom["pidx"].dtype == torch.int32 and G.geom["coord"].dtype == torch.float64
        nfr, nloc, nnei = G.geom["pidx"].shape
        nsh = G.geom["shifts"].shape[1]
        if case.startswith("fcc"):
            assert nsh == 125
        labels = sum(v.numel() * v.element_size() for v in G.labels.values())
        assert G.nbytes == nfr * (nloc * nnei * 4 + nloc * 3 * 8 + nsh * 3 * 8) + labels
        assert G.nbytes < G0.nbytes / 4
        idx = torch.arange(nfr)
        rt, jac, pidx, geom = eng.gather(G.geom, G.labels, idx)[:4]
        assert rt is None and jac is None and isinstance(geom, tuple)
        jf, d = eng.expand_geom(pidx, geom)
        _, _, jidx0, diff0, _ = otf.gather(G0.geom, G0.labels, idx)
        assert torch.equal(d, diff0) and torch.equal(jf, jidx0)
        bias = eng.out_bias_per_type()
        a = otf._predict_core(None, None, jidx0, diff0, G0.tcount, bias)
        b = eng._predict_core(None, None, pidx, geom, G.tcount, bias)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{case}: {k} compact vs on-the-fly {rel(b[k], a[k]):.3e}"
        ga = _GRAPH_PREDICT(otf, None, None, jidx0, diff0, G0.tcount, bias, create_graph=False)
        gb = _GRAPH_PREDICT(eng, None, None, pidx, geom, G.tcount, bias, create_graph=False)
        for k in ga:
            assert torch.equal(ga[k], gb[k]), f"{case}: graph autograd {k} compact vs on-the-fly"
    out, ref = engine_and_upstream(eng, tr)
    for k in ("energy", "force", "virial"):
        assert rel(out[k], ref[k]) <= RTOL, k


@pytest.mark.parametrize("case", ["fcc-tos-false", "water-tos-false"])
def test_compact_one_step_parity(case, data, tmp_path, monkeypatch):
    _with_geom(monkeypatch, "compact")
    _step_parity(case, data, tmp_path)


@pytest.mark.parametrize("grouped", ["1", "nets", "emb", "0"])
def test_compact_traces_without_graph_break(grouped, data, tmp_path, monkeypatch):
    """The compact gather + diff is traced into the one graph Inductor compiles with the env
    math and the force scatter (dynamo explain on CPU: one graph, no break), with the grouped
    nets (the default: chunk plan, packing and stacked weights are static Python) and without."""
    import torch._dynamo
    from dpfast import fused as fused_engine

    _with_geom(monkeypatch, "compact")
    monkeypatch.setenv("DPH_FUSED_GROUPED", grouped)
    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    eng = fused_engine.FusedEngine(tr)
    eng.build_data()
    G = eng.groups[0]
    rt, jac, pidx, geom, _ = eng.gather(G.geom, G.labels, torch.tensor([0]))
    torch._dynamo.reset()
    assert (eng.grouped, eng.grouped_fit, eng.grouped_contract) == MODES[grouped]
    ex = torch._dynamo.explain(eng._predict_core)(rt, jac, pidx, geom, tuple(G.tcount), G.bias, True)
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
    # 3 types present (9 descriptor blocks, 3 fitting types): grouped nets take one GEMM per
    # layer for all blocks (types) instead of one per block (type); grouped contractions one
    # bmm each for R~^T G, G gxyz^T and R~ gxyz instead of one per block
    nmat = sum(1 for gm in ex.graphs for n in gm.graph.nodes
               if n.op == "call_function" and ("matmul" in str(n.target) or "bmm" in str(n.target)))
    emb = 1 if grouped != "0" else 9  # neuron [8, 16]: one GEMM layer (8 -> 16)
    fit = 2 * 3 * (1 if grouped in ("1", "nets") else 3)  # 3 layers each of forward and VJP
    con = 3 if grouped == "1" else 9 * 3  # contractions
    assert nmat == emb + fit + con + 3, nmat  # + descriptor (3)
    ops = {str(n.target) for gm in ex.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("floordiv" in o or "div" in o for o in ops)


# ------------------------------------------------ 8. grouped nets (DPH_FUSED_GROUPED, default on)
def test_chunk_plan():
    """R = gcd of the blocks' rows when >= 256 (no padding); else the largest chunk size whose
    padding adds <= 12.5 % rows; else 256. The fitting's sizes go down to 8 rows."""
    import itertools
    import random

    from dpfast import analytic_nets as fe

    # water, tos false, one frame: O-O 64x46, O-H 64x92, H-O 128x46, H-H 128x92 rows
    assert fe.chunk_plan([2944, 5888, 5888, 11776]) == (2944, [2944, 5888, 5888, 11776])
    assert fe.chunk_plan([3 * 8832, 3 * 17664]) == (3 * 8832, [3 * 8832, 3 * 17664])  # tos true, 3 frames
    assert fe.chunk_plan([256, 512]) == (256, [256, 512])
    assert fe.chunk_plan([4000, 8100]) == (4096, [4096, 8192])  # gcd 100; 1.6 % padding
    assert fe.chunk_plan([1000, 3000, 600]) == (1024, [1024, 3072, 1024])  # 2048: 78 %, 1024: 11.3 %
    # 3-type fcc, one frame (16/10/6 atoms, sel 60/40/30): gcd 60; 256 pads 23 % -> fallback 256
    rows = [na * s for na in (16, 10, 6) for s in (60, 40, 30)]
    assert fe.chunk_plan(rows) == (256, [-(-n // 256) * 256 for n in rows])
    assert fe.chunk_plan([100]) == (256, [256])
    # without weight costs: water's 64 O / 128 H atoms -> chunks of 64 rows; fcc's 16/10/6 -> 8
    assert fe.chunk_plan([64, 128], fe.FIT_CHUNKS) == (64, [64, 128])
    assert fe.chunk_plan([16, 10, 6], fe.FIT_CHUNKS) == (8, [16, 16, 8])
    # fitting with its weights' cost (1600 -> 240 -> 240 -> 240 -> 1: ~209 rows per stacked copy):
    # one chunk per type, padded to the most numerous type, unless the gcd is as good
    wr = 1600 * 240 / (1600 + 240)
    assert fe.chunk_plan([64, 128], fe.FIT_CHUNKS, weight_rows=wr) == (128, [128, 128])
    assert fe.chunk_plan([16, 10, 6], fe.FIT_CHUNKS, weight_rows=wr) == (16, [16, 16, 16])
    assert fe.chunk_plan([64, 22, 22], fe.FIT_CHUNKS, weight_rows=wr) == (64, [64, 64, 64])  # Al-Cu-Mg
    assert fe.chunk_plan([64, 64], fe.FIT_CHUNKS, weight_rows=wr) == (64, [64, 64])
    assert fe.chunk_plan([300, 20], fe.FIT_CHUNKS, weight_rows=1.0) == (20, [300, 20])  # cheap weights: gcd
    # align (grouped contractions: sub-atoms of K = gcd(sel) neighbours): sizes rounded up to a
    # multiple of align; the gcd (water: 2944 = 64 x 46) already is one
    assert fe.chunk_plan([2944, 5888, 5888, 11776], align=46) == (2944, [2944, 5888, 5888, 11776])
    assert fe.chunk_plan(rows, align=10) == (260, [-(-n // 260) * 260 for n in rows])  # 3-type fcc
    assert fe.chunk_plan([4000, 8100], align=50) == (4100, [4100, 8200])
    assert fe.chunk_plan([4000, 8100], align=1) == fe.chunk_plan([4000, 8100])
    assert fe.chunk_plan([64, 22, 22], fe.FIT_CHUNKS, weight_rows=wr, align=1) == (64, [64, 64, 64])
    assert fe.chunk_plan([60, 20, 20], fe.FIT_CHUNKS, weight_rows=wr, align=20) == (60, [60, 60, 60])
    rng = random.Random(0)
    for n in range(300):  # rows multiples of align: every chunk a whole number of sub-atoms
        align = rng.randint(2, 150)
        rows = [align * rng.randint(1, 400) for _ in range(rng.randint(1, 9))]
        for sizes in (fe.EMB_CHUNKS, fe.FIT_CHUNKS):
            R, padded = fe.chunk_plan(rows, sizes, align=align)
            assert R % align == 0 and all(p >= r and p - r < R and p % R == 0 for p, r in zip(padded, rows))
            R, padded = fe.chunk_plan(rows, sizes, weight_rows=rng.choice([1.0, 209.0]), align=align)
            assert R % align == 0 and all(p >= r and p - r < R and p % R == 0 for p, r in zip(padded, rows))
    for sizes, n in itertools.product((fe.EMB_CHUNKS, fe.FIT_CHUNKS), range(300)):
        rows = [rng.randint(1, 20000) for _ in range(rng.randint(1, 9))]
        R, padded = fe.chunk_plan(rows, sizes)
        assert all(p >= r and p - r < R and p % R == 0 for p, r in zip(padded, rows))
        g = math.gcd(*rows)
        if g >= sizes[-1]:
            assert (R, padded) == (g, rows)
        else:
            ok = [s for s in sizes if sum(-(-r // s) * s for r in rows) - sum(rows) <= 0.125 * sum(rows)]
            assert R == (ok[0] if ok else sizes[-1])
        # with a weight cost: a valid plan no dearer than any candidate chunk size
        w = rng.choice([1.0, 50.0, 209.0])
        R, padded = fe.chunk_plan(rows, sizes, weight_rows=w)
        assert all(p >= r and p - r < R and p % R == 0 for p, r in zip(padded, rows))
        cost = lambda c: sum(-(-r // c) * c for r in rows) * (1 + w / c)  # noqa: E731
        assert all(cost(R) <= cost(c) + 1e-9 for c in (g, max(rows), *sizes))


def test_grouped_embedding_is_one_bmm_per_layer(data, tmp_path):
    """The grouped embedding of several blocks: per GEMM layer ONE aten.bmm of the stacked value
    and tangent [2*nchunk, R, in] (make_fx trace: no per-block mm), its outputs contiguous row
    ranges of the [nchunk*R, ng] results, and (G, dG/ds) equal to the per-block evaluation."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from dpfast import analytic_nets as fe
    from dpfast.fused import FusedEngine

    cfg = case_config("water-tos-false", data)
    cfg["model"]["descriptor"]["neuron"] = [8, 16, 32]
    tr = build_trainer(cfg, tmp_path)
    eng = FusedEngine(tr)
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 5, 46), (2, 5, 92), (2, 7, 46), (2, 7, 92)]  # gcd 92: R=256 with padding
    cols = [torch.rand(*s, 1, dtype=torch.float64, generator=g) for s in shapes]
    nets = [eng.emb_layers[k] for k in (0, 2, 1, 3)]
    R, padded = fe.chunk_plan([math.prod(s) for s in shapes])
    assert padded != [math.prod(s) for s in shapes]  # padding exercised
    nchunk = sum(padded) // R

    def f(*cs):
        out = fe.embed_grouped_with_tangent(list(cs), nets)
        return [t for pair in out for t in pair]

    gm = make_fx(f)(*cols)
    mms = [n for n in gm.graph.nodes if n.op == "call_function" and "mm" in str(n.target)]
    assert [str(n.target) for n in mms] == ["aten.bmm.default"] * 2, [str(n.target) for n in mms]
    assert [tuple(n.args[0].meta["val"].shape) for n in mms] == [(2 * nchunk, R, 8), (2 * nchunk, R, 16)]
    outs = f(*cols)
    for i, (c, layers) in enumerate(zip(cols, nets)):
        G, dG = outs[2 * i], outs[2 * i + 1]
        G0, dG0 = fe.embed_with_tangent(c, layers)
        assert G.shape == dG.shape == c.shape[:-1] + (32,)
        assert G.is_contiguous() and dG.is_contiguous()
        assert rel(G, G0) <= 1e-14 and rel(dG, dG0) <= 1e-14


def test_grouped_knob(data, tmp_path, monkeypatch):
    """DPH_FUSED_GROUPED: 1 (the engine's default and fused's manifest) both nets and the
    contractions grouped, nets both nets grouped and contractions per block (variant
    fused-nets), emb the embedding only, 0 nothing (variant
    fused-blocks); anything else is refused."""
    from dpfast import fused as fused_engine
    from harness.prepare import variants

    want_env = {"fused": "1", "fused-nets": "nets", "fused-blocks": "0", "fused-onthefly": "1"}
    for name, mode in want_env.items():
        assert variants.chain_env(variants.chain(name))["DPH_FUSED_GROUPED"] == mode, name
    assert variants.load_variant("fused-blocks").base == variants.load_variant("fused-nets").base == "fused"
    tr = build_trainer(case_config("fcc-tos-false", data), tmp_path)
    monkeypatch.delenv("DPH_FUSED_GROUPED", raising=False)
    e = fused_engine.FusedEngine(tr)
    assert (e.grouped, e.grouped_fit, e.grouped_contract) == (True, True, True)
    for v, want in MODES.items():
        monkeypatch.setenv("DPH_FUSED_GROUPED", v)
        e = fused_engine.FusedEngine(tr)
        assert (e.grouped, e.grouped_fit, e.grouped_contract) == want
    monkeypatch.setenv("DPH_FUSED_GROUPED", "yes")
    with pytest.raises(ValueError, match="DPH_FUSED_GROUPED"):
        fused_engine.FusedEngine(tr)


def _spy(monkeypatch, mod, name, log):
    orig = getattr(mod, name)

    def wrapped(*a, **k):
        out = orig(*a, **k)
        log.append((name, out if name == "chunk_plan" else None))
        return out

    monkeypatch.setattr(mod, name, wrapped)


@pytest.mark.parametrize("case", ["water-tos-false", "water-tos-true", "water-sel47", "fcc-tos-false", "fcc-tos-true"])
def test_grouped_matches_per_block(case, data, tmp_path, monkeypatch):
    """Grouped nets + contractions (default "1") vs grouped nets with per-block contractions
    ("nets") vs the per-block loop ("0"), float64, 1 and 3 frames: energy, force, virial and every
    parameter gradient of a loss on them <= 1e-12 relative. Padding rows: fcc tos false (gcd 60 /
    180 < 256: R=256, with sub-atoms of K=10 R=260; fitting: one chunk per type, padded) and water
    with sel 47/93 (K=1; gcd 64 / 192: R=2048 / 4096 with 6.7 / 11.7 % padding); none: water
    (R = gcd, K=46), fcc tos true (gcd 320, K=10)."""
    from dpfast import analytic_nets, fused as fused_engine

    monkeypatch.setenv("DPH_GEOM", "onthefly")
    cfg = case_config(case.replace("sel47", "tos-false"), data)
    if case == "water-sel47":
        cfg["model"]["descriptor"]["sel"] = [47, 93]
    tr = build_trainer(cfg, tmp_path)
    eng = fused_engine.FusedEngine(tr)
    assert (eng.grouped, eng.grouped_fit, eng.grouped_contract) == MODES["1"]
    _, coord, atype, box = frames_of(tr)
    geom, jidx, tcount = _geometry(eng, coord, atype, box)
    bias = eng.out_bias_per_type()
    params = [p for p in tr.wrapper.parameters() if p.requires_grad]
    log = []
    for name in ("chunk_plan", "embed_grouped_with_tangent", "fit_grouped", "embed_contract_grouped", "env_grad_grouped"):
        _spy(monkeypatch, analytic_nets, name, log)
    padded_any = False
    worst = {}
    for nf in (1, 3):
        sl = (geom["rt"][:nf], geom["jac"][:nf], jidx[:nf], geom["diff"][:nf], tcount, bias)
        res = {}
        for mode in ("1", "nets", "0"):
            set_mode(eng, mode)
            log.clear()
            out = eng._predict_core(*sl)
            loss = (out["force"] ** 2).sum() + (out["energy"] ** 2).sum() + (out["virial"] ** 2).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            res[mode] = (out, grads, list(log))
        calls = [n for n, _ in res["1"][2]]
        assert calls.count("embed_contract_grouped") == 1 and calls.count("env_grad_grouped") == 1, calls
        assert calls.count("fit_grouped") == 1 and "embed_grouped_with_tangent" not in calls, calls
        calls = [n for n, _ in res["nets"][2]]
        assert calls.count("embed_grouped_with_tangent") == 1 and calls.count("fit_grouped") == 1, calls
        assert "embed_contract_grouped" not in calls and "env_grad_grouped" not in calls, calls
        assert not any(n != "chunk_plan" for n, _ in res["0"][2])
        blocks = eng._blocks(tcount)
        rows = [nf * (na or sum(tcount)) * eng.sel[tj] for (_, na, _, tj, _) in blocks]
        K = math.gcd(*[eng.sel[tj] for (*_, tj, _) in blocks])
        for mode, align in (("nets", 1), ("1", K)):
            (R, pad), (Rf, padf) = [p for n, p in res[mode][2] if n == "chunk_plan"]  # embedding, fitting
            assert (R, pad) == analytic_nets.chunk_plan(rows, align=align)
            assert R % K == 0 or mode == "nets"
            assert padf == [-(-nf * n // Rf) * Rf for n in tcount if n]
            assert (Rf, padf) == analytic_nets.chunk_plan([nf * n for n in tcount if n], analytic_nets.FIT_CHUNKS,
                                                          weight_rows=analytic_nets.weight_rows_of(eng.fit_layers[0]))
            padded_any |= pad != rows
        for a, b in (("1", "nets"), ("1", "0"), ("nets", "0")):
            for k in ("energy", "force", "virial"):
                e = rel(res[a][0][k], res[b][0][k])
                worst[(a, b, k)] = max(worst.get((a, b, k), 0.0), e)
                assert e <= FTOL, f"{case} nf={nf}: {k} {a} vs {b} {e:.3e}"
            n_checked = 0
            for p, x, y in zip(params, res[a][1], res[b][1]):
                assert (x is None) == (y is None)
                if y is None or float(y.norm()) == 0:
                    continue
                e = rel(x, y)
                worst[(a, b, "grad/param")] = max(worst.get((a, b, "grad/param"), 0.0), e)
                assert e <= FTOL, f"{case} nf={nf}: {a} vs {b} gradient of a {tuple(p.shape)} parameter {e:.3e}"
                n_checked += 1
            assert n_checked > 10
            ga = torch.cat([x.reshape(-1) for x in res[a][1] if x is not None])
            gb = torch.cat([y.reshape(-1) for y in res[b][1] if y is not None])
            e = rel(ga, gb)
            worst[(a, b, "grad/all")] = max(worst.get((a, b, "grad/all"), 0.0), e)
            assert e <= FTOL
    print(f"\n{case} K={K}: " + ", ".join(f"{a} vs {b} {k} {e:.1e}" for (a, b, k), e in worst.items()))
    assert padded_any == case.startswith(("fcc-tos-false", "water-sel47")), case


@pytest.mark.parametrize("case", ["water-tos-false", "fcc-tos-false"])
def test_grouped_contraction_gemm_counts(case, data, tmp_path, monkeypatch):
    """GEMMs (aten mm/bmm) in the AOTAutograd forward / backward graphs of _predict_core (one
    frame, compact geometry, aot_eager-style trace on CPU) for DPH_FUSED_GROUPED 0 / nets / 1:
    grouping the contractions replaces the per-block R~^T G (forward), G gxyz^T and R~ gxyz
    (forward, and their backward GEMMs) by one bmm each over sub-atoms."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from dpfast import fused as fused_engine

    _with_geom(monkeypatch, "compact")  # fused's default geometry
    tr = build_trainer(case_config(case, data), tmp_path)
    eng = fused_engine.FusedEngine(tr)
    eng.build_data()
    G = eng.groups[0]
    rt, jac, pidx, geom, _ = eng.gather(G.geom, G.labels, torch.tensor([0]))
    tcount, bias = G.tcount, G.bias
    params = [p for p in tr.wrapper.parameters() if p.requires_grad]
    mm = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    counts = {}
    for mode in ("0", "nets", "1"):
        set_mode(eng, mode)
        got = {}

        def counter(tag):
            def comp(gm, example_inputs):
                got[tag] = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in mm)
                return gm.forward
            return comp

        torch._dynamo.reset()
        f = torch.compile(eng._predict_core, backend=aot_autograd(fw_compiler=counter("fw"), bw_compiler=counter("bw")),
                          dynamic=False)
        out = f(rt, jac, pidx, geom, tuple(tcount), bias, True)
        loss = (out["force"] ** 2).sum() + (out["energy"] ** 2).sum() + (out["virial"] ** 2).sum()
        torch.autograd.grad(loss, params, allow_unused=True)
        counts[mode] = (got["fw"], got["bw"])
    torch._dynamo.reset()
    print(f"\n{case} GEMMs forward/backward: " + ", ".join(f"{m} {fw}/{bw}" for m, (fw, bw) in counts.items()))
    nblk = len(eng._blocks(tcount))
    # forward: R~^T G, G gxyz^T, R~ gxyz per block -> 3 bmm
    assert counts["nets"][0] - counts["1"][0] == 3 * nblk - 3, counts
    assert counts["1"][1] < counts["nets"][1] and counts["nets"][0] < counts["0"][0], counts
