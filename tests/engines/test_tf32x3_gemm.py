"""The Triton 3xTF32 GEMM (engines/dpfast/tf32x3_gemm.py, fused-3xtf32-kernel, issue 40): on a CPU
it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), whose ``tl.dot`` is a
float32 product -- so these check the kernel's indexing (tiles, edges, strides, batch layouts, the
split inner dimension, the autograd) against float64 at float32's accuracy; the tensor cores'
precision is tests/gpu's. analytic_nets.gemm routes to it only with both options on."""
from __future__ import annotations

import pytest
import torch

from _upstream_fixtures import data  # noqa: F401  (a fixture)
from dpfast import analytic_nets as an
from dpfast import options

k = pytest.importorskip("dpfast.tf32x3_gemm")
if not k.available():
    pytest.skip("Triton is in the dev pins (harness/pins/dev.txt); this venv lacks it", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = 2e-6  # float32 (the interpreter) or 3xTF32 (a card): a few float32 roundings of the largest entry


def _rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("a_shape,b_shape", [
    ((2, 77, 25), (25, 50)),           # value and tangent rows through one layer's weights
    ((2, 3, 70, 50), (3, 50, 100)),    # stacked nets broadcast over value/tangent
    ((60, 1), (1, 25)),                # a width-1 inner dimension (the first layer's VJP)
    ((3, 70, 100), (3, 100, 33)),      # batch of equal dims, odd edges
])
def test_the_product_equals_float64s_at_float32s_accuracy(a_shape, b_shape):
    a, b = _rand(*a_shape, seed=1), _rand(*b_shape, seed=2)
    got = torch.ops.dpfast.tf32x3_mm(a, b)
    assert got.shape == torch.matmul(a, b).shape and got.dtype == torch.float32
    assert _rel(got, torch.matmul(a.double(), b.double())) < BOUND


def test_transposed_views_run_by_their_strides():
    a = _rand(3, 100, 70, seed=3).transpose(-1, -2)  # not contiguous: no copy needed
    b = _rand(100, 33, seed=4).t().contiguous().t()
    assert _rel(torch.ops.dpfast.tf32x3_mm(a, b), torch.matmul(a.double(), b.double())) < BOUND


def test_a_long_inner_dimension_is_split_and_summed_in_a_fixed_order(monkeypatch):
    """A weight gradient's shape (few outputs, ~10^5 rows summed) is cut into chunks summed after:
    the same result as unsplit to float32's accuracy, and bit for bit the same run to run."""
    a, b = _rand(40, 5000, seed=5), _rand(5000, 30, seed=6)
    ref = torch.matmul(a.double(), b.double())
    split = k.mm(a, b)
    assert _rel(split, ref) < BOUND and torch.equal(split, k.mm(a, b))
    monkeypatch.setattr(k, "SPLIT_MIN_INNER", 10 ** 9)  # never split
    assert _rel(k.mm(a, b), ref) < BOUND


def test_gradients_are_the_same_op_and_sum_over_broadcast_batches():
    a = _rand(2, 3, 70, 50, seed=7).requires_grad_()
    b = _rand(3, 50, 100, seed=8).requires_grad_()
    gy = _rand(2, 3, 70, 100, seed=9)
    torch.ops.dpfast.tf32x3_mm(a, b).backward(gy)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.matmul(a64, b64).backward(gy.double())
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert _rel(a.grad, a64.grad) < BOUND and _rel(b.grad, b64.grad) < BOUND


def test_the_op_is_registered_for_torch_compile():
    a, b = _rand(2, 40, 25, seed=10).requires_grad_(), _rand(25, 50, seed=11).requires_grad_()
    torch.library.opcheck(torch.ops.dpfast.tf32x3_mm.default, (a, b),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_layouts_it_does_not_take_stay_with_the_torch_ops(monkeypatch):
    assert k.plan((2, 5, 4), (3, 4, 6)) is None  # b's batch is not a suffix of a's
    assert not k.supports(torch.zeros(5, 4, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64))
    a, b = _rand(2, 77, 25, seed=12), _rand(25, 50, seed=13)
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    monkeypatch.setattr(an, "SPLIT_TF32_KERNEL", True)
    assert torch.equal(an.gemm(a, b), torch.ops.dpfast.tf32x3_mm(a, b))  # routed to the kernel
    monkeypatch.setattr(an, "SPLIT_TF32_KERNEL", False)
    assert torch.equal(an.gemm(a, b), an._Split3.apply(a, b))  # the torch-op form


def test_the_kernel_option_needs_the_split():
    with pytest.raises(ValueError, match="DPH_FUSED_SPLIT_TF32_KERNEL=1 needs DPH_FUSED_SPLIT_TF32=1"):
        options.from_env({"DPH_FUSED_SPLIT_TF32_KERNEL": "1"})
    assert options.from_env({"DPH_FUSED_SPLIT_TF32": "1", "DPH_FUSED_SPLIT_TF32_KERNEL": "1"}).split_tf32_kernel


_SM90 = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dpfast import tf32x3_gemm as k
out = []
for M, N, K, B in json.loads(sys.argv[2]):
    BM, BN, BK, chunk, S = k.launch(M, N, K, B)
    mmas = {}
    for prec in (k.PRECISION, "tf32"):  # the kernel's, and one plain TF32 product for comparison
        const = dict(CHUNK=chunk, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PREC=prec)
        sig = {n: "constexpr" if n in const else "*fp32" if n.endswith("_ptr") else "i32" for n in k._mm_kernel.arg_names}
        c = triton.compile(ASTSource(fn=k._mm_kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=4))
        mmas[prec] = len(re.findall(r"mma[\w.]*\.tf32", c.asm["ptx"]))
        if prec == k.PRECISION:
            shared = int(c.metadata.shared)
    out.append(dict(shape=[M, N, K, B], split=S, shared=shared, mma=mmas[k.PRECISION], mma_one=mmas["tf32"]))
print(json.dumps(out))
"""


def test_the_kernel_builds_for_sm90_with_tf32_tensor_core_products(tmp_path):
    """Built ahead of time for an H100 / H200 (Triton's compiler and ptxas, no GPU needed) at the
    engine's launches for a net's layers, a VJP and a weight gradient: it compiles, issues three TF32
    MMA instructions (sm_90's wgmma) for each one of a plain TF32 dot and fits a block's shared memory -- what the interpreter cannot see."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dpfast.kernel_resources import SM90_SHARED_PER_BLOCK

    engines = Path(__file__).resolve().parents[2] / "engines"
    shapes = [[424_000, 50, 25, 2], [424_000, 100, 50, 2], [424_000, 1, 25, 2], [50, 100, 212_000, 2]]
    env = {k_: v for k_, v in os.environ.items() if k_ != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    p = subprocess.run([sys.executable, "-c", _SM90, str(engines), json.dumps(shapes)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    # three TF32 tensor-core products where a plain TF32 dot issues one (sm_90: wgmma ... .tf32)
    assert all(r["mma_one"] > 0 and r["mma"] == 3 * r["mma_one"] for r in rows), rows
    assert all(r["shared"] <= SM90_SHARED_PER_BLOCK for r in rows), rows
    assert rows[-1]["split"] > 1 and all(r["split"] == 1 for r in rows[:-1])  # only the weight gradient splits


def _step_grads(tr):
    """Loss and every parameter's gradient of fused's eager training step on frame 1 of trainer tr."""
    from dpfast import fused as fused_engine

    eng = fused_engine.FusedEngine(tr)
    eng.build_data()
    eng.make_optimizer()
    G = eng.groups[0]
    idx = torch.tensor([1], device=eng.device)
    eng.opt.zero_grad(set_to_none=True)
    rt, jac, jidx, diff, labels = eng.gather(G.geom, G.labels, idx)
    pred = eng.predict(rt, jac, jidx, diff, G.tcount, G.bias, create_graph=True)
    loss, _ = eng.loss_and_more(pred, labels, 1e-3, **G.loss_inputs())
    loss.backward()
    return float(loss.detach()), [p.grad.detach().clone() for p in tr.wrapper.parameters() if p.grad is not None]


def test_the_fused_step_takes_every_net_product_through_the_kernel(data, tmp_path, monkeypatch):
    """fused's float32 training step (the 3-type fcc case, float32 descriptor and fitting) with the
    kernel on: every GEMM of the nets and contractions is the kernel's -- none falls back to the
    torch-op form unseen -- and the loss and every gradient equal the torch-op form's to float32's
    accuracy (in the interpreter both are float32 products)."""
    from _upstream_fixtures import build_trainer, fcc_config

    cfg = fcc_config(data["fcc_train"], data["fcc_valid"], tos=False, prec="float32")
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    calls = {"kernel": 0, "torch ops": 0}
    real_mm, real_split = k.mm, an._Split3.apply

    def counted(name, fn):
        def run(*args):
            calls[name] += 1
            return fn(*args)
        return run

    monkeypatch.setattr(k, "mm", counted("kernel", real_mm))
    monkeypatch.setattr(an._Split3, "apply", counted("torch ops", real_split))
    monkeypatch.setattr(an, "SPLIT_TF32_KERNEL", False)
    loss_ops, grads_ops = _step_grads(build_trainer(cfg, tmp_path / "ops"))
    assert calls["torch ops"] > 0 and calls["kernel"] == 0
    calls.update({"kernel": 0, "torch ops": 0})
    monkeypatch.setattr(an, "SPLIT_TF32_KERNEL", True)
    loss_k, grads_k = _step_grads(build_trainer(cfg, tmp_path / "kernel"))
    assert calls["kernel"] > 0 and calls["torch ops"] == 0, calls
    assert abs(loss_k - loss_ops) <= 1e-5 * abs(loss_ops)
    assert len(grads_k) == len(grads_ops) > 4
    for gk, go in zip(grads_k, grads_ops):
        assert _rel(gk, go.double()) < 1e-4


def test_a_compiled_step_traces_the_routing_and_keeps_the_op_whole(monkeypatch):
    """torch.compile(fullgraph=True) over analytic_nets.gemm with the kernel on: Dynamo traces the
    routing (it could not trace Triton's settings reader, asked there at first) and keeps the op
    as one node, forward and backward equal to eager."""
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    monkeypatch.setattr(an, "SPLIT_TF32_KERNEL", True)

    def f(a, w):
        return torch.tanh(an.gemm(a, w)).sum()

    a, w = _rand(2, 40, 25, seed=14).requires_grad_(), _rand(25, 50, seed=15).requires_grad_()
    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(a, w)
    y.backward()
    ga, gw = a.grad.clone(), w.grad.clone()
    a.grad = w.grad = None
    f(a, w).backward()
    assert torch.allclose(ga, a.grad, rtol=1e-5, atol=1e-6) and torch.allclose(gw, w.grad, rtol=1e-5, atol=1e-6)
