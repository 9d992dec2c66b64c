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
to powers of two with zero weights, so padded columns stay exactly zero. Upstream's concat skip
[x, x] is a broadcast add: a concat layer's padded output is two halves of its padded input's
width, [x's layout | x's layout shifted by n_in] (``_layouts``), so adding x to each half is
exact and costs no GEMM and no shared memory for a 0/1 matrix; ``cols`` maps the last layer's
padded columns to G's own. Rows past S load as R~ = 0 and are not
stored. Upstream's own padding rows (a neighbour slot with no atom: R~ = -davg/dstd, not zero)
are ordinary rows here, as they are upstream's.

``TANH_EXP``: tanh as sign(z) (1 - e)/(1 + e), e = exp(-2|z|) -- the Triton interpreter (CPU
tests, ``TRITON_INTERPRET=1``) has no libdevice; on CUDA libdevice's tanh, as torch's. Both are
float64 to within ~1e-16 absolute per element. Their torch ops and VJP kernels are
embed_autograd.py and cotangent_autograd.py (variant fused-kernels); checked against the Inductor
path's analytic_nets (tests/engines/test_embed_kernels.py), built for sm_90 on any machine by
kernel_resources.py and timed by tools/bench_embed_kernels.py.
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
    w2: torch.Tensor  # [P2, P3]
    b2: torch.Tensor
    i2: torch.Tensor
    cols: torch.Tensor  # [P3] int32: G's column at each padded output position (-1: padding)
    widths: tuple[int, int, int]  # n1, n2, n3 (unpadded)
    padded: tuple[int, int, int]  # P1, P2, P3 (a concat layer's P_out = 2 P_in)
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


def _layouts(widths: tuple, skips: tuple, device=None) -> list[torch.Tensor]:
    """Each layer's padded output layout: the original column at every padded position (-1 for
    padding). Layer 0: identity; a concat layer: [L_in | L_in + n_in] (so its skip adds x to
    both halves); an identity-skip layer keeps L_in; a layer without skip: identity. Made on
    `device` (pack_net runs inside the captured step: no host-to-device copy may happen there)."""
    def ident(n):
        r = torch.arange(_pow2(n), device=device)
        return torch.where(r < n, r, -1)

    lays = [ident(widths[0])]
    for nin, nout, skip in zip(widths[:-1], widths[1:], skips):
        lin = lays[-1]
        if skip == SKIP_CONCAT:
            lays.append(torch.cat([lin, torch.where(lin >= 0, lin + nin, -1)]))
        elif skip == SKIP_IDENTITY:
            lays.append(lin)
        else:
            lays.append(ident(nout))
    return lays


def pack_net(layers: list, differentiable: bool = False) -> PackedNet:
    """Upstream's three MLPLayers of one embedding net, laid out for the kernels (_layouts).
    differentiable: the packed tensors are functions of the layers' parameters (torch indexing),
    so gradients that embed_autograd computes for them reach upstream's nn.Parameters; else
    detached copies."""
    why = unsupported(layers)
    if why:
        raise ValueError(f"embed_kernels: {why}")
    widths = tuple(int(l.matrix.shape[1]) for l in layers)
    l0, l1, l2 = layers
    skips = (_skip_of(l1, widths[0], widths[1]), _skip_of(l2, widths[1], widths[2]))
    dev = layers[0].matrix.device
    lays = _layouts(widths, skips, dev)
    own = (lambda t: t) if differentiable else (lambda t: t.detach())

    def at(lay, n):  # padding positions index an appended zero
        return torch.where(lay >= 0, lay, n)

    def vec(v, lay, n, fill=0.0):  # fill: a layer without this vector (no bias: 0, no idt: 1)
        if v is None:
            return torch.full((len(lay),), fill, dtype=torch.float64, device=dev)
        return torch.nn.functional.pad(own(v).reshape(-1)[:n], (0, 1))[at(lay, n)]

    def mat(w, lin, lout):
        nin, nout = w.shape
        return torch.nn.functional.pad(own(w), (0, 1, 0, 1))[at(lin, nin)][:, at(lout, nout)]

    n1, n2, n3 = widths
    L1, L2, L3 = lays
    return PackedNet(
        w0=vec(l0.matrix[0], L1, n1), b0=vec(l0.bias, L1, n1), i0=vec(l0.idt, L1, n1, 1.0),
        w1=mat(l1.matrix, L1, L2), b1=vec(l1.bias, L2, n2), i1=vec(l1.idt, L2, n2, 1.0),
        w2=mat(l2.matrix, L2, L3), b2=vec(l2.bias, L3, n3), i2=vec(l2.idt, L3, n3, 1.0),
        cols=L3.to(torch.int32),
        widths=widths, padded=tuple(len(l) for l in lays), skips=skips,
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
    def _skip(a, x, SKIP: tl.constexpr):
        """a [BS, POUT] plus the resnet skip of x [BS, PIN]: identity, or the concat [x, x] as x
        added to both halves of a concat layer's layout (_layouts)."""
        if SKIP == 1:
            a = a + x
        elif SKIP == 2:
            a = tl.reshape(tl.reshape(a, (x.shape[0], 2, x.shape[1])) + x[:, None, :], a.shape)
        return a

    @triton.jit
    def _skip_bar(x_bar, y_bar, SKIP: tl.constexpr):
        """x_bar [BS, PIN] plus the skip's share of y_bar [BS, POUT] (the transpose of _skip)."""
        if SKIP == 1:
            x_bar = x_bar + y_bar
        elif SKIP == 2:
            x_bar = x_bar + tl.sum(tl.reshape(y_bar, (x_bar.shape[0], 2, x_bar.shape[1])), axis=1)
        return x_bar

    @triton.jit
    def _atom_tile(ptr, a, live, col, NG: tl.constexpr):
        """Atom a's [16, P3] tile of an [A, 4, NG] array (gx, a cotangent of xyz) in the padded
        column layout `col` (zero on rows past 4, padding columns and a dead atom), and its mask."""
        rc = tl.arange(0, 16)
        m = live & (rc[:, None] < 4) & (col[None, :] >= 0)
        return tl.load(ptr + a * 4 * NG + rc[:, None] * NG + col[None, :], mask=m, other=0.0), m

    @triton.jit
    def _first_layer(w0, b0, i0, cols, P1: tl.constexpr, P3: tl.constexpr):
        """The first layer's weight row, bias and idt [P1], and G's column of each padded one [P3]."""
        r1 = tl.arange(0, P1)
        return tl.load(w0 + r1), tl.load(b0 + r1), tl.load(i0 + r1), tl.load(cols + tl.arange(0, P3))

    @triton.jit
    def _layer(x, t, w_ptr, b_ptr, i_ptr, PIN: tl.constexpr, POUT: tl.constexpr,
               TANH: tl.constexpr, SKIP: tl.constexpr, TANH_EXP: tl.constexpr):
        """One MLPLayer on a [BS, PIN] tile with its tangent: value and tangent through one weight
        load; skip: identity (PIN == POUT) or concat (POUT == 2 PIN)."""
        return _layer_cols(x, t, w_ptr, b_ptr, i_ptr, 0, PIN, POUT, POUT, TANH, SKIP, TANH_EXP)

    @triton.jit
    def _layer_cols(x, t, w_ptr, b_ptr, i_ptr, H: tl.constexpr, PIN: tl.constexpr, PH: tl.constexpr,
                    POUT: tl.constexpr, TANH: tl.constexpr, SKIP: tl.constexpr, TANH_EXP: tl.constexpr):
        """_layer's padded output columns [H PH, (H+1) PH) of POUT (all of them: H = 0, PH = POUT)."""
        ri = tl.arange(0, PIN)
        ro = H * PH + tl.arange(0, PH)
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
        return _skip(a * idt[None, :], x, SKIP), _skip(tz * idt[None, :], t, SKIP)

    @triton.jit
    def _hidden(s, w0, b0, i0, w1, b1, i1, P1: tl.constexpr, P2: tl.constexpr, TANH0: tl.constexpr,
                TANH1: tl.constexpr, SKIP1: tl.constexpr, TANH_EXP: tl.constexpr):
        """The first two layers' output and its tangent [BS, P2] for the rows' s [BS]: the first
        layer (input width 1) is an outer product, its tangent the weight row."""
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
        return _layer(a * idt[None, :], tz * idt[None, :], w1, b1, i1, P1, P2, TANH1, SKIP1, TANH_EXP)

    @triton.jit
    def _net(s, w0, b0, i0, w1, b1, i1, w2, b2, i2,
             P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, TANH0: tl.constexpr, TANH1: tl.constexpr,
             TANH2: tl.constexpr, SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr):
        """G(s) and dG/ds [BS, P3] for the rows' s [BS]."""
        a, tz = _hidden(s, w0, b0, i0, w1, b1, i1, P1, P2, TANH0, TANH1, SKIP1, TANH_EXP)
        return _layer(a, tz, w2, b2, i2, P2, P3, TANH2, SKIP2, TANH_EXP)

    @triton.jit
    def _embed_contract_kernel(rr_ptr, xyz_ptr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, S: tl.constexpr, NG: tl.constexpr,
                               BS: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                               TANH0: tl.constexpr, TANH1: tl.constexpr, TANH2: tl.constexpr,
                               SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr):
        a = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, 16)  # R~'s 4 columns, padded for tl.dot
        ro = tl.arange(0, P3)
        col = tl.load(cols + ro)  # G's column of each padded one (-1: padding)
        xyz = tl.zeros((16, P3), dtype=tl.float64)
        for r0 in range(0, S, BS):  # BS rows at a time, in order: the sum's order is fixed
            rs = r0 + tl.arange(0, BS)
            rows = rs < S
            rr = tl.load(rr_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :],
                         mask=rows[:, None] & (rc[None, :] < 4), other=0.0)
            s = tl.sum(tl.where(rc[None, :] == 0, rr, 0.0), axis=1)
            g, _ = _net(s, w0, b0, i0, w1, b1, i1, w2, b2, i2, P1, P2, P3, TANH0, TANH1, TANH2,
                        SKIP1, SKIP2, TANH_EXP)
            xyz += tl.dot(tl.trans(rr), g)  # [16, P3]: rows past S have R~ = 0
        tl.store(xyz_ptr + a * 4 * NG + rc[:, None] * NG + col[None, :], xyz, mask=(rc[:, None] < 4) & (col[None, :] >= 0))

    @triton.jit
    def _env_cotangent_kernel(rr_ptr, gx_ptr, out_ptr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, S: tl.constexpr, NG: tl.constexpr,
                              BS: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                              TANH0: tl.constexpr, TANH1: tl.constexpr, TANH2: tl.constexpr,
                              SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr):
        a = tl.program_id(0).to(tl.int64)
        rc = tl.arange(0, 16)
        cols4 = rc[None, :] < 4
        # the last layer in column groups: a concat layer's two halves (each is x's layout, so
        # its skip is the identity's), any other layer whole. G, dG/ds and the layer's weight whole
        # were what spilled (sm_90: 2 KiB of stack per thread at any tile rows or warps)
        NH: tl.constexpr = 1 + (SKIP2 == 2)
        PH: tl.constexpr = P3 // NH
        GSKIP: tl.constexpr = (SKIP2 != 0) * 1  # a group's skip: identity, or none
        rh = tl.arange(0, PH)
        gx0 = _atom_tile(gx_ptr, a, True, tl.load(cols + rh), NG)[0]
        if NH == 2:
            gx1 = _atom_tile(gx_ptr, a, True, tl.load(cols + PH + rh), NG)[0]
        for r0 in range(0, S, BS):
            rs = r0 + tl.arange(0, BS)
            rows = rs < S
            rr = tl.load(rr_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], mask=rows[:, None] & cols4, other=0.0)
            s = tl.sum(tl.where(rc[None, :] == 0, rr, 0.0), axis=1)
            # G gx^T [BS, 16], and R~ gx . dG/ds summed over G's columns (the s column's extra term)
            x, t = _hidden(s, w0, b0, i0, w1, b1, i1, P1, P2, TANH0, TANH1, SKIP1, TANH_EXP)
            g, dg = _layer_cols(x, t, w2, b2, i2, 0, P2, PH, P3, TANH2, GSKIP, TANH_EXP)
            g_r = tl.dot(g, tl.trans(gx0))
            gs = tl.sum(tl.dot(rr, gx0) * dg, axis=1)
            if NH == 2:
                g, dg = _layer_cols(x, t, w2, b2, i2, 1, P2, PH, P3, TANH2, GSKIP, TANH_EXP)
                g_r += tl.dot(g, tl.trans(gx1))
                gs += tl.sum(tl.dot(rr, gx1) * dg, axis=1)
            out = g_r + tl.where(rc[None, :] == 0, gs[:, None], 0.0)
            tl.store(out_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], out, mask=rows[:, None] & cols4)

def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (its own setting, TRITON_INTERPRET=1: CPU tests)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


ROWS_PER_TILE = 32  # neighbour rows per register tile (a [32, 128] float64 tile per layer)
# per kernel kind (tile rows, warps, register cap), from tools/kernel_resources.py's sm_90 builds:
# the VJP kernels keep every layer's pieces, and 32 rows need > 227 KiB of shared memory; 8 warps
# spill less than 4; without maxnreg ptxas kept the cotangent kernels at 56-64 registers and spilled
# 4-10 KiB per thread (255: 2 KiB)
LAUNCH = {"forward": (ROWS_PER_TILE, 4, None), "cotangent": (ROWS_PER_TILE, 8, 255), "vjp": (16, 8, 255)}
ROWS_INTERPRETED = 128  # in Triton's interpreter each op costs a numpy call: fewer, larger tiles


def _meta(net: PackedNet, S: int, device: torch.device, rows: int | None = None, warps: int | None = None,
          kind: str = "forward") -> dict:
    """Launch constants: tile rows (BS), padded widths, activations, skips; on a GPU one pipeline
    stage (the loops' loads are small; more stages only multiply shared-memory buffers)."""
    p1, p2, p3 = net.padded
    tile_rows, cfg = launch_config(kind, interpreted())
    rows = rows or tile_rows
    if warps:
        cfg["num_warps"] = warps
    meta = dict(BS=min(_pow2(S), rows), P1=p1, P2=p2, P3=p3, TANH0=net.tanh[0], TANH1=net.tanh[1], TANH2=net.tanh[2],
                SKIP1=net.skips[0], SKIP2=net.skips[1], TANH_EXP=interpreted() or device.type != "cuda")
    meta.update(cfg)
    return meta


def launch_config(kind: str, interpreter: bool) -> tuple[int, dict]:
    """A launch of a kernel of this kind (LAUNCH): (tile rows, Triton's launch options -- on a GPU
    num_warps, num_stages = 1 and maxnreg where set; the interpreter takes none)."""
    if interpreter:
        return ROWS_INTERPRETED, {}
    rows, warps, maxnreg = LAUNCH[kind]
    cfg = dict(num_warps=warps, num_stages=1)
    if maxnreg:
        cfg["maxnreg"] = maxnreg
    return rows, cfg


def _weights(net: PackedNet) -> tuple:
    return (net.w0, net.b0, net.i0, net.w1, net.b1, net.i1, net.w2, net.b2, net.i2, net.cols)


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
        _env_cotangent_kernel[(r.shape[0],)](r, g, out, *_weights(net), S, ng,
                                              **_meta(net, S, rr.device, rows, warps, kind="cotangent"))
    return out.reshape(*lead, S, 4)
