"""TEST-ONLY patch module of the `broken-force` variant (never ship it).

Scales the output of upstream's se_e2_a descriptor (DescrptSeA.forward) by (1 + EPS). The patch
is on the forward, not on the weights, so it survives loading another model's checkpoint: the
accuracy gate's same-weights parity must see it, and so must a training run (the wrong forces
enter the loss)."""
from deepmd.pt.model.descriptor.se_a import DescrptSeA

EPS = 1e-6
_orig_forward = DescrptSeA.forward


def _perturbed_forward(self, *args, **kwargs):
    g1, rot_mat, g2, h2, sw = _orig_forward(self, *args, **kwargs)
    return g1 * (1.0 + EPS), rot_mat, g2, h2, sw


DescrptSeA.forward = _perturbed_forward
