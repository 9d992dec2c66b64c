"""Patch module of the ``fused`` variant (loaded after graph's ``graph_trainer.py``).

graph's wrapper of ``Trainer.run`` builds ``graph_engine.GraphEngine(trainer)``; this module
swaps that class for ``fused_engine.FusedEngine`` (analytic forces, one backward per step,
torch.compile on CUDA) and registers the accuracy-gate hooks so the gate checks this code.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_GRAPH = os.path.join(os.path.dirname(_HERE), "graph")
for _p in (_GRAPH, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import graph_engine  # noqa: E402
import fused_engine  # noqa: E402

graph_engine.GraphEngine = fused_engine.FusedEngine

try:
    from harness import runtime as _runtime

    _runtime.parity_forward = fused_engine.parity_forward
    _runtime.parity_train_step = fused_engine.parity_train_step
except Exception:  # noqa: BLE001  (outside the harness)
    pass
