"""TEST-ONLY patch module of the `broken-force` variant (never ship it).

Scales the output of upstream's se_e2_a descriptor (DescrptSeA.forward) by (1 + EPS). The patch
is on the forward, not on the weights, so it survives loading another model's checkpoint: the
accuracy gate's same-weights parity must see it, and so must a training run (the wrong forces
enter the loss)."""
from deepmd.pt.model.descriptor.se_a import DescrptSeA

from harness.core import rebind

EPS = 1e-6


def _perturbed_forward(self, *args, **kwargs):
    g1, rot_mat, g2, h2, sw = rebind.original(DescrptSeA, "forward")(self, *args, **kwargs)
    return g1 * (1.0 + EPS), rot_mat, g2, h2, sw


rebind.replace(DescrptSeA, "forward", _perturbed_forward, by="patches/broken-force",
               why="TEST-ONLY: the descriptor scaled by 1 + 1e-6, which the accuracy gate must catch")
