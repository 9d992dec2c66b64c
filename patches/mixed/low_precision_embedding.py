"""Patch module of the ``mixed`` variant: se_e2_a embedding-net GEMMs in bfloat16 (or float16).

Upstream's ``MLPLayer.forward`` computes ``F.linear(x, W^T, b)`` in the layer's precision. While
``DescrptBlockSeA.forward`` runs (the embedding nets are evaluated there, and only there), this
patch computes that linear in the low dtype and widens the result back to the layer's precision
before the activation; the fitting net, reductions and the loss are untouched. Autograd records
the casts, so the force derivative and the loss's second backward go through the same
low-precision GEMMs."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from deepmd.pt.model.descriptor import se_a as _se_a
from deepmd.pt.model.network import mlp as _mlp

from harness.core import envvars, rebind

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}[envvars.get_str(envvars.DPH_MIXED_DTYPE)]
_state = threading.local()
STATS = {"low_precision_linears": 0}

BY = "patches/mixed"


def _orig_block_forward(self, *args, **kwargs):
    return rebind.original(_se_a.DescrptBlockSeA, "forward")(self, *args, **kwargs)


def _orig_layer_forward(self, xx):
    return rebind.original(_mlp.MLPLayer, "forward")(self, xx)


def _block_forward(self, *args, **kwargs):
    prev = getattr(_state, "in_embedding", False)
    _state.in_embedding = True
    try:
        return _orig_block_forward(self, *args, **kwargs)
    finally:
        _state.in_embedding = prev


def _layer_forward(self, xx: torch.Tensor) -> torch.Tensor:
    if not getattr(_state, "in_embedding", False):
        return _orig_layer_forward(self, xx)
    STATS["low_precision_linears"] += 1
    ori_prec = xx.dtype
    xx = xx.to(self.prec)
    bias = self.bias.to(LOW) if self.bias is not None else None
    # low-precision product (fp32 accumulation inside the GEMM), widened before the activation
    yy = F.linear(xx.to(LOW), self.matrix.t().to(LOW), bias).to(self.prec)
    yy = self.activate(yy)
    yy = yy * self.idt if self.idt is not None else yy
    if self.resnet:
        if xx.shape[-1] == yy.shape[-1]:
            yy = yy + xx
        elif 2 * xx.shape[-1] == yy.shape[-1]:
            yy = yy + torch.concat([xx, xx], dim=-1)
    return yy.to(ori_prec)


rebind.replace(_se_a.DescrptBlockSeA, "forward", _block_forward, by=BY,
               why="marks the se_e2_a embedding block, whose linears run in low precision")
rebind.replace(_mlp.MLPLayer, "forward", _layer_forward, by=BY,
               why="inside the embedding block: the GEMM in bf16/fp16 with fp32 accumulation; elsewhere upstream's")
