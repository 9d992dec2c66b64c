"""DPH_FUSED_SPLIT_TF32 (fused-3xtf32, issue 40): each float32 GEMM of the nets and contractions as
three TF32 products (hi.hi + hi.lo + lo.hi). The split is exact and TF32-representable; under the
CPU's TF32 emulation (every GEMM input rounded to TF32, patches/fused-mixed/enable_tf32.py) the
three products keep float32's accuracy where one TF32 product loses ~1e-3 -- forward and the
training backward alike; off, or with a float64 operand, nothing changes."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpfast import analytic_nets as an
from dpfast import options

REPO = Path(__file__).resolve().parents[2]


def _tf32_module():
    spec = importlib.util.spec_from_file_location("tf32_for_split", REPO / "patches" / "fused-mixed" / "enable_tf32.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _operands(requires_grad=False):
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 300, 50, generator=g).requires_grad_(requires_grad)  # value and tangent rows
    w = (torch.randn(50, 100, generator=g) / 7).requires_grad_(requires_grad)  # a layer's weights
    return a, w


def test_the_split_is_exact_and_its_high_part_is_tf32():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 10.0 ** torch.randint(-6, 6, (4096,)).float()
    hi, lo = an.tf32_split(x)
    assert torch.equal(hi + lo, x)
    assert not (hi.view(torch.int32) & 0x1FFF).any()  # the 13 low mantissa bits are zero
    assert (lo.abs() <= x.abs() * 2.0 ** -11).all()
    assert torch.equal(_tf32_module().to_tf32(x), hi)  # the emulation's rounding, to the bit


def test_three_tf32_products_keep_float32s_accuracy_where_one_loses_it(monkeypatch):
    a, w = _operands()
    exact = torch.matmul(a.double(), w.double())
    monkeypatch.setattr(torch, "matmul", _tf32_module()._rounding(torch.matmul, (0, 1)))  # TF32, emulated
    monkeypatch.setattr(an, "SPLIT_TF32", False)
    one = ((an.gemm(a, w).double() - exact).abs().max() / exact.abs().max()).item()
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    three = ((an.gemm(a, w).double() - exact).abs().max() / exact.abs().max()).item()
    plain = ((torch.matmul(a.double(), w.double()).float().double() - exact).abs().max() / exact.abs().max()).item()
    assert one > 1e-4 and three < 2e-6 and three < one / 100, (one, three, plain)
    assert torch.equal(an.contract(a, w), an.gemm(a, w))  # the contractions take the same path


def test_the_backward_products_are_three_tf32_products_too(monkeypatch):
    """The weights' and inputs' gradients (the training step's) keep float32's accuracy under
    emulated TF32, and the broadcast weight's gradient is summed over the stacked rows."""
    a, w = _operands(requires_grad=True)
    g = torch.randn(2, 300, 100, generator=torch.Generator().manual_seed(9))
    a64, w64 = a.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.matmul(a64, w64).backward(g.double())
    monkeypatch.setattr(torch, "matmul", _tf32_module()._rounding(torch.matmul, (0, 1)))
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    an.gemm(a, w).backward(g)
    assert a.grad.shape == a.shape and w.grad.shape == w.shape
    for got, ref in ((a.grad, a64.grad), (w.grad, w64.grad)):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6


def test_off_or_float64_the_product_is_matmul_itself(monkeypatch):
    a, w = _operands()
    monkeypatch.setattr(an, "SPLIT_TF32", False)
    assert torch.equal(an.gemm(a, w), torch.matmul(a, w))
    monkeypatch.setattr(an, "SPLIT_TF32", True)
    a64, w64 = a.double(), w.double()
    assert torch.equal(an.gemm(a64, w64), torch.matmul(a64, w64))


def test_the_option_reaches_analytic_nets_and_refuses_autograd_forces():
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'engines'}:{REPO}", "DPH_FUSED_SPLIT_TF32": "1"}
    out = subprocess.run([sys.executable, "-c", "import dpfast.analytic_nets as an; print(an.SPLIT_TF32)"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]
    with pytest.raises(ValueError, match="DPH_FUSED_SPLIT_TF32=1 with DPH_FUSED_AUTOGRAD=1"):
        options.from_env({"DPH_FUSED_SPLIT_TF32": "1", "DPH_FUSED_AUTOGRAD": "1"})
