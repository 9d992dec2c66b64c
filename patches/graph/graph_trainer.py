"""Patch module of the ``graph`` variant (imported by harness.launch before ``dp``).

Upstream's ``dp --pt train`` builds the Trainer as usual (model + statistics, loss,
learning-rate schedule, optimizer settings, data). We wrap ``Trainer.run`` so that
its training loop is replaced by the device-resident, CUDA-graph-captured loop of
``graph_engine.GraphEngine``. Inputs outside the variant's scope raise a
RuntimeError naming what is unsupported.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import graph_engine  # noqa: E402

from deepmd.pt.train import training as _training  # noqa: E402

_orig_run = _training.Trainer.run


def _graph_run(self) -> None:
    if getattr(self, "num_steps", 0) <= getattr(self, "start_step", 0):
        return _orig_run(self)
    engine = graph_engine.GraphEngine(self)
    self._graph_engine = engine
    try:
        engine.run()
    finally:
        self._close_lmdb_loaders()


if not getattr(_training.Trainer.run, "_dph_graph", False):
    _graph_run._dph_graph = True
    _training.Trainer.run = _graph_run


def _parity_forward(model, coord, atype, box):
    """Accuracy-gate hook: energies/forces/virials from this variant's own code path
    (precomputed geometry + functional forward), for frames in any atom order."""
    import torch

    eng = graph_engine.GraphEngine.for_model(model)
    coord = coord.to(eng.device)
    atype = atype.to(eng.device)
    order = torch.argsort(atype[0], stable=True)  # the engine wants atoms sorted by type
    inv = torch.argsort(order)
    with torch.enable_grad():
        out = eng.predict_frames(coord[:, order], atype[:, order], None if box is None else box.to(eng.device))
    return {"energy": out["energy"].detach().reshape(-1), "force": out["force"].detach()[:, inv],
            "virial": out["virial"].detach()}


try:
    from harness import runtime as _runtime

    _runtime.parity_forward = _parity_forward
    _runtime.parity_train_step = graph_engine.parity_train_step  # its own forces, loss and flat Adam
except ImportError:  # used outside the harness (tests drive the module directly)
    pass
