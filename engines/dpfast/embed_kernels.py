"""Hand-written Triton kernels for se_e2_a's embedding net (issue 39, first slice): the net's
value G(s) and tangent dG/ds are evaluated on chip, per centre atom, and never written to memory.

* ``embed_contract(rr, net)``: xyz = R~^T G(s) per atom [A, 4, ng] from its neighbour rows R~
  [A, S, 4] (s = R~'s first column): the descriptor's contraction with the embedding net inside
  (upstream's ``tabulate_fusion_se_a`` pattern, for a net that trains instead of a table).
* ``env_cotangent(rr, net, gx)``: dE/dR~ [A, S, 4] from gx = dE/dxyz [A, 4, ng], G and dG/ds
  recomputed on chip (the product ``analytic_nets.env_cotangent`` forms from G, dG in memory).

One program per centre atom: its S neighbour rows (padded to a power of two) go through the
1 -> n1 -> n2 -> n3 layers as [S, n] register tiles (tl.dot for the n1 x n2 and n2 x n3 GEMMs,
value and tangent), then one tl.dot contracts them with the atom's R~ (or gx). Widths are padded
to powers of two with zero weights, so padded columns stay exactly zero; upstream's concat skip
[x, x] is a dot with a 0/1 duplication matrix (exact). Rows past S load as R~ = 0 and are not
stored. Upstream's own padding rows (a neighbour slot with no atom: R~ = -davg/dstd, not zero)
are ordinary rows here, as they are upstream's.

``TANH_EXP``: tanh as sign(z) (1 - e)/(1 + e), e = exp(-2|z|) -- the Triton interpreter (CPU
tests, ``TRITON_INTERPRET=1``) has no libdevice; on CUDA libdevice's tanh, as torch's. Both are
float64 to within ~1e-16 absolute per element. Not wired into a variant yet: the backward to the
weights (kernel 2) comes next; until then these are checked against the Inductor path's
analytic_nets (tests/engines/test_embed_kernels.py) and timed by tools/bench_embed_kernels.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU CI machine's dev pins carry Triton; a bare runtime may not
    triton = None

if triton is not None:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older Triton
        libdevice = None

SKIP_NONE, SKIP_IDENTITY, SKIP_CONCAT = 0, 1, 2


def available() -> bool:
    return triton is not None


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


@dataclass(frozen=True)
class PackedNet:
    """One 3-layer embedding net (1 -> n1 -> n2 -> n3) with widths padded to powers of two."""

    w0: torch.Tensor  # [P1] the first layer's single input row
    b0: torch.Tensor  # [P1]
    i0: torch.Tensor  # [P1] idt (ones when the layer has none)
    w1: torch.Tensor  # [P1, P2]
    b1: torch.Tensor
    i1: torch.Tensor
    d1: torch.Tensor  # [P1, P2] duplication matrix of the concat skip (zeros when none)
    w2: torch.Tensor  # [P2, P3]
    b2: torch.Tensor
    i2: torch.Tensor
    d2: torch.Tensor  # [P2, P3]
    widths: tuple[int, int, int]  # n1, n2, n3 (unpadded)
    padded: tuple[int, int, int]
    skips: tuple[int, int]  # of layers 1 and 2: SKIP_NONE / SKIP_IDENTITY / SKIP_CONCAT
    tanh: tuple[bool, bool, bool]


def _skip_of(layer, nin: int, nout: int) -> int:
    if not getattr(layer, "resnet", False):
        return SKIP_NONE
    if nin == nout:
        return SKIP_IDENTITY
    if 2 * nin == nout:
        return SKIP_CONCAT
    return SKIP_NONE


def unsupported(layers: list) -> str | None:
    """Why these upstream MLPLayers are not a net the kernels evaluate (None: they are)."""
    if len(layers) != 3:
        return f"{len(layers)} embedding layers (the kernels take 3)"
    if layers[0].matrix.shape[0] != 1:
        return "embedding input width != 1"
    for layer in layers:
        if layer.matrix.dtype != torch.float64:
            return f"embedding precision {layer.matrix.dtype} (the kernels are float64)"
        if (layer.activate_name or "none").lower() not in ("tanh", "none", "linear"):
            return f"activation {layer.activate_name}"
    return None


def pack_net(layers: list, differentiable: bool = False) -> PackedNet:
    """Upstream's three MLPLayers of one embedding net, padded for the kernels. differentiable:
    the padded tensors are functions of the layers' parameters (torch's pad), so gradients that
    embed_autograd computes for them reach upstream's nn.Parameters; else detached copies."""
    why = unsupported(layers)
    if why:
        raise ValueError(f"embed_kernels: {why}")
    widths = tuple(int(l.matrix.shape[1]) for l in layers)
    padded = tuple(_pow2(n) for n in widths)
    dev = layers[0].matrix.device
    f64 = dict(dtype=torch.float64, device=dev)
    own = (lambda t: t) if differentiable else (lambda t: t.detach())

    def vec(v, n, p, fill=0.0):  # fill: a layer without this vector (no bias: 0, no idt: 1)
        if v is None:
            return torch.full((p,), fill, **f64)
        return torch.nn.functional.pad(own(v).reshape(-1)[:n], (0, p - n))

    def mat(w, pin, pout):
        return torch.nn.functional.pad(own(w), (0, pout - w.shape[1], 0, pin - w.shape[0]))

    def dup(nin, nout, pin, pout, skip):
        d = torch.zeros((pin, pout), **f64)
        if skip == SKIP_CONCAT:
            j = torch.arange(nout, device=dev)
            d[j % nin, j] = 1.0
        return d

    l0, l1, l2 = layers
    n1, n2, n3 = widths
    p1, p2, p3 = padded
    s1, s2 = _skip_of(l1, n1, n2), _skip_of(l2, n2, n3)
    return PackedNet(
        w0=vec(l0.matrix[0], n1, p1), b0=vec(l0.bias, n1, p1), i0=vec(l0.idt, n1, p1, 1.0),
        w1=mat(l1.matrix, p1, p2), b1=vec(l1.bias, n2, p2), i1=vec(l1.idt, n2, p2, 1.0),
        d1=dup(n1, n2, p1, p2, s1),
        w2=mat(l2.matrix, p2, p3), b2=vec(l2.bias, n3, p3), i2=vec(l2.idt, n3, p3, 1.0),
        d2=dup(n2, n3, p2, p3, s2),
        widths=widths, padded=padded, skips=(s1, s2),
        tanh=tuple((l.activate_name or "none").lower() == "tanh" for l in layers),
    )


if triton is not None:

    @triton.jit
    def _tanh(z, TANH_EXP: tl.constexpr):
        if TANH_EXP:
            e = tl.exp(-2.0 * tl.abs(z))
            t = (1.0 - e) / (1.0 + e)
            return tl.where(z < 0, -t, t)
        else:
            return libdevice.tanh(z)

    @triton.jit
    def _layer(x, t, w_ptr, b_ptr, i_ptr, d_ptr, PIN: tl.constexpr, POUT: tl.constexpr,
               TANH: tl.constexpr, SKIP: tl.constexpr, TANH_EXP: tl.constexpr):
        """One MLPLayer on a [BS, PIN] tile with its tangent: value and tangent through one weight
        load; skip: identity (PIN == POUT) or concat [x, x] via the 0/1 matrix d."""
        ri = tl.arange(0, PIN)
        ro = tl.arange(0, POUT)
        w = tl.load(w_ptr + ri[:, None] * POUT + ro[None, :])
        b = tl.load(b_ptr + ro)
        idt = tl.load(i_ptr + ro)
        z = tl.dot(x, w) + b[None, :]
        tz = tl.dot(t, w)
        if TANH:
            a = _tanh(z, TANH_EXP)
            tz = tz * (1.0 - a * a)
        else:
            a = z
        a = a * idt[None, :]
        tz = tz * idt[None, :]
        if SKIP == 1:
            a = a + x
            tz = tz + t
        elif SKIP == 2:
            d = tl.load(d_ptr + ri[:, None] * POUT + ro[None, :])
            a = a + tl.dot(x, d)
            tz = tz + tl.dot(t, d)
        return a, tz

    @triton.jit
    def _net(s, w0, b0, i0, w1, b1, i1, d1, w2, b2, i2, d2,
             P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, TANH0: tl.constexpr, TANH1: tl.constexpr,
             TANH2: tl.constexpr, SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr):
        """G(s) and dG/ds [BS, P3] for the rows' s [BS]: the first layer (input width 1) is an
        outer product, its tangent the weight row."""
        r1 = tl.arange(0, P1)
        wr = tl.load(w0 + r1)
        z = s[:, None] * wr[None, :] + tl.load(b0 + r1)[None, :]
        tz = tl.zeros_like(z) + wr[None, :]
        if TANH0:
            a = _tanh(z, TANH_EXP)
            tz = tz * (1.0 - a * a)
        else:
            a = z
        idt = tl.load(i0 + r1)
        a = a * idt[None, :]
        tz = tz * idt[None, :]
        a, tz = _layer(a, tz, w1, b1, i1, d1, P1, P2, TANH1, SKIP1, TANH_EXP)
        a, tz = _layer(a, tz, w2, b2, i2, d2, P2, P3, TANH2, SKIP2, TANH_EXP)
        return a, tz

    @triton.jit
    def _embed_contract_kernel(rr_ptr, xyz_ptr, w0, b0, i0, w1, b1, i1, d1, w2, b2, i2, d2, S: tl.constexpr, NG: tl.constexpr,
                               BS: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                               TANH0: tl.constexpr, TANH1: tl.constexpr, TANH2: tl.constexpr,
                               SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr):
        a = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, 16)  # R~'s 4 columns, padded for tl.dot
        ro = tl.arange(0, P3)
        xyz = tl.zeros((16, P3), dtype=tl.float64)
        for r0 in range(0, S, BS):  # BS rows at a time, in order: the sum's order is fixed
            rs = r0 + tl.arange(0, BS)
            rows = rs < S
            rr = tl.load(rr_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :],
                         mask=rows[:, None] & (rc[None, :] < 4), other=0.0)
            s = tl.sum(tl.where(rc[None, :] == 0, rr, 0.0), axis=1)
            g, _ = _net(s, w0, b0, i0, w1, b1, i1, d1, w2, b2, i2, d2, P1, P2, P3, TANH0, TANH1, TANH2,
                        SKIP1, SKIP2, TANH_EXP)
            xyz += tl.dot(tl.trans(rr), g)  # [16, P3]: rows past S have R~ = 0
        tl.store(xyz_ptr + a * 4 * NG + rc[:, None] * NG + ro[None, :], xyz, mask=(rc[:, None] < 4) & (ro[None, :] < NG))

    @triton.jit
    def _env_cotangent_kernel(rr_ptr, gx_ptr, out_ptr, w0, b0, i0, w1, b1, i1, d1, w2, b2, i2, d2, S: tl.constexpr, NG: tl.constexpr,
                              BS: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                              TANH0: tl.constexpr, TANH1: tl.constexpr, TANH2: tl.constexpr,
                              SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr):
        a = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, 16)
        ro = tl.arange(0, P3)
        cols4 = rc[None, :] < 4
        gx = tl.load(gx_ptr + a * 4 * NG + rc[:, None] * NG + ro[None, :], mask=(rc[:, None] < 4) & (ro[None, :] < NG),
                     other=0.0)
        for r0 in range(0, S, BS):
            rs = r0 + tl.arange(0, BS)
            rows = rs < S
            rr = tl.load(rr_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], mask=rows[:, None] & cols4, other=0.0)
            s = tl.sum(tl.where(rc[None, :] == 0, rr, 0.0), axis=1)
            g, dg = _net(s, w0, b0, i0, w1, b1, i1, d1, w2, b2, i2, d2, P1, P2, P3, TANH0, TANH1, TANH2,
                         SKIP1, SKIP2, TANH_EXP)
            g_r = tl.dot(g, tl.trans(gx))  # [BS, 16]: G gx^T
            g_g = tl.dot(rr, gx)  # [BS, P3]: R~ gx
            gs = tl.sum(g_g * dg, axis=1)  # the s column's extra term, through dG/ds
            out = g_r + tl.where(rc[None, :] == 0, gs[:, None], 0.0)
            tl.store(out_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], out, mask=rows[:, None] & cols4)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (its own setting, TRITON_INTERPRET=1: CPU tests)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


ROWS_PER_TILE = 32  # neighbour rows per register tile (a [32, 128] float64 tile per layer)
ROWS_INTERPRETED = 128  # in Triton's interpreter each op costs a numpy call: fewer, larger tiles


def _meta(net: PackedNet, S: int, device: torch.device, rows: int | None = None, warps: int | None = None) -> dict:
    p1, p2, p3 = net.padded
    meta = dict(BS=min(_pow2(S), rows or (ROWS_INTERPRETED if interpreted() else ROWS_PER_TILE)), P1=p1, P2=p2, P3=p3, TANH0=net.tanh[0], TANH1=net.tanh[1], TANH2=net.tanh[2],
                SKIP1=net.skips[0], SKIP2=net.skips[1], TANH_EXP=interpreted() or device.type != "cuda")
    if warps:
        meta["num_warps"] = warps
    return meta


def _weights(net: PackedNet) -> tuple:
    return (net.w0, net.b0, net.i0, net.w1, net.b1, net.i1, net.d1, net.w2, net.b2, net.i2, net.d2)


def embed_contract(rr: torch.Tensor, net: PackedNet, rows: int | None = None, warps: int | None = None) -> torch.Tensor:
    """xyz = R~^T G(s) [..., 4, ng] of neighbour rows rr [..., S, 4] (float64) through `net`."""
    if triton is None:
        raise RuntimeError("embed_kernels: Triton is not installed")
    lead, S = rr.shape[:-2], rr.shape[-2]
    r = rr.reshape(-1, S, 4).contiguous()
    ng = net.widths[2]
    out = torch.empty((r.shape[0], 4, ng), dtype=torch.float64, device=rr.device)
    if r.shape[0]:
        _embed_contract_kernel[(r.shape[0],)](r, out, *_weights(net), S, ng, **_meta(net, S, rr.device, rows, warps))
    return out.reshape(*lead, 4, ng)


def env_cotangent(rr: torch.Tensor, net: PackedNet, gx: torch.Tensor, rows: int | None = None,
                  warps: int | None = None) -> torch.Tensor:
    """dE/dR~ [..., S, 4] of rows rr [..., S, 4] from gx = dE/dxyz [..., 4, ng] (float64)."""
    if triton is None:
        raise RuntimeError("embed_kernels: Triton is not installed")
    lead, S = rr.shape[:-2], rr.shape[-2]
    r = rr.reshape(-1, S, 4).contiguous()
    ng = net.widths[2]
    g = gx.reshape(-1, 4, ng).contiguous()
    out = torch.empty_like(r)
    if r.shape[0]:
        _env_cotangent_kernel[(r.shape[0],)](r, g, out, *_weights(net), S, ng, **_meta(net, S, rr.device, rows, warps))
    return out.reshape(*lead, S, 4)
