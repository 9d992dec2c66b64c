"""upstream's MLPs (its ``MLPLayer`` stacks: matmul, bias, tanh or linear, idt time step,
identity / concat resnet skips) written out by hand with their derivatives, for the fused engine's
analytic forces:

* forward with the tanh outputs saved, and the hand-written VJP (reverse over layers) that
  needs them, for one net or for K equally shaped nets with stacked weights;
* the embedding net's value G(s) together with its forward-mode tangent dG/ds (input width 1:
  one tangent vector per neighbour), sharing one GEMM per layer;
* grouped evaluation of several blocks' nets at once: rows of all blocks concatenated in chunks
  (``chunk_plan``), each chunk inside one block, so every layer is ONE batched GEMM by per-chunk
  stacked weights; likewise the descriptor contractions R~^T G, G gxyz^T, R~ gxyz of all blocks
  in one bmm each over sub-atoms (``embed_contract_grouped`` / ``env_grad_grouped``).

All functions are ordinary differentiable tensor ops on upstream's own nn.Parameters, so the
training loss needs one ordinary backward through them (and Inductor can fuse them). Callers
look them up through this module (``analytic_nets.fn``), so tests can swap one in one place.
"""
from __future__ import annotations

import math

import torch

from harness.core.tf32_bits import round_to_tf32

from . import options
from .support import refuse

# DPH_FUSED_CONTRACT_F64, DPH_FUSED_SPLIT_TF32 (read once, as the training child's environment set them)
_OPTIONS = options.current()
CONTRACT_F64 = _OPTIONS.contract_f64
SPLIT_TF32 = _OPTIONS.split_tf32
SPLIT_TF32_KERNEL = _OPTIONS.split_tf32_kernel


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = hi + lo exactly, hi = x rounded to TF32 (10 explicit mantissa bits, nearest even; a
    tensor core takes it unchanged) and lo the float32 remainder, |lo| <= 2^-11 |x|. Finite x."""
    hi = round_to_tf32(x)
    return hi, x - hi


def _mm3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b from three TF32 products (CUTLASS's "3xTF32"), hi.hi + hi.lo + lo.hi (lo.lo, ~2^-22
    relative, dropped), as ONE GEMM over a tripled inner dimension: [hi | hi | lo] @ [hi; lo; hi].
    On a tensor core that is TF32 inputs with float32 accumulation, so the sum carries ~float32's
    accuracy at TF32's rate; one GEMM rather than three writes the (rows x out) result once -- the
    nets' GEMMs are skinny (inner 25-100, rows ~10^5), where the output's bytes are the cost."""
    ah, al = tf32_split(a)
    bh, bl = tf32_split(b)
    return torch.matmul(torch.cat([ah, ah, al], -1), torch.cat([bh, bl, bh], -2))


class _Split3(torch.autograd.Function):
    """matmul(a, b) of float32 operands as _mm3, and its backward's two products as _mm3 too (so
    the training gradient is not rounded to TF32 either). First derivatives only: the engine's
    forces are the hand-written VJP (forward ops), so the loss needs one backward; the autograd
    forces option (a second derivative) is refused with it (options.EngineOptions)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _mm3(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = _mm3(g, b.transpose(-1, -2)).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        gb = _mm3(a.transpose(-1, -2), g).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul(a, b) for a net's layer (the embedding and fitting nets' GEMMs, their
    hand-written VJPs): with SPLIT_TF32 a float32 product is three TF32 products (_Split3)."""
    if SPLIT_TF32 and a.dtype == torch.float32 and a.dim() >= 2 and b.dim() >= 2:
        if SPLIT_TF32_KERNEL and _kernel_takes(a, b):
            return torch.ops.dpfast.tf32x3_mm(a, b)
        return _Split3.apply(a, b)
    return torch.matmul(a, b)


def _kernel_takes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the Triton 3xTF32 kernel (tf32x3_gemm) runs this product: on CUDA, or on a CPU in
    Triton's interpreter (tests), for a batch layout it takes; else _Split3's torch ops do."""
    from . import tf32x3_gemm as k

    if not k.supports(a, b):
        return False
    return a.is_cuda or (a.device.type == "cpu" and k.INTERPRETED)


def contract(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul(a, b) for one of the descriptor's contractions (R~^T G, D = xyz^T xyz<, their
    VJPs, dE/dR~ through its Jacobian): with CONTRACT_F64 a float32 product is computed in float64
    and rounded back once, so no TF32 (nor its CPU emulation) touches it -- these sums over a
    centre atom's neighbours are where TF32's 10-bit inputs cost the virial most; with SPLIT_TF32
    it is three TF32 products, as the nets' (gemm)."""
    if CONTRACT_F64 and a.dtype == torch.float32:
        return torch.matmul(a.double(), b.double()).to(a.dtype)
    return gemm(a, b)

_ACTS = {"tanh", "none", "linear"}


def mlp_layers(net) -> list:
    """The layers of one of upstream's nets, refused unless every one is an MLPLayer with an
    activation written out here (tanh / linear)."""
    out = []
    for layer in net.layers:
        if type(layer).__name__ != "MLPLayer":
            refuse(f"network layer {type(layer).__name__}", "fused")
        act = (layer.activate_name or "none").lower()
        if act not in _ACTS:
            refuse(f"activation {act} (fused supports tanh/linear)", "fused")
        out.append(layer)
    return out


def _is_tanh(layer) -> bool:
    return (layer.activate_name or "none").lower() == "tanh"


def _skip(layer, nin: int, nout: int) -> int:
    """0: no skip, 1: identity, 2: concat [x, x]."""
    if not layer.resnet:
        return 0
    if nin == nout:
        return 1
    if 2 * nin == nout:
        return 2
    return 0


def as_stack(layers: list) -> list:
    """One net's layers in stack_layers' form ((W, b, idt, layer) per layer), so the stacked
    forward / VJP below serve a single net too."""
    return [(l.matrix, l.bias, l.idt, l) for l in layers]


def mlp_forward_saved(x: torch.Tensor, layers: list) -> tuple[torch.Tensor, list]:
    """Forward of an upstream MLP; returns output and per-layer tanh outputs (or None)."""
    return mlp_forward_saved_stacked(x, as_stack(layers))


def mlp_vjp(gy: torch.Tensor, layers: list, saved: list) -> torch.Tensor:
    """d(sum gy . MLP(x))/dx by hand (reverse over layers), differentiable."""
    return mlp_vjp_stacked(gy, as_stack(layers), saved)


def layer_with_tangent(x, t, W, first_row, nin: int, bias, idt, tanh: bool, skip: int):
    """One upstream MLPLayer forward (matmul, bias, tanh, idt, identity/concat skip) together with
    its forward-mode tangent t = dx/ds. t None means ones: a width-1 first layer is then an
    elementwise product with `first_row` (W's single input row, shaped to broadcast like W)."""
    if t is None and nin == 1:
        z = x * first_row
        tz = first_row.expand_as(z)
    else:
        if t is None:
            t = torch.ones_like(x)
        zz = gemm(torch.stack([x, t]), W)  # value and tangent share one GEMM
        z, tz = zz[0], zz[1]
    if bias is not None:
        z = z + bias
    if tanh:
        a = torch.tanh(z)
        ty = tz * (1.0 - a * a)
    else:
        a, ty = z, tz
    if idt is not None:
        a = a * idt
        ty = ty * idt
    tt = torch.ones_like(x) if t is None else t
    if skip == 1:
        a = a + x
        ty = ty + tt
    elif skip == 2:
        a = a + torch.cat([x, x], dim=-1)
        ty = ty + torch.cat([tt, tt], dim=-1)
    return a, ty


def embed_with_tangent(s: torch.Tensor, layers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """G(s) and dG/ds for s (..., 1): forward-mode through the embedding MLP."""
    x = s.to(layers[0].prec)
    t = None  # tangent dx/ds; None == ones (..., 1)
    for layer in layers:
        nin, nout = layer.matrix.shape
        x, t = layer_with_tangent(x, t, layer.matrix, layer.matrix[0], nin, layer.bias, layer.idt,
                                  _is_tanh(layer), _skip(layer, nin, nout))
    return x, t


# ------------------------------------------------------------------ grouped (chunked) nets
# Row counts per chunk tried, largest first, when the rows of the blocks have no large common
# divisor (embedding: (frame, atom, neighbour) rows of a type block; fitting: atoms of a type).
EMB_CHUNKS = (4096, 2048, 1024, 512, 256)
FIT_CHUNKS = (256, 128, 64, 32, 16, 8)
MAX_PAD = 0.125  # at most this fraction of extra (padding) rows


def chunk_plan(rows: list[int], sizes: tuple = EMB_CHUNKS, max_pad: float = MAX_PAD,
               weight_rows: float = 0.0, align: int = 1) -> tuple[int, list[int]]:
    """Chunk size R and every block's row count padded to a multiple of R, so that the blocks,
    concatenated, are [nchunk, R] with each chunk inside one block (one net). Pure Python on
    static shapes.

    weight_rows 0 (embedding: rows are (frame, atom, neighbour), tens of thousands; a weight is
    worth ~30 rows): R = the gcd of the row counts when it is >= the smallest size (no padding);
    else the largest size whose padding adds at most max_pad of the rows; else the smallest size.

    weight_rows > 0 (fitting: rows are atoms, ~100; a weight [1600, 240] is worth ~200 rows):
    every chunk carries its own copy of the stacked weights (read by each GEMM, and its gradient
    written), so R minimises padded rows + nchunk * weight_rows over the gcd, the sizes and the
    largest block (= pad every type to the most numerous one). Al-Cu-Mg's 64/22/22 atoms: chunks
    of 8 rows would stack 14 copies of every fitting weight (~46 MB for the first layer); this
    gives 3 chunks of 64 rows.

    align > 1 (grouped contractions: rows come in sub-atoms of align consecutive neighbours of
    one atom, and every row count is a multiple of align): every candidate size is rounded up to
    a multiple of align (the gcd already is one), so that every chunk, hence every block's padded
    row count, is a whole number of sub-atoms."""
    rows = [int(n) for n in rows]
    align = max(1, int(align))
    g = 0
    for n in rows:
        g = math.gcd(g, n)
    sizes = tuple(dict.fromkeys(-(-int(c) // align) * align for c in sizes))

    def pad(R: int) -> list[int]:
        return [-(-n // R) * R for n in rows]

    if weight_rows > 0:
        cands = sorted({-(-c // align) * align for c in (g, max(rows), *sizes) if c >= 1}, reverse=True)
        cost = {R: sum(pad(R)) + sum(pad(R)) // R * weight_rows for R in cands}
        R = min(cands, key=lambda c: (cost[c], -c))
        return R, pad(R)
    if g >= sizes[-1]:
        return g, list(rows)
    total = sum(rows)
    for R in sizes:
        padded = pad(R)
        if sum(padded) - total <= max_pad * total:
            return R, padded
    return sizes[-1], pad(sizes[-1])


def weight_rows_of(layers: list) -> float:
    """What one stacked copy of a net's weights costs in rows of its GEMMs: max over layers of
    in*out/(in+out) (elements of W over elements of one input row and one output row)."""
    return max(float(l.matrix.shape[0] * l.matrix.shape[1]) / (l.matrix.shape[0] + l.matrix.shape[1])
               for l in layers)


def stack_layers(layer_lists: list) -> list:
    """Per layer of equally shaped nets: (W [K,in,out], b [K,1,out] | None, idt [K,1,out] | None,
    the first net's layer). The entries are upstream's own nn.Parameters (a net may appear several
    times: autograd sums the stacked gradient back into each parameter)."""
    out = []
    for li in range(len(layer_lists[0])):
        ls = [layers[li] for layers in layer_lists]
        W = torch.stack([l.matrix for l in ls])
        b = torch.stack([l.bias for l in ls]).unsqueeze(1) if ls[0].bias is not None else None
        idt = torch.stack([l.idt for l in ls]).unsqueeze(1) if ls[0].idt is not None else None
        out.append((W, b, idt, ls[0]))
    return out


def _pack_rows(xs: list, padded: list, R: int) -> torch.Tensor:
    """Blocks x_b (any leading shape, last dim w) flattened to rows, each zero-padded to padded[b]
    rows, concatenated and viewed [nchunk, R, w]."""
    w = xs[0].shape[-1]
    parts = []
    for x, p in zip(xs, padded):
        x = x.reshape(-1, w)
        parts.append(x)
        if p > x.shape[0]:
            parts.append(x.new_zeros(p - x.shape[0], w))
    return torch.cat(parts).reshape(-1, R, w)


def _unpack_rows(y: torch.Tensor, shapes: list, padded: list) -> list:
    """Inverse of _pack_rows for an output y [nchunk, R, w]: per block a contiguous row range
    (a view) reshaped to the block's leading shape + (w,); padding rows are dropped. One split
    (its backward is one cat of the blocks' gradients, zeros for the padding) rather than a slice
    per block (whose backwards would each scatter into a zero tensor of the full size)."""
    w = y.shape[-1]
    sizes, keep = [], []
    for shp, p in zip(shapes, padded):
        n = math.prod(shp)
        keep.append(len(sizes))
        sizes.append(n)
        if p > n:
            sizes.append(p - n)
    pieces = y.reshape(-1, w).split(sizes)
    return [pieces[i].reshape(*shp, w) for i, shp in zip(keep, shapes)]


def chunk_nets(layer_lists: list, padded: list, R: int) -> list:
    """The net of every chunk: block b's net repeated over its padded[b] / R chunks."""
    nets = []
    for ls, p in zip(layer_lists, padded):
        nets += [ls] * (p // R)
    return nets


def embed_packed_with_tangent(x: torch.Tensor, nets: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, dG/ds) [nchunk, R, ng] of packed s columns x [nchunk, R, 1], chunk c through net
    nets[c]: per GEMM layer ONE batched GEMM of the stacked value and tangent by the per-chunk
    stacked weights (the width-1 first layer: elementwise)."""
    x = x.to(nets[0][0].prec)
    t = None
    for (W, b, idt, l0) in stack_layers(nets):
        nin, nout = l0.matrix.shape
        x, t = layer_with_tangent(x, t, W, W[:, :1, :], nin, b, idt, _is_tanh(l0), _skip(l0, nin, nout))
    return x, t


def embed_grouped_with_tangent(cols: list, layer_lists: list) -> list:
    """embed_with_tangent for several blocks at once: block b's s column cols[b] (..., 1) goes
    through net layer_lists[b]. The rows of all blocks are concatenated (each block padded to a
    multiple of the chunk size R, chunk_plan) and viewed [nchunk, R, 1]; chunk c lies inside one
    block, so every layer is ONE batched GEMM of the stacked value and tangent [2, nchunk, R, in]
    by the per-chunk stacked weights [nchunk, in, out] (the width-1 first layer: elementwise).
    Returns per block (G, dG/ds), views of the [nchunk*R, ng] outputs shaped (..., ng)."""
    shapes = [tuple(c.shape[:-1]) for c in cols]
    R, padded = chunk_plan([math.prod(s) for s in shapes], EMB_CHUNKS)
    x, t = embed_packed_with_tangent(_pack_rows(cols, padded, R), chunk_nets(layer_lists, padded, R))
    return list(zip(_unpack_rows(x, shapes, padded), _unpack_rows(t, shapes, padded)))


def embed_contract_grouped(rrs: list, layer_lists: list) -> tuple[list, tuple]:
    """Embedding nets AND the contraction R~^T G of several descriptor blocks at once.

    Block b: rrs[b] = R~ block [B, na_b, sel_b, 4] through net layer_lists[b]. K = gcd of the
    sel_b: the rows (frame, atom, neighbour) of every block split into sub-atoms of K
    consecutive neighbours of one atom. The 4 columns of every block are packed in the chunk
    layout of embed_grouped_with_tangent (chunk_plan with align=K: every chunk and every block's
    padded row count a whole number of sub-atoms; padding rows zero), the s column goes through
    the nets (embed_packed_with_tangent), and the P packed rows are viewed [P/K, K, .]: ONE bmm
    rr_sub^T G_sub [P/K, 4, ng] gives every sub-atom's partial sum; per block (its sub-atom
    range, padding split away) the sel_b/K partials of an atom are summed.
    Returns per block xyz_b = rr_b^T G_b [B, na_b, 4, ng] (not yet / nnei) and the context for
    env_grad_grouped."""
    shapes = [tuple(r.shape[:-1]) for r in rrs]  # (B, na, sel)
    K = 0
    for shp in shapes:
        K = math.gcd(K, shp[-1])
    R, padded = chunk_plan([math.prod(s) for s in shapes], EMB_CHUNKS, align=K)
    rp = _pack_rows(rrs, padded, R)  # nchunk x R x 4
    G, dG = embed_packed_with_tangent(rp[..., :1], chunk_nets(layer_lists, padded, R))
    ng = G.shape[-1]
    nsub = sum(padded) // K
    rr_sub = rp.reshape(nsub, K, 4)
    G_sub = G.reshape(nsub, K, ng)
    partial = contract(rr_sub.transpose(1, 2), G_sub)  # nsub x 4 x ng (one bmm)
    sub_shapes = [(b, na, sel // K) for (b, na, sel) in shapes]
    parts = _unpack_rows(partial.reshape(nsub, 4 * ng), sub_shapes, [p // K for p in padded])
    xyzs = [x.reshape(b, na, ns, 4, ng).sum(2) for x, (b, na, ns) in zip(parts, sub_shapes)]
    return xyzs, (rr_sub, G_sub, dG.reshape(nsub, K, ng), K, shapes, padded)


def env_grad_grouped(ctx: tuple, gxyz: torch.Tensor, starts: list) -> list:
    """dE/dR~ of every block packed by embed_contract_grouped (ctx), from the per-atom
    gxyz = dE/dxyz [B, nloc, 4, ng]; block b's atoms are starts[b] ... starts[b] + na_b - 1.
    ONE index_select expands gxyz to the sub-atoms in packed order (sub-atom -> atom index from
    static shapes via arange/expand in the traced code; padding sub-atoms read atom 0, their
    rows are dropped), then ONE bmm each: gR = G_sub gx_sub^T [P/K, K, 4], gG = rr_sub gx_sub
    [P/K, K, ng]; gs = (gG . dG/ds) goes on the s column. Returns per block [B, na_b, sel_b, 4]
    (views of the packed result; padding rows dropped)."""
    rr_sub, G_sub, dG_sub, K, shapes, padded = ctx
    B, nloc, _, ng = gxyz.shape
    dev = gxyz.device
    frame0 = (torch.arange(B, device=dev) * nloc)[:, None, None]
    idx = []
    for (b, na, sel), a0, p in zip(shapes, starts, padded):
        atom = frame0 + (a0 + torch.arange(na, device=dev))[None, :, None]
        idx.append(atom.expand(b, na, sel // K).reshape(-1))
        n = b * na * sel
        if p > n:
            idx.append(torch.zeros(((p - n) // K,), dtype=torch.long, device=dev))
    idx = idx[0] if len(idx) == 1 else torch.cat(idx)
    gx_sub = gxyz.reshape(B * nloc, 4, ng).index_select(0, idx)  # nsub x 4 x ng
    return _unpack_rows(env_cotangent(rr_sub, G_sub, dG_sub, gx_sub), shapes, padded)


def env_cotangent(rr: torch.Tensor, G: torch.Tensor, dG: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """dE/dR~ [..., S, 4] of S neighbour rows R~ [..., S, 4] whose embedding G = G(s) [..., S, ng]
    (s = R~'s first column) and its tangent dG/ds went into xyz = R~^T G, from gx = dE/dxyz
    [..., 4, ng]: dE/dR~ = G gx^T, plus (rr gx) . dG/ds on the s column (G depends on R~ only
    through s). The one copy of this product: every route of the engine (per block, batched,
    grouped) calls it."""
    gR = contract(G, gx.transpose(-1, -2))  # ... S x 4
    gG = contract(rr, gx)  # ... S x ng
    gs = (gG * dG).sum(-1, keepdim=True)
    return torch.cat([gR[..., :1] + gs, gR[..., 1:]], dim=-1)


def mlp_forward_saved_stacked(x: torch.Tensor, stk: list) -> tuple[torch.Tensor, list]:
    """Forward of upstream MLPs (matmul, bias, tanh, idt time step, identity / concat [x, x]
    resnet skip, as MLPLayer.forward) with weights in stack_layers' form: x [K, rows, in] ->
    [K, rows, out] (K nets) or one net's as_stack; returns the output and per-layer tanh outputs
    (None for linear layers), which mlp_vjp_stacked needs."""
    saved = []
    for (W, b, idt, l0) in stk:
        x = x.to(l0.prec)
        nin, nout = l0.matrix.shape
        z = gemm(x, W)
        if b is not None:
            z = z + b
        a = torch.tanh(z) if _is_tanh(l0) else z
        saved.append(a if _is_tanh(l0) else None)
        y = a * idt if idt is not None else a
        sk = _skip(l0, nin, nout)
        if sk == 1:
            y = y + x
        elif sk == 2:
            y = y + torch.cat([x, x], dim=-1)
        x = y
    return x, saved


def mlp_vjp_stacked(gy: torch.Tensor, stk: list, saved: list) -> torch.Tensor:
    """d(sum gy . MLP(x))/dx by hand (reverse over layers), differentiable; weights as in
    mlp_forward_saved_stacked."""
    for (W, b, idt, l0), a in zip(reversed(stk), reversed(saved)):
        nin, nout = l0.matrix.shape
        gz = gy * idt if idt is not None else gy
        if a is not None:
            gz = gz * (1.0 - a * a)
        gx = gemm(gz, W.transpose(-1, -2))
        sk = _skip(l0, nin, nout)
        if sk == 1:
            gx = gx + gy
        elif sk == 2:
            gx = gx + gy[..., :nin] + gy[..., nin:]
        gy = gx
    return gy


def fit_grouped(xs: list, layer_lists: list) -> tuple[list, list]:
    """Fitting nets of several atom types at once: type block xs[b] (B x na_b x nd) through net
    layer_lists[b], forward and hand-written VJP (unit cotangent) with stacked per-chunk weights
    (rows = (type, frame, atom), chunk_plan with FIT_CHUNKS and the weights' cost: usually one
    chunk per type, padded to the most numerous type). Returns per block the net output
    (B x na_b x 1) and d(sum output)/dx (B x na_b x nd)."""
    shapes = [tuple(x.shape[:-1]) for x in xs]
    R, padded = chunk_plan([math.prod(s) for s in shapes], FIT_CHUNKS, weight_rows=weight_rows_of(layer_lists[0]))
    stk = stack_layers(chunk_nets(layer_lists, padded, R))
    y, saved = mlp_forward_saved_stacked(_pack_rows(xs, padded, R), stk)
    gx = mlp_vjp_stacked(torch.ones_like(y), stk, saved)
    return _unpack_rows(y, shapes, padded), _unpack_rows(gx, shapes, padded)
