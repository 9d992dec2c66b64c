"""fused-mixed: TF32 tensor-core GEMMs (fp32 accumulation) for the float32 embedding and
fitting matmuls, set before upstream builds anything (Inductor reads the same flags).

DPH_TF32_EMULATE=1 (the precision budget's CPU rows): where no tensor core exists, the same
numerics by hand -- every float32 CPU GEMM's inputs are rounded to TF32 (10 explicit mantissa
bits, round to nearest even) before an fp32 GEMM, so a CPU run shows which stage TF32 would
spend the mixed class's error in. Covered: torch.matmul / bmm / mm / addmm / baddbmm / einsum,
``@`` and F.linear forward, i.e. every product of the engine's energy, forces and virial. Not
covered: the GEMMs autograd runs for the backward of those products (the rounding passes the
gradient straight through), so the training step's gradient is emulated only where the engine
computes it by explicit products."""
import functools

import torch

from harness.core import envvars
from harness.core.tf32_bits import round_to_tf32

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.set_float32_matmul_precision("high")


def to_tf32(x):
    """x rounded to TF32's 10-bit mantissa where x is a float32 CPU tensor (else x itself); the
    gradient passes straight through. Finite values only (a GEMM's inputs)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        return x
    r = round_to_tf32(x.detach().contiguous())  # drop 13 bits, nearest even
    return x + (r - x).detach() if x.requires_grad else r


def _rounding(fn, operands: tuple[int, ...]):
    """fn with its GEMM operands (positional indices) rounded; an added term (addmm's input,
    linear's bias) stays float32, as the tensor core's fp32 accumulator adds it."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*(to_tf32(a) if k in operands else a for k, a in enumerate(args)), **kwargs)
    return wrapped


def _einsum(fn):
    """einsum with every operand rounded (a two-operand einsum is a GEMM; its operands may come
    as one list)."""
    @functools.wraps(fn)
    def wrapped(eq, *ops, **kwargs):
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        return fn(eq, *[to_tf32(o) for o in ops], **kwargs)
    return wrapped


def install() -> None:
    """Route the float32 CPU GEMMs through to_tf32 (idempotent)."""
    if getattr(torch.matmul, "_dph_tf32", False):
        return
    F = torch.nn.functional
    two, added = (0, 1), (1, 2)
    for owner, name, ops in ((torch, "matmul", two), (torch, "bmm", two), (torch, "mm", two), (torch, "addmm", added),
                             (torch, "baddbmm", added), (torch.Tensor, "matmul", two), (torch.Tensor, "__matmul__", two),
                             (torch.Tensor, "bmm", two), (torch.Tensor, "mm", two), (F, "linear", two)):
        w = _rounding(getattr(owner, name), ops)
        w._dph_tf32 = True
        setattr(owner, name, w)
    torch.einsum = _einsum(torch.einsum)


if envvars.flag(envvars.DPH_TF32_EMULATE):
    install()
