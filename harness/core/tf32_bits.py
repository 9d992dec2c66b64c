"""TF32 rounding by its bits: the one copy shared by the engine's 3xTF32 split
(analytic_nets.tf32_split) and the TF32 emulation of the precision budget
(patches/fused-mixed/enable_tf32.py). In harness.core, which both already import: a patch
module loads before the engine (a child imports the build's frozen `dpfast`, whose options are
read at its import), so it must not import the engine for this."""
import torch


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Float32 `x` rounded to TF32 (10 explicit mantissa bits, round to nearest even: add just
    under half of the 13 dropped bits' unit, plus the kept last bit for the tie, then clear
    them); the result is exactly what a tensor core reads. Finite values only (GEMM operands)."""
    i = x.view(torch.int32)
    return ((i + (0x0FFF + ((i >> 13) & 1))) & -8192).view(torch.float32)
