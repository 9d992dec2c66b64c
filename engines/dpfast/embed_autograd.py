"""The backward of the embedding kernel (issue 39, kernel 2) and its autograd: ``embed_contract``
as a torch op (``dpfast::embed_contract``, torch.library) whose VJP is two kernels:

* to R~: dE/dR~ = ``embed_kernels.env_cotangent(rr, net, gxyz)`` (the force path's product: the
  contraction's cotangent with G and dG/ds recomputed on chip);
* to the weights: ``_weight_vjp_kernel``. One program per ATOMS consecutive centre atoms (and,
  with SLOTS_PER_PROGRAM, per chunk of their neighbour slots: ``vjp_split``); per tile of
  neighbour rows it recomputes the three layers (pre-activations in registers),
  G_bar = R~ gxyz, and runs the layers backward (tanh', idt, the concat / identity skips),
  accumulating every weight's, bias's and idt's gradient in registers; each program writes its
  partial sums once and torch sums the partials over programs in a fixed order: no atomics, so a
  run's gradients are reproducible bit for bit.

Registered as torch ops: ``dpfast::embed_contract`` (autograd: ``dpfast::embed_contract_vjp``).
The weights enter as the padded PackedNet tensors, made differentiably from upstream's
parameters by ``pack_net(..., differentiable=True)``, so the gradients reach upstream's
``nn.Parameter``s through the padding. Once differentiable: the VJP itself has no derivative yet
(the force loss's double backward is the next slice), so a second backward raises.
"""
from __future__ import annotations

import torch

from . import embed_kernels as ek
from . import options

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# partial weight gradients written once per this many centre atoms (DPH_FUSED_VJP_ATOMS, default
# 1; read at each call, so tools/bench_embed_kernels.py can time others: fewer atoms, more
# programs, more partials)
_OPTIONS = options.current()  # this process's engine options (the training child's environment)
ATOMS_PER_PROGRAM = _OPTIONS.vjp_atoms
# neighbour slots of an atom per program (DPH_FUSED_VJP_SLOTS, default 16; rounded up to the tile
# rows; 0: all of them). Splitting the slots gives a small system more programs than atoms/ATOMS (128 atoms at
# 8 a program fill 16 of an H100's 132 SMs); each (atom group, slot chunk) writes its own partials row.
SLOTS_PER_PROGRAM = _OPTIONS.vjp_slots
# the weight-VJP kernel's tile rows and warps (DPH_FUSED_VJP_ROWS / _WARPS; None: embed_kernels.LAUNCH's)
WEIGHT_VJP_ROWS = _OPTIONS.vjp_rows or None
WEIGHT_VJP_WARPS = _OPTIONS.vjp_warps or None
# a concat last layer by column halves (DPH_FUSED_VJP_HALVES): the sm_90 build's shared memory
# 169,984 -> 77,824 B at 16 x 8, so two 4-warp programs fit an SM (registers: 255 a thread)
WEIGHT_VJP_HALVES = _OPTIONS.vjp_halves


def vjp_split(A: int, S: int, BS: int) -> tuple[int, int, int]:
    """(programs, slots per program, slot chunks per atom) of a VJP launch over A atoms x S slots
    in tiles of BS rows: program pid takes atom group pid // chunks and slot chunk pid % chunks."""
    slots = -(-(SLOTS_PER_PROGRAM or S) // BS) * BS
    chunks = -(-S // slots)
    return max(1, -(-A // ATOMS_PER_PROGRAM)) * chunks, slots, chunks

if triton is not None:
    from .embed_kernels import _atom_tile, _first_layer, _skip, _skip_bar, _tanh

    @triton.jit
    def _fwd_layer(x, w_ptr, b_ptr, i_ptr, PIN: tl.constexpr, POUT: tl.constexpr,
                   TANH: tl.constexpr, SKIP: tl.constexpr, TANH_EXP: tl.constexpr, STRIDE: tl.constexpr = 0):
        """One MLPLayer forward on a [BS, PIN] tile: (output, activation before idt, the loaded
        weight, which the backward reuses: one shared-memory copy per layer, not two). STRIDE:
        the weight's row length when these POUT columns are a slice of a wider layer."""
        ri = tl.arange(0, PIN)
        ro = tl.arange(0, POUT)
        w = tl.load(w_ptr + ri[:, None] * (STRIDE if STRIDE else POUT) + ro[None, :])
        z = tl.dot(x, w) + tl.load(b_ptr + ro)[None, :]
        if TANH:
            t = _tanh(z, TANH_EXP)
        else:
            t = z
        return _skip(t * tl.load(i_ptr + ro)[None, :], x, SKIP), t, w

    @triton.jit
    def _bwd_layer(y_bar, x, t, w, i_ptr, PIN: tl.constexpr, POUT: tl.constexpr,
                   TANH: tl.constexpr, SKIP: tl.constexpr):
        """One MLPLayer backward: from y_bar [BS, POUT] and the saved input x [BS, PIN],
        activation t and weight w: (x_bar, W_bar [PIN, POUT], b_bar [POUT], idt_bar [POUT])."""
        ro = tl.arange(0, POUT)
        idt = tl.load(i_ptr + ro)
        i_bar = tl.sum(y_bar * t, axis=0)
        z_bar = y_bar * idt[None, :]
        if TANH:
            z_bar = z_bar * (1.0 - t * t)
        w_bar = tl.dot(tl.trans(x), z_bar)
        b_bar = tl.sum(z_bar, axis=0)
        x_bar = _skip_bar(tl.dot(z_bar, tl.trans(w)), y_bar, SKIP)
        return x_bar, w_bar, b_bar, i_bar

    @triton.jit
    def _last_half_bwd(x2, rr, gb_ptr, a, live, cols, w_ptr, b_ptr, i_ptr, H: tl.constexpr, P2: tl.constexpr,
                       P3: tl.constexpr, NG: tl.constexpr, TANH: tl.constexpr, TANH_EXP: tl.constexpr):
        """A concat last layer's column half H (P2 of its P3 = 2 P2 columns), forward and backward
        at once: (W_bar [P2, P2], b_bar, idt_bar [P2], its share of x2_bar [BS, P2]). The half's
        weight slice, gx columns and z_bar live one after the other, so the two halves share
        their shared memory (_weight_vjp_kernel with HALVES)."""
        rc = tl.arange(0, 16)
        o = H * P2
        _, t, w = _fwd_layer(x2, w_ptr + o, b_ptr + o, i_ptr + o, P2, P2, TANH, 1, TANH_EXP, P3)
        col = tl.load(cols + o + tl.arange(0, P2))
        gb = tl.load(gb_ptr + a * 4 * NG + rc[:, None] * NG + col[None, :],
                     mask=live & (rc[:, None] < 4) & (col[None, :] >= 0), other=0.0)
        y_bar = tl.dot(rr, gb)  # this half's columns of d(sum gb . R~^T G)/dG
        # the concat skip adds all of x2 to each half: per half, an identity skip (SKIP 1)
        x_bar, w_bar, b_bar, i_bar = _bwd_layer(y_bar, x2, t, w, i_ptr + o, P2, P2, TANH, 1)
        return w_bar, b_bar, i_bar, x_bar

    @triton.jit
    def _halves_2d(a, b, R: tl.constexpr, C: tl.constexpr):
        """[R, C] halves a, b as one [R, 2 C] (a's columns first)."""
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (R, 2 * C))

    @triton.jit
    def _halves_1d(a, b, C: tl.constexpr):
        """[C] halves a, b as one [2 C] (a first)."""
        return tl.reshape(tl.permute(tl.join(a, b), (1, 0)), (2 * C,))

    @triton.jit
    def _zero_partials(P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr):
        """Accumulators of one program's weight gradients: w0 b0 i0 [P1], w1 [P1, P2], b1 i1 [P2],
        w2 [P2, P3], b2 i2 [P3]."""
        return (tl.zeros((P1,), dtype=tl.float64), tl.zeros((P1,), dtype=tl.float64), tl.zeros((P1,), dtype=tl.float64),
                tl.zeros((P1, P2), dtype=tl.float64), tl.zeros((P2,), dtype=tl.float64), tl.zeros((P2,), dtype=tl.float64),
                tl.zeros((P2, P3), dtype=tl.float64), tl.zeros((P3,), dtype=tl.float64), tl.zeros((P3,), dtype=tl.float64))

    @triton.jit
    def _store_partials(part_ptr, p, g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2,
                        P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr):
        """Program p's partial sums as row p of the partials buffer, in _part_shapes' order."""
        r1 = tl.arange(0, P1)
        r2 = tl.arange(0, P2)
        r3 = tl.arange(0, P3)
        base = part_ptr + p * (3 * P1 + P1 * P2 + 2 * P2 + P2 * P3 + 2 * P3)
        tl.store(base + r1, g_w0)
        tl.store(base + P1 + r1, g_b0)
        tl.store(base + 2 * P1 + r1, g_i0)
        o = 3 * P1
        tl.store(base + o + r1[:, None] * P2 + r2[None, :], g_w1)
        o += P1 * P2
        tl.store(base + o + r2, g_b1)
        tl.store(base + o + P2 + r2, g_i1)
        o += 2 * P2
        tl.store(base + o + r2[:, None] * P3 + r3[None, :], g_w2)
        o += P2 * P3
        tl.store(base + o + r3, g_b2)
        tl.store(base + o + P3 + r3, g_i2)

    @triton.jit
    def _weight_vjp_kernel(rr_ptr, gb_ptr, part_ptr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, A,
                           S: tl.constexpr, NG: tl.constexpr, ATOMS: tl.constexpr, SLOTS: tl.constexpr,
                           NC: tl.constexpr, BS: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                           TANH0: tl.constexpr, TANH1: tl.constexpr, TANH2: tl.constexpr,
                           SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr,
                           HALVES: tl.constexpr = False):
        pid = tl.program_id(0).to(tl.int64)
        p = pid // NC  # atom group
        c = pid % NC  # slot chunk (vjp_split)
        rc = tl.arange(0, 16)
        g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2 = _zero_partials(P1, P2, P3)
        if HALVES:  # a concat last layer by column halves (SKIP2 == 2, P3 == 2 P2): their own sums
            g_w2a = tl.zeros((P2, P2), dtype=tl.float64)
            g_w2b = tl.zeros((P2, P2), dtype=tl.float64)
            g_b2a = tl.zeros((P2,), dtype=tl.float64)
            g_b2b = tl.zeros((P2,), dtype=tl.float64)
            g_i2a = tl.zeros((P2,), dtype=tl.float64)
            g_i2b = tl.zeros((P2,), dtype=tl.float64)
        wr, br, idt0, col = _first_layer(w0, b0, i0, cols, P1, P3)
        for k in range(0, ATOMS):
            a = p * ATOMS + k
            live = a < A
            if not HALVES:
                gb = _atom_tile(gb_ptr, a, live, col, NG)[0]
            for r0 in range(0, SLOTS, BS):
                rs = c * SLOTS + r0 + tl.arange(0, BS)
                rows = live & (rs < S)
                rr = tl.load(rr_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :],
                             mask=rows[:, None] & (rc[None, :] < 4), other=0.0)
                s = tl.sum(tl.where(rc[None, :] == 0, rr, 0.0), axis=1)
                z0 = s[:, None] * wr[None, :] + br[None, :]
                if TANH0:
                    t0 = _tanh(z0, TANH_EXP)
                else:
                    t0 = z0
                x1 = t0 * idt0[None, :]
                x2, t1, wl1 = _fwd_layer(x1, w1, b1, i1, P1, P2, TANH1, SKIP1, TANH_EXP)
                if HALVES:
                    dw, db, di, x2_bar = _last_half_bwd(x2, rr, gb_ptr, a, live, cols, w2, b2, i2, 0, P2, P3,
                                                        NG, TANH2, TANH_EXP)
                    g_w2a += dw
                    g_b2a += db
                    g_i2a += di
                    dw, db, di, xb = _last_half_bwd(x2, rr, gb_ptr, a, live, cols, w2, b2, i2, 1, P2, P3,
                                                    NG, TANH2, TANH_EXP)
                    g_w2b += dw
                    g_b2b += db
                    g_i2b += di
                    x2_bar += xb
                else:
                    _, t2, wl2 = _fwd_layer(x2, w2, b2, i2, P2, P3, TANH2, SKIP2, TANH_EXP)
                    g_bar = tl.dot(rr, gb)  # [BS, P3]: d(sum gb . R~^T G)/dG, zero on rows past S
                    x2_bar, dw, db, di = _bwd_layer(g_bar, x2, t2, wl2, i2, P2, P3, TANH2, SKIP2)
                    g_w2 += dw
                    g_b2 += db
                    g_i2 += di
                x1_bar, dw, db, di = _bwd_layer(x2_bar, x1, t1, wl1, i1, P1, P2, TANH1, SKIP1)
                g_w1 += dw
                g_b1 += db
                g_i1 += di
                g_i0 += tl.sum(x1_bar * t0, axis=0)
                z0_bar = x1_bar * idt0[None, :]
                if TANH0:
                    z0_bar = z0_bar * (1.0 - t0 * t0)
                g_w0 += tl.sum(z0_bar * s[:, None], axis=0)
                g_b0 += tl.sum(z0_bar, axis=0)
        if HALVES:
            g_w2 = _halves_2d(g_w2a, g_w2b, P2, P2)
            g_b2 = _halves_1d(g_b2a, g_b2b, P2)
            g_i2 = _halves_1d(g_i2a, g_i2b, P2)
        _store_partials(part_ptr, pid, g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2, P1, P2, P3)


def _part_shapes(net: ek.PackedNet) -> list[tuple]:
    p1, p2, p3 = net.padded
    return [(p1,), (p1,), (p1,), (p1, p2), (p2,), (p2,), (p2, p3), (p3,), (p3,)]


def weight_vjp(rr: torch.Tensor, net: ek.PackedNet, gxyz: torch.Tensor, rows: int | None = None,
               warps: int | None = None, halves: bool | None = None) -> list[torch.Tensor]:
    """Gradients of sum(gxyz . R~^T G) w.r.t. w0, b0, i0, w1, b1, i1, w2, b2, i2 (padded shapes);
    rows / warps: the kernel's tile (default WEIGHT_VJP_ROWS / _WARPS, else the launch table's);
    halves: a concat last layer by column halves (default WEIGHT_VJP_HALVES)."""
    S = rr.shape[-2]
    r = rr.reshape(-1, S, 4).contiguous()
    ng = net.widths[2]
    g = gxyz.reshape(-1, 4, ng).contiguous()
    A = r.shape[0]
    meta = ek._meta(net, S, rr.device, rows or WEIGHT_VJP_ROWS, warps or WEIGHT_VJP_WARPS, kind="vjp")
    programs, slots, chunks = vjp_split(A, S, meta["BS"])
    parts = partials_buffer(net, programs, rr.device)
    if A:
        halves = (WEIGHT_VJP_HALVES if halves is None else halves) and net.skips[1] == ek.SKIP_CONCAT
        _weight_vjp_kernel[(programs,)](r, g, parts, *ek._weights(net), A, S, ng, ATOMS_PER_PROGRAM, slots, chunks,
                                        HALVES=halves, **meta)
    return reduce_partials(parts, net)


def partials_buffer(net: ek.PackedNet, programs: int, device) -> torch.Tensor:
    """One row of weight-gradient partial sums per program (vjp_split). Not zeroed: every program
    writes its whole row (_store_partials), and a memset of every row (tens of MB per call on
    water: ~1,700 programs x 84 KiB) would be the step's largest write."""
    size = sum(int(torch.Size(s).numel()) for s in _part_shapes(net))
    return torch.empty((programs, size), dtype=torch.float64, device=device)


def reduce_partials(parts: torch.Tensor, net: ek.PackedNet) -> list[torch.Tensor]:
    """The programs' partial sums added in one fixed order (torch's reduction, no atomics), split
    into the gradients of w0 b0 i0 w1 b1 i1 w2 b2 i2, each with its own storage (op outputs may
    not alias one another)."""
    shapes = _part_shapes(net)
    total = parts.sum(0)
    return [t.reshape(s).clone() for t, s in zip(total.split([int(torch.Size(s).numel()) for s in shapes]), shapes)]


def _meta_of(net: ek.PackedNet) -> list[int]:
    return [*net.widths, *net.skips, *(int(t) for t in net.tanh)]


def _net_of(tensors: tuple, meta: list[int]) -> ek.PackedNet:
    """The PackedNet of an op call: its 10 tensors (w0 b0 i0 w1 b1 i1 w2 b2 i2 cols) and meta
    (widths n1 n2 n3, skips of layers 1 and 2, tanh of layers 0 1 2)."""
    w0, b0, i0, w1, b1, i1, w2, b2, i2, cols = tensors
    return ek.PackedNet(w0=w0, b0=b0, i0=i0, w1=w1, b1=b1, i1=i1, w2=w2, b2=b2, i2=i2, cols=cols,
                        widths=tuple(meta[0:3]), padded=(w1.shape[0], w1.shape[1], w2.shape[1]),
                        skips=tuple(meta[3:5]), tanh=tuple(bool(t) for t in meta[5:8]))


# dpfast::embed_contract -- a torch op (torch.library), so torch.compile keeps it as one opaque
# call (its fake implementation gives the shape) and a CUDA graph captures its kernel launch.
@torch.library.custom_op("dpfast::embed_contract", mutates_args=())
def embed_contract_op(rr: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, i0: torch.Tensor, w1: torch.Tensor,
                      b1: torch.Tensor, i1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                      i2: torch.Tensor, cols: torch.Tensor, meta: list[int]) -> torch.Tensor:
    return ek.embed_contract(rr, _net_of((w0, b0, i0, w1, b1, i1, w2, b2, i2, cols), meta))


@embed_contract_op.register_fake
def _(rr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, meta):
    return rr.new_empty((*rr.shape[:-2], 4, meta[2]))


@torch.library.custom_op("dpfast::embed_contract_vjp", mutates_args=())
def embed_contract_vjp_op(rr: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, i0: torch.Tensor, w1: torch.Tensor,
                          b1: torch.Tensor, i1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                          i2: torch.Tensor, cols: torch.Tensor, meta: list[int], gxyz: torch.Tensor,
                          need_rr: bool) -> list[torch.Tensor]:
    """[dE/dR~, then the gradients of w0 b0 i0 w1 b1 i1 w2 b2 i2] for the cotangent gxyz of xyz;
    need_rr False (a training step, where R~ is data): an empty tensor in dE/dR~'s place, and its
    cotangent kernel -- one launch per net, half of fused-kernels' _env_cotangent_kernel time on
    an H100 (profile 20261207T211114Z-091f9e) -- not run. No autograd of its own: a second
    derivative through the op raises (once differentiable)."""
    net = _net_of((w0, b0, i0, w1, b1, i1, w2, b2, i2, cols), meta)
    gxyz = gxyz.contiguous()
    return [ek.env_cotangent(rr, net, gxyz) if need_rr else rr.new_empty(0), *weight_vjp(rr, net, gxyz)]


@embed_contract_vjp_op.register_fake
def _(rr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, meta, gxyz, need_rr):
    return ([torch.empty_like(rr) if need_rr else rr.new_empty(0)]
            + [torch.empty_like(t) for t in (w0, b0, i0, w1, b1, i1, w2, b2, i2)])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:11])
    ctx.meta = inputs[11]


def _backward(ctx, gxyz):
    saved = ctx.saved_tensors
    need_rr = bool(ctx.needs_input_grad[0])  # a training step's R~ is data: no dE/dR~ computed
    g = embed_contract_vjp_op(*saved, ctx.meta, gxyz, need_rr)
    g_rr = g[0] if need_rr else None
    g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2 = g[1:]
    # the column map and meta are constants
    return g_rr, g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2, None, None


embed_contract_op.register_autograd(_backward, setup_context=_setup_context)


def contract(rr: torch.Tensor, net: ek.PackedNet) -> torch.Tensor:
    """dpfast::embed_contract of a net packed with pack_net(differentiable=True)."""
    return embed_contract_op(rr, *ek._weights(net), _meta_of(net))


def embed_contract(rr: torch.Tensor, layers: list) -> torch.Tensor:
    """xyz = R~^T G(s) [..., 4, ng] of rows rr [..., S, 4] through upstream's three embedding
    layers, differentiable w.r.t. rr and the layers' parameters (once), via dpfast::embed_contract."""
    return contract(rr, ek.pack_net(layers, differentiable=True))
