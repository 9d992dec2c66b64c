"""Test-only: the DDP shim that lets upstream's GPU-only DDP path run on CPU ranks (written into a
run's patch modules by the multi-process tests)."""

CPU_DDP_SHIM = '''
"""test-only: let upstream's GPU-only DDP path run on CPU ranks (gloo, no set_device, no device_ids)."""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as _DDP
import deepmd.pt.train.training as _training

_init = dist.init_process_group


def _gloo(*a, **k):
    k["backend"] = "gloo"
    return _init(*a, **k)


class _CpuDDP(_DDP):
    def __init__(self, module, device_ids=None, output_device=None, **k):
        super().__init__(module, **k)


dist.init_process_group = _gloo
torch.cuda.set_device = lambda *a, **k: None
_training.DDP = _CpuDDP
'''
