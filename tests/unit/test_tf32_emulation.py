"""The CPU's TF32 (patches/fused-mixed/enable_tf32.py, DPH_TF32_EMULATE): inputs rounded to a
10-bit mantissa to nearest even, exactly; only float32 CPU tensors; a GEMM through every entry
point the engine uses gives the product of the rounded inputs; gradients pass straight through."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

MODULE = Path(__file__).resolve().parents[2] / "patches" / "fused-mixed" / "enable_tf32.py"


@pytest.fixture
def tf32(monkeypatch):
    """The patch module loaded (not installed), and its install() undone after the test."""
    F = torch.nn.functional
    saved = [(o, n, getattr(o, n)) for o, n in ((torch, "matmul"), (torch, "bmm"), (torch, "mm"), (torch, "addmm"),
                                                (torch, "baddbmm"), (torch, "einsum"), (torch.Tensor, "matmul"),
                                                (torch.Tensor, "__matmul__"), (torch.Tensor, "bmm"), (torch.Tensor, "mm"),
                                                (F, "linear"))]
    precision, cuda_tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    monkeypatch.delenv("DPH_TF32_EMULATE", raising=False)
    spec = importlib.util.spec_from_file_location("enable_tf32_under_test", MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    for o, n, f in saved:
        setattr(o, n, f)
    torch.set_float32_matmul_precision(precision)
    torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


def test_rounding_keeps_ten_mantissa_bits_to_nearest_even(tf32):
    u = 2.0 ** -10  # TF32's unit in the last place at 1
    x = torch.tensor([1.0, 1 + u / 2, 1 + 3 * u / 2, 1 + u / 2 + u / 8, 1 + u / 4, -3.14159265], dtype=torch.float32)
    assert tf32.to_tf32(x).tolist() == [1.0, 1.0, 1 + 2 * u, 1 + u, 1.0, -3.140625]  # ties to even
    assert not getattr(torch.matmul, "_dph_tf32", False)  # loading installs nothing without the variable
    d = torch.tensor([1 + u / 2], dtype=torch.float64)
    assert tf32.to_tf32(d) is d  # float64 is never rounded


def test_every_gemm_entry_point_multiplies_the_rounded_inputs(tf32):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 50, generator=g), torch.randn(3, 50, 20, generator=g)
    exact = tf32.to_tf32(a).double() @ tf32.to_tf32(b).double()
    fp32 = (a @ b).double()
    tf32.install()
    tf32.install()  # idempotent: no double wrapping
    for got in (torch.matmul(a, b), a @ b, torch.bmm(a, b), a.bmm(b), torch.einsum("bij,bjk->bik", a, b),
                torch.nn.functional.linear(a[0], b[0].T)[None], torch.baddbmm(torch.zeros(3, 16, 20), a, b),
                torch.mm(a[0], b[0]).expand(3, -1, -1)[:1], torch.addmm(torch.zeros(16, 20), a[0], b[0])[None]):
        n = got.shape[0]
        assert (got.double() - exact[:n]).abs().max() < 1e-4
    # the rounding is what moved the product: ~1e-3 relative, far beyond float32's ~1e-6
    assert (torch.matmul(a, b).double() - fp32).abs().max() > 1e-3
    a64 = a.double()
    assert torch.equal(torch.matmul(a64, b.double()), a64 @ b.double())  # float64 untouched
    w = a.clone().requires_grad_()
    torch.matmul(w, b).sum().backward()
    # straight through the rounding: d/dw sum(round(w) round(b)) = round(b) summed over its columns
    assert torch.allclose(w.grad, tf32.to_tf32(b).sum(-1)[:, None, :].expand_as(a))
