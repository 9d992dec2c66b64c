"""A float32 batched GEMM whose products run on the tensor cores as three TF32 products split in
registers (Triton's ``tl.dot(..., input_precision="tf32x3")``), for fused-3xtf32-kernel (issue 40).

analytic_nets._mm3 forms the same three products with torch ops, which on skinny shapes (rows
~10^5-10^6, inner and outer widths 1-100) pays in memory: the split operands [hi | hi | lo] are
written out at three times the input's size before cuBLAS reads them. Here each tile of A and B is
loaded once as float32 and split on chip, so the bytes are plain float32's and the arithmetic
TF32's x 3 -- which the tensor cores have to spare.

``dpfast::tf32x3_mm(a, b)`` is a torch op (torch.library; torch.compile keeps it opaque, a CUDA
graph captures it) with its autograd: the two backward products are the same op on transposed
views (strides, no copies), so the training gradient is 3xTF32 too. A product whose inner
dimension is long and whose output is small (a weight gradient: sum over ~10^5 rows) is split
along the inner dimension into partial tiles summed afterwards in a fixed order (no atomics: a run
is reproducible). Batch dimensions: a's leading dims, b's either equal to them, a suffix of them
(stacked weights broadcast over value/tangent), or none. On a CPU the kernel runs in Triton's
interpreter (tests; there ``tl.dot`` is numpy's float32 product, so the interpreter checks the
indexing, the card the precision: tests/gpu).
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a venv without Triton: the op is unavailable, analytic_nets keeps _mm3
    triton = None

PRECISION = "tf32x3"
SPLIT_MIN_INNER = 4096  # split the inner dimension only above this length ...
SPLIT_CHUNK = 2048  # ... into chunks of about this many rows
SPLIT_MAX = 256
FEW_TILES = 264  # ~2 programs per H100 SM: fewer output tiles than this leave the card idle


# Triton's interpreter (TRITON_INTERPRET=1: the CPU tests), read once: torch.compile cannot trace
# Triton's settings reader where analytic_nets.gemm asks inside a compiled step
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, S, BB,
                   sab, sam, sak, sbb, sbk, sbn, scz, scm, scn, CHUNK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        """c[z * S + s] = a[z][:, s*CHUNK : (s+1)*CHUNK] @ b[z % BB][s*CHUNK : (s+1)*CHUNK, :]. CHUNK is
        a compile-time constant (Triton's interpreter takes no runtime loop bound; a training's
        shapes are static, so a handful of builds)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        zs = tl.program_id(2)
        z = zs // S
        s = zs % S
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        a_base = a_ptr + z.to(tl.int64) * sab
        b_base = b_ptr + (z % BB).to(tl.int64) * sbb
        k_lo = s * CHUNK
        k_hi = tl.minimum(k_lo + CHUNK, K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CHUNK, BLOCK_K):
            kk = k_lo + k0 + rk
            a = tl.load(a_base + rm[:, None].to(tl.int64) * sam + kk[None, :].to(tl.int64) * sak,
                        mask=(rm[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
            b = tl.load(b_base + kk[:, None].to(tl.int64) * sbk + rn[None, :].to(tl.int64) * sbn,
                        mask=(kk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(a, b, input_precision=PREC)
        c = c_ptr + zs.to(tl.int64) * scz + rm[:, None].to(tl.int64) * scm + rn[None, :].to(tl.int64) * scn
        tl.store(c, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _block(n: int, least: int, most: int) -> int:
    return max(least, min(most, triton.next_power_of_2(max(n, 1))))


def plan(a_shape, b_shape) -> tuple | None:
    """(batch shape, a's batch count, b's batch count) for matmul(a, b) as the kernel runs it, or
    None where the batch layout is not one it takes (b's batch dims must be a suffix of a's)."""
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[-1] != b_shape[-2]:
        return None
    ab, bb = tuple(a_shape[:-2]), tuple(b_shape[:-2])
    if len(bb) > len(ab) or (bb and ab[len(ab) - len(bb):] != bb):
        return None
    return ab, math.prod(ab), math.prod(bb)


def launch(M: int, N: int, K: int, batches: int, interpreter: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, S) for a [M, K] @ [K, N] product over `batches`: tiles of
    up to 64 x 128 x 32 (smaller in the interpreter, where each op is a numpy call), and the inner
    dimension cut into S chunks where it is long and the output has too few tiles to fill the card."""
    BM = _block(M, 16, 32 if interpreter else 64)
    BN = _block(N, 16, 64 if interpreter else 128)
    BK = _block(K, 16, 32)
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN) * batches
    S = 1
    if K > SPLIT_MIN_INNER and tiles < FEW_TILES:
        S = min(SPLIT_MAX, triton.cdiv(K, SPLIT_CHUNK))
    chunk = triton.cdiv(triton.cdiv(K, S), BK) * BK
    return BM, BN, BK, chunk, triton.cdiv(K, chunk)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """matmul(a, b) of float32 a [..., M, K] and b [(suffix of ...), K, N] by the kernel."""
    batch, na, nb = plan(a.shape, b.shape)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    a3 = a.reshape(na, M, K)  # a view where a's batch dims flatten (they do for the engine's tensors)
    b3 = b.reshape(nb, K, N)
    BM, BN, BK, chunk, S = launch(M, N, K, na, INTERPRETED)
    c = torch.empty((na * S, M, N), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), na * S)
    _mm_kernel[grid](a3, b3, c, M, N, K, S, nb,
                     a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0) if nb > 1 else 0, b3.stride(1),
                     b3.stride(2), c.stride(0), c.stride(1), c.stride(2), CHUNK=chunk,
                     BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PREC=PRECISION, num_warps=4)
    if S > 1:  # partial products over the inner chunks, summed in chunk order
        c = c.view(na, S, M, N).sum(1)
    return c.view(*batch, M, N)


if triton is not None:
    @torch.library.custom_op("dpfast::tf32x3_mm", mutates_args=())
    def tf32x3_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mm(a, b)

    @tf32x3_mm.register_fake
    def _(a, b):
        return a.new_empty((*a.shape[:-1], b.shape[-1]))

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = tf32x3_mm(g, b.transpose(-1, -2)).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        # per batch (a's inner dimension the rows: split along it), then summed over a's extra batch dims
        gb = tf32x3_mm(a.transpose(-1, -2), g).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb

    tf32x3_mm.register_autograd(_backward, setup_context=_setup)


def supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether dpfast::tf32x3_mm takes this product (float32, a batch layout plan() accepts)."""
    return (triton is not None and a.dtype == torch.float32 and b.dtype == torch.float32
            and plan(a.shape, b.shape) is not None)
