"""The force path's embedding kernel as a differentiable torch op (issue 39): ``dpfast::env_cotangent``
(dE/dR~ = G gx^T + (R~ gx . dG/ds) on the s column, G and dG/ds on chip: embed_kernels) with its
VJP kernel ``_cotangent_vjp_kernel``, so a force loss trains through it. The fused engine forms
forces analytically (no autograd through the energy), so training needs exactly one backward
through each op: this one and ``embed_autograd``'s ``dpfast::embed_contract``.

Given the cotangent ob of dE/dR~ [S, 4] per atom (h = its s column):
  G_bar = ob gx,  dG_bar = h (R~ gx),  gx_bar = ob^T G + (h R~)^T dG,
  R~_bar = h (dG gx^T) + s_bar on the s column,
and (G_bar, dG_bar) go backward through the net's value-and-tangent pair, layer by layer:
y = act(z) idt + skip(x), ty = act'(z) tz idt + skip(tx), z = x W + b, tz = tx W -- so the
weights' gradients carry act'' (tanh'' = -2 tanh tanh'). Weight gradients: one partial row per
ATOMS centre atoms, summed by torch in a fixed order (no atomics).
"""
from __future__ import annotations

import torch

from . import embed_kernels as ek
from . import embed_autograd
from .embed_autograd import _meta_of, _net_of, partials_buffer, reduce_partials

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from .embed_autograd import _store_partials, _zero_partials
    from .embed_kernels import _atom_tile, _first_layer, _skip, _skip_bar, _tanh

    @triton.jit
    def _act(z, TANH: tl.constexpr, TANH_EXP: tl.constexpr):
        """(act(z), act'(z), act''(z)) of tanh or the identity."""
        if TANH:
            t = _tanh(z, TANH_EXP)
            ap = 1.0 - t * t
            return t, ap, -2.0 * t * ap
        else:
            return z, tl.full(z.shape, 1.0, tl.float64), tl.zeros(z.shape, tl.float64)

    @triton.jit
    def _pair_grads(y_bar, ty_bar, t, ap, app, tz, idt):
        """Through y = t idt, ty = ap tz idt: (z_bar, tz_bar, idt_bar)."""
        i_bar = tl.sum(y_bar * t + ty_bar * ap * tz, axis=0)
        z_bar = y_bar * idt[None, :] * ap + ty_bar * idt[None, :] * tz * app
        return z_bar, ty_bar * idt[None, :] * ap, i_bar

    @triton.jit
    def _pair_fwd(x, tx, w_ptr, b_ptr, i_ptr, PIN: tl.constexpr, POUT: tl.constexpr,
                  TANH: tl.constexpr, SKIP: tl.constexpr, TANH_EXP: tl.constexpr):
        ri = tl.arange(0, PIN)
        ro = tl.arange(0, POUT)
        w = tl.load(w_ptr + ri[:, None] * POUT + ro[None, :])
        z = tl.dot(x, w) + tl.load(b_ptr + ro)[None, :]
        tz = tl.dot(tx, w)
        t, ap, app = _act(z, TANH, TANH_EXP)
        idt = tl.load(i_ptr + ro)
        y = _skip(t * idt[None, :], x, SKIP)
        ty = _skip(ap * tz * idt[None, :], tx, SKIP)
        return y, ty, t, ap, app, tz, w  # w: reused by _pair_bwd (one shared-memory copy)

    @triton.jit
    def _pair_bwd(y_bar, ty_bar, x, tx, t, ap, app, tz, w, i_ptr, PIN: tl.constexpr, POUT: tl.constexpr,
                  SKIP: tl.constexpr):
        ro = tl.arange(0, POUT)
        z_bar, tz_bar, i_bar = _pair_grads(y_bar, ty_bar, t, ap, app, tz, tl.load(i_ptr + ro))
        w_bar = tl.dot(tl.trans(x), z_bar) + tl.dot(tl.trans(tx), tz_bar)
        b_bar = tl.sum(z_bar, axis=0)
        wt = tl.trans(w)
        x_bar = _skip_bar(tl.dot(z_bar, wt), y_bar, SKIP)
        tx_bar = _skip_bar(tl.dot(tz_bar, wt), ty_bar, SKIP)
        return x_bar, tx_bar, w_bar, b_bar, i_bar

    @triton.jit
    def _cotangent_vjp_kernel(rr_ptr, gx_ptr, ob_ptr, rrb_ptr, gxb_ptr, part_ptr,
                              w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, A,
                              S: tl.constexpr, NG: tl.constexpr, ATOMS: tl.constexpr, SLOTS: tl.constexpr,
                              NC: tl.constexpr, BS: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr,
                              TANH0: tl.constexpr, TANH1: tl.constexpr, TANH2: tl.constexpr,
                              SKIP1: tl.constexpr, SKIP2: tl.constexpr, TANH_EXP: tl.constexpr,
                              NEED_RR: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        p = pid // NC  # atom group
        c = pid % NC  # slot chunk (embed_autograd.vjp_split)
        rc = tl.arange(0, 16)
        g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2 = _zero_partials(P1, P2, P3)
        wr, br, idt0, col = _first_layer(w0, b0, i0, cols, P1, P3)
        for k in range(0, ATOMS):
            a = p * ATOMS + k
            live = a < A
            gx, gmask = _atom_tile(gx_ptr, a, live, col, NG)
            gxb = tl.zeros((16, P3), dtype=tl.float64)
            for r0 in range(0, SLOTS, BS):
                rs = c * SLOTS + r0 + tl.arange(0, BS)
                m = (live & (rs < S))[:, None] & (rc[None, :] < 4)
                rr = tl.load(rr_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], mask=m, other=0.0)
                ob = tl.load(ob_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], mask=m, other=0.0)
                s = tl.sum(tl.where(rc[None, :] == 0, rr, 0.0), axis=1)
                h = tl.sum(tl.where(rc[None, :] == 0, ob, 0.0), axis=1)
                # forward, value and tangent, every layer's pieces kept
                z0 = s[:, None] * wr[None, :] + br[None, :]
                tz0 = tl.zeros_like(z0) + wr[None, :]
                t0, ap0, app0 = _act(z0, TANH0, TANH_EXP)
                y0 = t0 * idt0[None, :]
                ty0 = ap0 * tz0 * idt0[None, :]
                y1, ty1, t1, ap1, app1, tz1, wl1 = _pair_fwd(y0, ty0, w1, b1, i1, P1, P2, TANH1, SKIP1, TANH_EXP)
                G, dG, t2, ap2, app2, tz2, wl2 = _pair_fwd(y1, ty1, w2, b2, i2, P2, P3, TANH2, SKIP2, TANH_EXP)
                # the product's own cotangents
                rg = tl.dot(rr, gx)  # [BS, P3]
                G_bar = tl.dot(ob, gx)
                dG_bar = h[:, None] * rg
                gxb += tl.dot(tl.trans(ob), G) + tl.dot(tl.trans(rr * h[:, None]), dG)
                if NEED_RR:  # R~'s own gradient (here, while dG is live: later it spills ~10 KB a thread)
                    rr_bar = h[:, None] * tl.dot(dG, tl.trans(gx))  # [BS, 16]
                # backward through the net's (value, tangent) pair
                y1_bar, ty1_bar, dw, db, di = _pair_bwd(G_bar, dG_bar, y1, ty1, t2, ap2, app2, tz2, wl2, i2, P2, P3, SKIP2)
                g_w2 += dw
                g_b2 += db
                g_i2 += di
                y0_bar, ty0_bar, dw, db, di = _pair_bwd(y1_bar, ty1_bar, y0, ty0, t1, ap1, app1, tz1, wl1, i1, P1, P2, SKIP1)
                g_w1 += dw
                g_b1 += db
                g_i1 += di
                z0_bar, tz0_bar, di = _pair_grads(y0_bar, ty0_bar, t0, ap0, app0, tz0, idt0)
                g_i0 += di
                g_w0 += tl.sum(z0_bar * s[:, None] + tz0_bar, axis=0)  # z0 = s w0 + b0, tz0 = w0
                g_b0 += tl.sum(z0_bar, axis=0)
                if NEED_RR:  # a training step's R~ is data: NEED_RR off skips its gradient
                    s_bar = tl.sum(z0_bar * wr[None, :], axis=1)
                    rr_bar += tl.where(rc[None, :] == 0, s_bar[:, None], 0.0)
                    tl.store(rrb_ptr + a * S * 4 + rs[:, None] * 4 + rc[None, :], rr_bar, mask=m)
            # this chunk's share of gx_bar: row (a, c) of [A, NC, 4, NG], summed over chunks by torch
            tl.store(gxb_ptr + (a * NC + c) * 4 * NG + rc[:, None] * NG + col[None, :], gxb, mask=gmask)
        _store_partials(part_ptr, pid, g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2, P1, P2, P3)


def cotangent_vjp(rr: torch.Tensor, net: ek.PackedNet, gx: torch.Tensor, ob: torch.Tensor,
                  need_rr: bool = True) -> list[torch.Tensor]:
    """[R~_bar, gx_bar, then the gradients of w0 b0 i0 w1 b1 i1 w2 b2 i2] of sum(ob . dE/dR~);
    need_rr False: R~_bar is not computed (an empty tensor in its place; training, where R~ is data)."""
    S = rr.shape[-2]
    ng = net.widths[2]
    r = rr.reshape(-1, S, 4).contiguous()
    g = gx.reshape(-1, 4, ng).contiguous()
    o = ob.reshape(-1, S, 4).contiguous()
    A = r.shape[0]
    meta = ek._meta(net, S, rr.device, kind="vjp")
    programs, slots, chunks = embed_autograd.vjp_split(A, S, meta["BS"])
    parts = partials_buffer(net, programs, rr.device)
    rrb = torch.zeros_like(r) if need_rr else r.new_empty(0)
    gxb = torch.zeros((A, chunks, 4, ng), dtype=g.dtype, device=g.device)
    if A:
        _cotangent_vjp_kernel[(programs,)](r, g, o, rrb, gxb, parts, *ek._weights(net), A, S, ng,
                                           embed_autograd.ATOMS_PER_PROGRAM, slots, chunks, **meta, NEED_RR=need_rr)
    gxb = gxb.sum(1) if chunks > 1 else gxb  # one chunk (the default): no extra reduction in the step
    return [rrb.reshape(rr.shape) if need_rr else rrb, gxb.reshape(gx.shape), *reduce_partials(parts, net)]


@torch.library.custom_op("dpfast::env_cotangent", mutates_args=())
def env_cotangent_op(rr: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, i0: torch.Tensor, w1: torch.Tensor,
                     b1: torch.Tensor, i1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     i2: torch.Tensor, cols: torch.Tensor, meta: list[int], gx: torch.Tensor) -> torch.Tensor:
    return ek.env_cotangent(rr, _net_of((w0, b0, i0, w1, b1, i1, w2, b2, i2, cols), meta), gx.contiguous())


@env_cotangent_op.register_fake
def _(rr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, meta, gx):
    return torch.empty_like(rr)


@torch.library.custom_op("dpfast::env_cotangent_vjp", mutates_args=())
def env_cotangent_vjp_op(rr: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, i0: torch.Tensor, w1: torch.Tensor,
                         b1: torch.Tensor, i1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                         i2: torch.Tensor, cols: torch.Tensor, meta: list[int], gx: torch.Tensor,
                         ob: torch.Tensor, need_rr: bool) -> list[torch.Tensor]:
    return cotangent_vjp(rr, _net_of((w0, b0, i0, w1, b1, i1, w2, b2, i2, cols), meta), gx, ob, need_rr)


@env_cotangent_vjp_op.register_fake
def _(rr, w0, b0, i0, w1, b1, i1, w2, b2, i2, cols, meta, gx, ob, need_rr):
    return [torch.empty_like(rr) if need_rr else rr.new_empty(0), torch.empty_like(gx)] + [torch.empty_like(t) for t in (w0, b0, i0, w1, b1, i1, w2, b2, i2)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:11], inputs[12])
    ctx.meta = inputs[11]


def _backward(ctx, ob):
    *saved, gx = ctx.saved_tensors
    need_rr = bool(ctx.needs_input_grad[0])  # a training step's R~ is data: no R~_bar computed
    g = env_cotangent_vjp_op(*saved, ctx.meta, gx, ob.contiguous(), need_rr)
    rr_bar, gx_bar, g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2 = g
    rr_bar = rr_bar if need_rr else None
    return rr_bar, g_w0, g_b0, g_i0, g_w1, g_b1, g_i1, g_w2, g_b2, g_i2, None, None, gx_bar


env_cotangent_op.register_autograd(_backward, setup_context=_setup_context)


def cotangent(rr: torch.Tensor, net: ek.PackedNet, gx: torch.Tensor) -> torch.Tensor:
    """dpfast::env_cotangent of a net packed with pack_net(differentiable=True)."""
    return env_cotangent_op(rr, *ek._weights(net), _meta_of(net), gx)


def env_cotangent(rr: torch.Tensor, layers: list, gx: torch.Tensor) -> torch.Tensor:
    """dE/dR~ [..., S, 4] of rows rr through upstream's three embedding layers from gx = dE/dxyz
    [..., 4, ng], differentiable (once) w.r.t. rr, gx and the layers' parameters."""
    return cotangent(rr, ek.pack_net(layers, differentiable=True), gx)
