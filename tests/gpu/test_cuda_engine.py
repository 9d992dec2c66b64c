"""What the GPU checks check, as tests: the fast engine on CUDA against upstream on CUDA.

`make test-gpu` (or `pytest -m gpu tests/gpu`) on the GPU machine; on a machine without CUDA
every test here skips, and `make test` does not collect this folder's marker anyway. The CPU
suite proves the maths in float64 on CPU; these prove the same on the card the benchmarks run
on, where other kernels (cuBLAS, Inductor's Triton code, atomics in index_add) do the work:
- fused's eager and compiled one-step training parity vs upstream's Trainer step (float64, 1e-10),
- the cell-list neighbour search equals the dense one bit for bit on CUDA,
- the flat Adam update, eager and compiled, equals torch.optim.Adam on CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _upstream_fixtures import (  # noqa: F401 (data is a fixture)
    WATER,
    assert_engine_step_matches,
    build_trainer,
    case_config,
    data,
    rel,
    upstream_reference_step,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RTOL = 1e-10  # float64 parity class


def _cuda_trainer(case, data, tmp_path):
    tr = build_trainer(case_config(case, data), tmp_path)
    dev = next(tr.wrapper.parameters()).device
    assert dev.type == "cuda", f"upstream built its model on {dev}, not on the GPU"
    return tr


@pytest.mark.parametrize("case", ["water-tos-false", "fcc-tos-true"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fused_step_matches_upstream_on_cuda(case, compiled, data, tmp_path):
    from dpfast import fused as fused_engine
    from dpfast.options import EngineOptions

    if case.startswith("water") and "water_train" not in data:
        pytest.skip("water data not present")
    tr = _cuda_trainer(case, data, tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)
    # eager: the analytic step as written; compiled: its energy/force function through Inductor
    eng = fused_engine.FusedEngine(tr, opts=EngineOptions(compile_step=False, flat_adam_compile=False))
    assert eng.device.type == "cuda"
    if compiled:
        eng.enable_compile()
    assert_engine_step_matches(eng, ref, lr, f"{case}/cuda/{'compiled' if compiled else 'eager'}", RTOL)


def test_graph_step_with_cell_lists_matches_upstream_on_cuda(data, tmp_path, monkeypatch):
    from dpfast import geometry as geo, graph as graph_engine

    if "water_train" not in data:
        pytest.skip("water data not present")
    monkeypatch.setattr(geo, "DENSE_MAX_PAIRS", 0)  # every frame through the cell lists
    tr = _cuda_trainer("water-tos-false", data, tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)
    assert_engine_step_matches(graph_engine.GraphEngine(tr), ref, lr, "water/cells/cuda", RTOL)


@pytest.mark.parametrize("reps", [(1, 1, 1), (2, 2, 1)])
def test_cell_search_equals_dense_bitwise_on_cuda(reps, monkeypatch):
    from dpfast import geometry as geo
    from harness.prepare import workload

    c = np.load(WATER / "data_0" / "set.000" / "coord.npy")[:2]
    b = np.load(WATER / "data_0" / "set.000" / "box.npy")[:2]
    t = np.loadtxt(WATER / "data_0" / "type.raw", dtype=int)
    big, bigbox = workload.replicate_frames(c, b, reps)
    n = reps[0] * reps[1] * reps[2]
    coord = torch.tensor(big, device="cuda")
    atype = torch.tensor(np.tile(t, n), device="cuda")
    box = torch.tensor(bigbox, device="cuda")
    out = {}
    for mode, limit in (("dense", 10**15), ("cells", 0)):
        monkeypatch.setattr(geo, "DENSE_MAX_PAIRS", limit)
        out[mode] = geo.batch_neighbors(coord, atype, box, 6.0, [46, 92], images=True)
    a, bb = out["dense"], out["cells"]
    assert a[0].device.type == "cuda" and int(a[2].sum()) > 0
    for x, y, name in ((a[0], bb[0], "jloc"), (a[1], bb[1], "diff"), (a[2], bb[2], "mask"),
                       (a[3]["pidx"], bb[3]["pidx"], "pidx")):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flat_adam_equals_torch_on_cuda(compiled):
    from dpfast import flat_optim

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double().cuda()

    ref, mine = model(), model()
    topt = torch.optim.Adam(ref.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    flat = flat_optim.FlatParams(mine.parameters())
    fopt = flat_optim.FlatAdam(flat, decoupled=False, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                               compile=compiled)
    assert (fopt.compiled is not None) == compiled
    x = torch.randn(16, 5, dtype=torch.float64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for step in range(5):
        lr_s = 1e-2 * 0.7**step
        for g in topt.param_groups:
            g["lr"] = lr_s
        fopt.param_groups[0]["lr"] = lr_s
        topt.zero_grad(set_to_none=True)
        ((ref(x) ** 2).sum() * (1 + 0.1 * step)).backward()
        topt.step()
        flat.grads_from_loss((mine(x) ** 2).sum() * (1 + 0.1 * step))
        fopt.step()
        for p, q in zip(mine.parameters(), ref.parameters()):
            assert rel(p, q) <= 1e-12


def _net_gemm_case(seed: int):
    """A net layer's float32 GEMM on the card (value and tangent rows x weights), its cotangent, and
    float64's product and gradients of the same numbers."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(2, 20000, 50, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(50, 100, device="cuda", generator=g) / 7).requires_grad_()
    gy = torch.randn(2, 20000, 100, device="cuda", generator=g)
    a64, w64 = a.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = torch.matmul(a64, w64)
    exact.backward(gy.double())
    return a, w, gy, exact.detach(), a64.grad, w64.grad


def _err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def test_three_tf32_products_keep_float32s_accuracy_on_the_tensor_cores(monkeypatch):
    """fused-3xtf32 on the card (issue 40): with TF32 on, one float32 GEMM of a net's shape loses
    ~1e-3 relative, its three-product form (analytic_nets.gemm, forward and backward) stays at
    float32's ~1e-6 -- the CPU tests prove it on emulated TF32, this on the real tensor cores."""
    from dpfast import analytic_nets as an

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    a, w, gy, exact, ga, gw = _net_gemm_case(5)
    monkeypatch.setattr(an, "SPLIT_TF32", False)
    one = _err(an.gemm(a.detach(), w.detach()), exact)
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    y = an.gemm(a, w)
    y.backward(gy)
    three = _err(y.detach(), exact)
    assert one > 1e-4 and three < 5e-6, (one, three)
    assert _err(a.grad, ga) < 5e-6 and _err(w.grad, gw) < 5e-6


def test_the_triton_3xtf32_kernel_keeps_float32s_accuracy_on_the_tensor_cores():
    """fused-3xtf32-kernel's GEMM (dpfast::tf32x3_mm, tl.dot tf32x3) on the card: a net's shape and a
    weight gradient's (long inner dimension, split), forward and backward, at float32's accuracy
    where one TF32 product loses ~1e-3 -- the CPU interpreter checks only its indexing."""
    import importlib

    importlib.import_module("dpfast.tf32x3_gemm")  # registers dpfast::tf32x3_mm

    a, w, gy, exact, ga, gw = _net_gemm_case(7)
    y = torch.ops.dpfast.tf32x3_mm(a, w)
    y.backward(gy)
    assert _err(y.detach(), exact) < 5e-6
    assert _err(a.grad, ga) < 5e-6 and _err(w.grad, gw) < 5e-6
