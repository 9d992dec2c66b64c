"""DPH_FUSED_CONTRACT_F64 (fused-tf32-nets, issue 40): the descriptor's contractions of a float32
descriptor computed in float64 and rounded back once -- so neither the GPU's TF32 nor its CPU
emulation (patches/fused-mixed/enable_tf32.py) rounds their inputs -- and nothing changes where
the option is off or the descriptor is float64."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from dpfast import analytic_nets as an

REPO = Path(__file__).resolve().parents[2]


def _operands():
    g = torch.Generator().manual_seed(3)
    return torch.randn(40, 4, 46, generator=g), torch.randn(40, 46, 100, generator=g)  # R~^T, G of 40 atoms


def test_a_float32_contraction_is_one_float64_product_rounded_once(monkeypatch):
    a, b = _operands()
    monkeypatch.setattr(an, "CONTRACT_F64", True)
    got = an.contract(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, torch.matmul(a.double(), b.double()).float())
    a64, b64 = a.double(), b.double()
    assert torch.equal(an.contract(a64, b64), torch.matmul(a64, b64))  # a float64 descriptor: as before
    monkeypatch.setattr(an, "CONTRACT_F64", False)
    assert torch.equal(an.contract(a, b), torch.matmul(a, b))  # off: the float32 product itself


def test_emulated_tf32_rounds_the_nets_but_not_the_contractions(monkeypatch):
    a, b = _operands()
    exact = torch.matmul(a.double(), b.double())
    spec = importlib.util.spec_from_file_location("tf32_for_contract", REPO / "patches" / "fused-mixed" / "enable_tf32.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(torch, "matmul", mod._rounding(torch.matmul, (0, 1)))  # undone after the test
    monkeypatch.setattr(an, "CONTRACT_F64", False)
    rounded = (an.contract(a, b).double() - exact).abs().max()
    monkeypatch.setattr(an, "CONTRACT_F64", True)
    kept = (an.contract(a, b).double() - exact).abs().max()
    assert rounded > 1e-3 and kept < 1e-5, (rounded, kept)


def test_the_option_reaches_analytic_nets_from_the_environment():
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'engines'}:{REPO}", "DPH_FUSED_CONTRACT_F64": "1"}
    out = subprocess.run([sys.executable, "-c", "import dpfast.analytic_nets as an; print(an.CONTRACT_F64)"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]
