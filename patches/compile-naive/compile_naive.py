"""Patch module of the `compile-naive` variant: torch.compile (Inductor) of upstream's model,
exactly as a user would first try it.

It fails: forces are a gradient of the energy, so the force loss needs a second backward through
the compiled graph, and AOTAutograd raises "torch.compile with aot_autograd does not currently
support double backward" (upstream issue 4853). Kept so the harness records that failure; the
compiled path that works inside upstream's Trainer is the `compile` variant (make_fx puts the
first derivative into the traced graph before torch.compile sees it), and `fused` writes the
first derivative out by hand."""
import torch
from deepmd.pt.train import training as _training

_orig_init = _training.Trainer.__init__


def _init(self, *args, **kwargs):
    _orig_init(self, *args, **kwargs)
    for key in list(self.wrapper.model):
        self.wrapper.model[key] = torch.compile(self.wrapper.model[key], dynamic=False)


_training.Trainer.__init__ = _init
