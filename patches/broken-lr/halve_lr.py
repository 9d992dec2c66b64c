"""TEST-ONLY patch module of the `broken-lr` variant (never ship it).

Scales start_lr and stop_lr of upstream's LearningRateExp by SCALE when the schedule is built, so
the lcurve's lr column shows the schedule that really trained (decay_steps and the derived decay
rate are unchanged: the same shape at half the height)."""
from deepmd.dpmodel.utils.learning_rate import LearningRateExp

SCALE = 0.5
_orig_init = LearningRateExp.__init__


def _scaled_init(self, start_lr, *args, stop_lr=None, **kwargs):
    _orig_init(self, start_lr * SCALE, *args, stop_lr=None if stop_lr is None else stop_lr * SCALE, **kwargs)


LearningRateExp.__init__ = _scaled_init
