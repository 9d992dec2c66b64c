"""Engine of the ``fused`` variant: graph's engine with an analytic force path.

``graph`` gets forces from ``torch.autograd.grad(E, R~, create_graph=True)`` and then
needs a second-order backward for the training loss. Here the first derivative
dE/dR~ is written out explicitly with ordinary differentiable tensor ops:

* embedding net G(s) per neighbour evaluated together with its forward-mode
  derivative dG/ds (input width is 1, so the tangent is one vector per neighbour);
  the value and tangent share one GEMM per layer (stacked along a leading dim);
* descriptor xyz = R~^T G / nnei, D = xyz^T xyz[:, :axis];
* fitting net forward storing tanh outputs, then its hand-written VJP with unit
  cotangent (idt time-step scaling, identity / concat resnet skips);
* dE/dR~ = G gxyz^T (+ (gG . dG/ds) on the s column) per type block (grouped: all blocks'
  contractions in one bmm each over sub-atoms of gcd(sel) neighbours, embed_contract_grouped);

so forces are an explicit first-order function of the parameters and the training
loss needs ONE ordinary autograd backward. That function (geometry in, energy /
force / virial out) is also what torch.compile (Inductor) fuses on CUDA.
"""
from __future__ import annotations

import logging
import math
import os


import torch

from . import flat_optim
from . import graph as graph_engine

log = logging.getLogger("deepmd.fused")

_ACTS = {"tanh", "none", "linear"}


def _layers(net) -> list:
    out = []
    for layer in net.layers:
        if type(layer).__name__ != "MLPLayer":
            graph_graph_refuse(f"network layer {type(layer).__name__}")
        act = (layer.activate_name or "none").lower()
        if act not in _ACTS:
            graph_graph_refuse(f"activation {act} (fused supports tanh/linear)")
        out.append(layer)
    return out


def graph_graph_refuse(msg: str) -> None:
    raise graph_engine.Unsupported(f"fused variant: unsupported input: {msg}")


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
        zz = torch.matmul(torch.stack([x, t]), W)  # value and tangent share one GEMM
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
    partial = torch.bmm(rr_sub.transpose(1, 2), G_sub)  # nsub x 4 x ng
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
    gR = torch.bmm(G_sub, gx_sub.transpose(1, 2))  # nsub x K x 4
    gG = torch.bmm(rr_sub, gx_sub)  # nsub x K x ng
    gs = (gG * dG_sub).sum(-1, keepdim=True)
    gcol = torch.cat([gR[..., :1] + gs, gR[..., 1:]], dim=-1)
    return _unpack_rows(gcol, shapes, padded)


def mlp_forward_saved_stacked(x: torch.Tensor, stk: list) -> tuple[torch.Tensor, list]:
    """Forward of upstream MLPs (matmul, bias, tanh, idt time step, identity / concat [x, x]
    resnet skip, as MLPLayer.forward) with weights in stack_layers' form: x [K, rows, in] ->
    [K, rows, out] (K nets) or one net's as_stack; returns the output and per-layer tanh outputs
    (None for linear layers), which mlp_vjp_stacked needs."""
    saved = []
    for (W, b, idt, l0) in stk:
        x = x.to(l0.prec)
        nin, nout = l0.matrix.shape
        z = torch.matmul(x, W)
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
        gx = torch.matmul(gz, W.transpose(-1, -2))
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


class FusedEngine(graph_engine.GraphEngine):
    """GraphEngine with analytic first derivatives (one backward per training step)."""

    # compact: per pair one int32 s*nloc + j, per frame coordinates + image shifts; the step
    # re-forms r_j - r_i + shift (bitwise the on-the-fly diff) and R~ with its closed-form
    # Jacobian inside _predict_core, compiled with the rest: ~30x less geometry than graph's
    geom_default = "compact"

    def __init__(self, trainer, device=None) -> None:
        super().__init__(trainer, device)
        self._init_fused()
        log.info("fused: %s embedding nets, %s fitting nets, %s contractions (DPH_FUSED_GROUPED=%s)",
                 "grouped" if self.grouped else "per-block",
                 "grouped" if self.grouped and self.grouped_fit else "per-type",
                 "grouped" if self.grouped and self.grouped_contract else "per-block",
                 os.environ.get("DPH_FUSED_GROUPED", "1"))

    # ---- used by the parity hooks too (no trainer)
    @classmethod
    def from_model(cls, model, device=None) -> "FusedEngine":
        """Predict-only engine (no trainer), via graph's own model set-up."""
        self = cls.for_model(model, device)
        self._init_fused()
        return self

    def _init_fused(self) -> None:
        nets = self.sea.filter_layers.networks
        self.emb_layers = [_layers(n) for n in nets]
        self.fit_layers = [_layers(n) for n in self.fit.filter_layers.networks]
        for ls in self.fit_layers:
            if ls[-1].matrix.shape[1] != 1:
                graph_graph_refuse("fitting net output width != 1")
        self.autograd_forces = os.environ.get("DPH_FUSED_AUTOGRAD") == "1"
        self._compiled = None
        # compiled whole step (fused's manifest env; off in fused-predict): gather + energy/forces + upstream's loss
        # in ONE torch.compile'd function (see compiled_step_wanted / _step_core)
        self.compile_step = os.environ.get("DPH_FUSED_COMPILE_STEP") == "1"
        self._step_compiled = None
        self.batched = os.environ.get("DPH_FUSED_BATCHED", "0") == "1"  # measured slower on water (padding)
        # grouped (default "1"): with several descriptor blocks (fitting types), all their
        # embedding (fitting) nets in one chain of batched GEMMs over row chunks, and the
        # contractions R~^T G, G gxyz^T, R~ gxyz of all blocks in one bmm each over sub-atoms
        # (embed_contract_grouped, env_grad_grouped, fit_grouped); "nets": nets grouped,
        # contractions per block (embed_grouped_with_tangent); "emb": embedding nets grouped,
        # fitting nets per type, contractions per block; "0": one GEMM chain per block (variant
        # fused-blocks). The intermediate modes are there to measure each grouping apart.
        mode = os.environ.get("DPH_FUSED_GROUPED", "1")
        if mode not in ("0", "1", "nets", "emb"):
            raise ValueError(f"DPH_FUSED_GROUPED={mode!r} (0 | 1 | nets | emb)")
        self.grouped = mode != "0"
        self.grouped_fit = mode in ("1", "nets")
        self.grouped_contract = mode == "1"

    # ------------------------------------------------------------ analytic path
    def _blocks(self, tcount):
        """(atom start, natoms, type i, type j, net index) for every descriptor block."""
        out = []
        if self.tos:
            for tj in range(self.ntypes):
                out.append((0, None, None, tj, tj))
            return out
        a0 = 0
        for ti in range(self.ntypes):
            na = tcount[ti]
            if na == 0:
                continue
            for tj in range(self.ntypes):
                out.append((a0, na, ti, tj, tj * self.ntypes + ti))
            a0 += na
        return out

    def energy_and_grad(self, rt: torch.Tensor, tcount: list, bias: torch.Tensor):
        """Atomic energies (B x nloc, gprec) and dE/dR~ (B x nloc x nnei x 4, dprec)."""
        B, nloc = rt.shape[:2]
        nnei = self.nnei
        sec = self.sec
        blocks = self._blocks(tcount)
        # ---- R~ blocks (type_i, type_j): B x na x sel_j x 4
        rrs = [rt[:, :, sec[tj] : sec[tj + 1], :] if self.tos else rt[:, a0 : a0 + na, sec[tj] : sec[tj + 1], :]
               for (a0, na, _, tj, _) in blocks]
        nets = [k for (*_, k) in blocks]
        ctx = embs = None
        if self.grouped and self.grouped_contract and len(blocks) > 1:
            # ---- nets and contraction of all blocks at once (one bmm over sub-atoms)
            grs, ctx = embed_contract_grouped(rrs, [self.emb_layers[k] for k in nets])
        else:
            # ---- embedding (value + tangent) per block, or all blocks' nets grouped (see
            # _embed_blocks); contraction per block
            embs = self._embed_blocks(rrs, nets)
            grs = [torch.matmul(rr.transpose(-1, -2), G) for rr, (G, _) in zip(rrs, embs)]
        xyz = self._per_atom(blocks, grs)
        xyz = xyz / nnei  # B x nloc x 4 x ng
        x1 = xyz.transpose(-1, -2)
        x2 = xyz[..., : self.axis]
        d = torch.matmul(x1, x2)  # B x nloc x ng x axis
        desc = d.reshape(B, nloc, -1).to(self.gprec).to(self.fprec)
        # ---- fitting forward + VJP (unit cotangent: E = sum of atomic energies)
        bae = self.fit.bias_atom_e
        if self.fit.mixed_types:
            types = torch.repeat_interleave(torch.arange(self.ntypes, device=rt.device), torch.tensor(tcount, device=rt.device))
            y, saved = mlp_forward_saved(desc, self.fit_layers[0])
            ae = (y + bae[types].to(self.fprec))[..., 0] + bias.to(self.fprec)[types]
            gdesc = mlp_vjp(torch.ones_like(y), self.fit_layers[0], saved)
        else:
            aes, gds = [], []
            types = [ti for ti in range(self.ntypes) if tcount[ti] > 0]
            starts = [sum(tcount[:ti]) for ti in types]
            xs = [desc[:, a0 : a0 + tcount[ti]] for ti, a0 in zip(types, starts)]
            if self.grouped and self.grouped_fit and len(types) > 1:
                ys, gxs = fit_grouped(xs, [self.fit_layers[ti] for ti in types])
            else:
                ys, gxs = [], []
                for ti, xx in zip(types, xs):
                    y, saved = mlp_forward_saved(xx, self.fit_layers[ti])
                    ys.append(y)
                    gxs.append(mlp_vjp(torch.ones_like(y), self.fit_layers[ti], saved))
            for ti, y, gx in zip(types, ys, gxs):
                e = y + bae[ti].to(self.fprec)
                aes.append(e[..., 0] + bias[ti].to(e.dtype))
                gds.append(gx)
            ae = aes[0] if len(aes) == 1 else torch.cat(aes, dim=1)
            gdesc = gds[0] if len(gds) == 1 else torch.cat(gds, dim=1)
        # ---- descriptor VJP
        gd = gdesc.to(self.dprec).reshape(B, nloc, self.ng, self.axis)
        gx1 = torch.matmul(gd, x2.transpose(-1, -2))  # B nloc ng 4
        gx2 = torch.matmul(x1.transpose(-1, -2), gd)  # B nloc 4 axis
        gxyz = gx1.transpose(-1, -2)
        gxyz = torch.cat([gxyz[..., : self.axis] + gx2, gxyz[..., self.axis :]], dim=-1) / nnei
        gxyz_t = gxyz.transpose(-1, -2)  # B nloc ng 4
        # ---- per block: dE/dR~ = G gxyz^T, plus the s column via dG/ds
        if ctx is not None:
            gbs = env_grad_grouped(ctx, gxyz, [0 if self.tos else a0 for (a0, *_) in blocks])
        else:
            gbs = []
            for (a0, na, *_), rr, (G, dG) in zip(blocks, rrs, embs):
                at = slice(None) if self.tos else slice(a0, a0 + na)  # the block's centre atoms
                gR = torch.matmul(G, gxyz_t[:, at])  # B na nb 4
                gG = torch.matmul(rr, gxyz[:, at])  # B na nb ng
                gs = (gG * dG).sum(-1, keepdim=True)
                gbs.append(torch.cat([gR[..., :1] + gs, gR[..., 1:]], dim=-1))
        g = self._per_pair(blocks, gbs)
        return ae, g

    def _per_atom(self, blocks: list, grs: list) -> torch.Tensor:
        """Per-atom xyz [B, nloc, 4, ng] from the blocks' contributions grs[b] (B x na x 4 x ng):
        type_one_side: every block covers all atoms, summed; else the blocks of one type_i
        (consecutive in _blocks' order) are summed and the types concatenated along the atoms."""
        if self.tos:
            xyz = grs[0]
            for gr in grs[1:]:
                xyz = xyz + gr
            return xyz
        parts = []
        for b, ((_, _, ti, _, _), gr) in enumerate(zip(blocks, grs)):
            if b == 0 or blocks[b - 1][2] != ti:
                parts.append(gr)
            else:
                parts[-1] = parts[-1] + gr
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _per_pair(self, blocks: list, gbs: list) -> torch.Tensor:
        """dE/dR~ [B, nloc, nnei, 4] from the blocks' parts gbs[b] (B x na x sel_j x 4): the
        neighbour types of one centre type side by side, the centre types along the atoms."""
        if self.tos:
            return torch.cat(gbs, dim=2)
        rows = []
        for b, ((_, _, ti, _, _), gb) in enumerate(zip(blocks, gbs)):
            if b == 0 or blocks[b - 1][2] != ti:
                rows.append([gb])
            else:
                rows[-1].append(gb)
        rows = [torch.cat(r, dim=2) for r in rows]
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)

    def _embed_blocks(self, rrs: list, nets: list) -> list:
        """(G, dG/ds) of every descriptor block rrs[b] (B x na x sel_j x 4) through embedding net
        nets[b]: with several blocks and grouping on, one chain of batched GEMMs over all of them
        (embed_grouped_with_tangent); else one GEMM chain per block (embed_with_tangent)."""
        if self.grouped and len(rrs) > 1:
            return embed_grouped_with_tangent([rr[..., :1] for rr in rrs], [self.emb_layers[k] for k in nets])
        return [embed_with_tangent(rr[..., :1], self.emb_layers[k]) for rr, k in zip(rrs, nets)]

    # ------------------------------------------------ batched (padded) analytic path
    def _batch_plan(self, tcount, device):
        """Index tables that pack every descriptor block (one embedding net each) into one
        padded [nblocks, NA, S] layout, and every fitting type into [ntypes, NA]."""
        key = (tuple(tcount), str(device))
        plans = self.__dict__.setdefault("_plans", {})
        if key in plans:
            return plans[key]
        nloc = sum(tcount)
        nnei = self.nnei
        blocks = self._blocks(tcount)
        if self.tos:
            blocks = [(0, nloc, None, tj, k) for (_, _, _, tj, k) in blocks]
        NA = max(na for (_, na, _, _, _) in blocks)
        S = max(self.sel)
        K = len(blocks)
        dummy_row = nloc * nnei  # index of an appended zero row of R~
        fwd = torch.full((K, NA, S), dummy_row, dtype=torch.long)
        inv = torch.full((nloc * nnei,), -1, dtype=torch.long)
        atom = torch.full((K, NA), nloc, dtype=torch.long)  # nloc: dropped row
        for b, (a0, na, _, tj, _) in enumerate(blocks):
            sj = self.sel[tj]
            a = torch.arange(na)[:, None]
            j = torch.arange(sj)[None, :]
            rows = (a0 + a) * nnei + self.sec[tj] + j
            fwd[b, :na, :sj] = rows
            inv[rows.reshape(-1)] = (b * NA * S + a * S + j).reshape(-1)
            atom[b, :na] = a0 + torch.arange(na)
        assert bool((inv >= 0).all())
        types = [t for t in range(self.ntypes) if tcount[t] > 0]
        FA = max(tcount[t] for t in types)
        fatom = torch.full((len(types), FA), nloc, dtype=torch.long)
        finv = torch.empty((nloc,), dtype=torch.long)
        a0 = 0
        for i, t in enumerate(types):
            na = tcount[t]
            fatom[i, :na] = a0 + torch.arange(na)
            finv[a0 : a0 + na] = i * FA + torch.arange(na)
            a0 += na
        plan = {
            "K": K, "NA": NA, "S": S, "nets": [k for (*_, k) in blocks],
            "fwd": fwd.reshape(-1).to(device), "inv": inv.to(device), "atom": atom.reshape(-1).to(device),
            "types": types, "FA": FA, "fatom": fatom.reshape(-1).to(device), "finv": finv.to(device),
        }
        plans[key] = plan
        return plan

    _stacked = staticmethod(stack_layers)

    def energy_and_grad_batched(self, rt: torch.Tensor, tcount: list, bias: torch.Tensor):
        B, nloc, nnei = rt.shape[:3]
        P = self._batch_plan(tcount, rt.device)
        K, NA, S = P["K"], P["NA"], P["S"]
        rflat = torch.cat([rt.reshape(B, nloc * nnei, 4), rt.new_zeros(B, 1, 4)], dim=1)
        rr = rflat.index_select(1, P["fwd"]).reshape(B, K, NA * S, 4)
        # ---- all embedding nets at once: value + tangent, weights stacked [K, in, out]
        x = rr[..., :1].to(self.emb_layers[0][0].prec)
        t = None
        for (W, b, idt, l0) in self._stacked([self.emb_layers[k] for k in P["nets"]]):
            nin, nout = l0.matrix.shape
            x, t = layer_with_tangent(x, t, W, W[:, :1, :], nin, b, idt, _is_tanh(l0), _skip(l0, nin, nout))
        G, dG = x, t  # B K R ng
        ng = G.shape[-1]
        rr5 = rr.reshape(B, K, NA, S, 4)
        G5 = G.reshape(B, K, NA, S, ng)
        gr = torch.matmul(rr5.transpose(-1, -2), G5)  # B K NA 4 ng
        xyz = rt.new_zeros(B, nloc + 1, 4, ng).index_add(1, P["atom"], gr.reshape(B, K * NA, 4, ng))[:, :nloc]
        xyz = xyz / nnei
        x1 = xyz.transpose(-1, -2)
        x2 = xyz[..., : self.axis]
        d = torch.matmul(x1, x2)
        desc = d.reshape(B, nloc, -1).to(self.gprec).to(self.fprec)
        # ---- fitting nets of all types at once (padded [T, FA] rows)
        bae = self.fit.bias_atom_e
        if self.fit.mixed_types:
            types = torch.repeat_interleave(torch.arange(self.ntypes, device=rt.device), torch.tensor(tcount, device=rt.device))
            y, saved = mlp_forward_saved(desc, self.fit_layers[0])
            ae = (y + bae[types].to(self.fprec))[..., 0] + bias.to(self.fprec)[types]
            gdesc = mlp_vjp(torch.ones_like(y), self.fit_layers[0], saved)
        else:
            T, FA = len(P["types"]), P["FA"]
            dpad = torch.cat([desc, desc.new_zeros(B, 1, desc.shape[-1])], dim=1).index_select(1, P["fatom"]).reshape(B, T, FA, -1)
            stk = self._stacked([self.fit_layers[t_] for t_ in P["types"]])
            h, saved = mlp_forward_saved_stacked(dpad, stk)
            tix = torch.tensor(P["types"], device=rt.device)
            e = h[..., 0] + bae.index_select(0, tix).to(self.fprec)[:, :1].reshape(1, T, 1) + bias.index_select(0, tix).to(self.fprec).reshape(1, T, 1)
            ae = e.reshape(B, T * FA).index_select(1, P["finv"])
            gy = mlp_vjp_stacked(torch.ones_like(h), stk, saved)
            gdesc = gy.reshape(B, T * FA, -1).index_select(1, P["finv"])
        # ---- descriptor VJP
        gd = gdesc.to(self.dprec).reshape(B, nloc, self.ng, self.axis)
        gx1 = torch.matmul(gd, x2.transpose(-1, -2))
        gx2 = torch.matmul(x1.transpose(-1, -2), gd)
        gxyz = gx1.transpose(-1, -2)
        gxyz = torch.cat([gxyz[..., : self.axis] + gx2, gxyz[..., self.axis :]], dim=-1) / nnei
        gpad = torch.cat([gxyz, gxyz.new_zeros(B, 1, 4, ng)], dim=1).index_select(1, P["atom"]).reshape(B, K, NA, 4, ng)
        gR = torch.matmul(G5, gpad.transpose(-1, -2))  # B K NA S 4
        gG = torch.matmul(rr5, gpad)  # B K NA S ng
        gs = (gG * dG.reshape(B, K, NA, S, ng)).sum(-1, keepdim=True)
        gpad_r = torch.cat([gR[..., :1] + gs, gR[..., 1:]], dim=-1).reshape(B, K * NA * S, 4)
        g = gpad_r.index_select(1, P["inv"]).reshape(B, nloc, nnei, 4)
        return ae, g

    def _predict_core(self, rt, jac, jidx, diff, tcount, bias, virial=True):
        """Energy, forces, virial (if virial and diff given). rt None (on-the-fly mode): R~ and
        the factors of its closed-form Jacobian are computed here from diff, so that Inductor
        fuses them with the embedding input and the force contraction (no Jacobian tensor)."""
        # compact mode: diff formed here (fused with its gathers); on the fly: R~ too
        rt, factors, jidx, diff = self.env_for_step(rt, jidx, diff, tcount)
        ae, g = (self.energy_and_grad_batched if self.batched else self.energy_and_grad)(rt, tcount, bias)
        energy = ae.to(self.gprec).sum(dim=1, keepdim=True)
        return self.forces_from_env_grad(energy, g, jac, factors, jidx, diff, virial)

    def predict(self, rt, jac, jidx, diff, tcount, bias, create_graph, virial=None):
        if self.autograd_forces:
            return super().predict(rt, jac, jidx, diff, tcount, bias, create_graph, virial)
        virial = self.want_virial(diff, virial)
        if self._compiled is not None:
            return self._compiled(rt, jac, jidx, diff, tuple(tcount), bias, virial)
        return self._predict_core(rt, jac, jidx, diff, tcount, bias, virial)

    # ------------------------------------------------------- compiled whole step
    def compiled_step_wanted(self) -> bool:
        """DPH_FUSED_COMPILE_STEP=1 on CUDA; on CPU only with DPH_COMPILE_CPU=1 as well (tests and
        CPU checks: Inductor's C++ compile of the whole step takes minutes on 2 cores)."""
        return (self.compile_step and not self.autograd_forces
                and (self.cuda or flat_optim.compile_on_cpu()))

    def _step_core(self, S: dict, idx: torch.Tensor, lr: torch.Tensor):
        """gather -> energy/forces/virial (_predict_core) -> upstream's loss (loss_and_more, same
        arguments as the eager step), for the frames idx of the step view S (_step_view). Compiled
        as one function by enable_step_compile, so Inductor fuses the index_selects into their
        consumers and the loss's forward and (AOTAutograd) backward into the energy/force kernels."""
        rt, jac, jidx, diff, labels = self.gather(S, idx)
        virial = self.want_virial(diff, None)
        pred = self._predict_core(rt, jac, jidx, diff, S["tcount"], S["bias"], virial)
        return self.loss_and_more(S, pred, labels, lr)

    @staticmethod
    def _step_view(G: dict) -> dict:
        """What _step_core reads of a group: the stored geometry/labels, the loss's static inputs.
        A small dict of its own (cached in G), so dynamo's guards do not see the CUDA graphs and
        outputs that capture later stores in G."""
        S = G.get("_step_view")
        if S is None:
            S = {k: G.get(k) for k in graph_engine.GEOM_KEYS}
            S.update(labels=G["labels"], finds=dict(G["finds"]), nloc=G["nloc"], tcount=tuple(G["tcount"]),
                     bias=G["bias"], atype_dummy=G["atype_dummy"], mask=G["mask"])
            G["_step_view"] = S
        return S

    def enable_step_compile(self) -> None:
        backend = flat_optim.compile_backend()
        self._step_compiled = _torch_compile(self._step_core, backend)
        log.info("fused: compiled whole step enabled (gather + energy/forces + loss in one torch.compile, "
                 "backend=%s, device %s)", backend, self.device.type)

    def _lr_tensor(self, lr) -> torch.Tensor:
        """The step's learning rate as a float64 device tensor (the CUDA loop's lr_t already is one;
        a float would make dynamo specialise on its value: one recompile per step)."""
        if torch.is_tensor(lr):
            return lr
        t = self.__dict__.get("_lr_host")
        if t is None or t.device != self.device:
            t = self._lr_host = torch.zeros((), dtype=torch.float64, device=self.device)
        t.fill_(float(lr))
        return t

    def forward_backward(self, G: dict, lr, idx: torch.Tensor | None = None):
        if not self.compiled_step_wanted():
            return super().forward_backward(G, lr, idx)
        if self._step_compiled is None:
            self.enable_step_compile()
        if idx is None:
            idx = self.sample(G)  # device RNG stays eager (Philox offsets under capture)
        loss, more = self._step_compiled(self._step_view(G), idx, self._lr_tensor(lr))
        self.flat.grads_from_loss(loss)
        return loss, more

    def enable_compile(self) -> None:
        self._compiled = _torch_compile(self._predict_core, "inductor")
        log.info("fused: torch.compile enabled (mode=%s)", os.environ.get("DPH_FUSED_COMPILE_MODE", "default"))

    # --------------------------------------------------------------- capture
    def capture(self) -> None:
        want = self.cuda and os.environ.get("DPH_FUSED_COMPILE", "1") == "1" and not self.autograd_forces
        if want:
            try:
                if self.compiled_step_wanted():
                    self.enable_step_compile()  # the whole step; predict is traced inside it
                else:
                    self.enable_compile()
                return super().capture()
            except Exception as e:  # noqa: BLE001
                if getattr(self, "_capture_started", False):
                    # the compiled code ran (warm-up passed): a failed capture is not Inductor's,
                    # and a second capture after an invalidated one cannot work (RNG offsets)
                    raise
                log.warning("fused: compiled capture failed (%s: %s); falling back to eager analytic path", type(e).__name__, str(e)[:500])
                torch.cuda.synchronize()
                self._compiled = None
                self._step_compiled = None
                self.compile_step = False
                if getattr(self.opt, "compiled", None) is not None:
                    log.warning("fused: compiled flat Adam off as well (eager FlatAdam)")
                    self.opt.compiled = None
                self.opt.zero_grad(set_to_none=True)
        return super().capture()


def _torch_compile(fn, backend: str):
    """torch.compile of one of the engine's step functions: static shapes, graph breaks allowed,
    Inductor's mode from DPH_FUSED_COMPILE_MODE; room in dynamo's cache for every group's shapes."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    mode = os.environ.get("DPH_FUSED_COMPILE_MODE", "default")
    kw = {"mode": mode} if mode != "default" and backend == "inductor" else {}
    return torch.compile(fn, dynamic=False, fullgraph=False, backend=backend, **kw)


# ------------------------------------------------------------------ parity hooks
def parity_forward(model, coord, atype, box):
    with torch.enable_grad():
        return _parity_forward(model, coord, atype, box)


def _parity_forward(model, coord, atype, box):
    eng = FusedEngine.from_model(model, device=coord.device)
    nf = coord.shape[0]
    coord = coord.reshape(nf, -1, 3)
    out = {"energy": [], "force": [], "virial": []}
    for f in range(nf):  # frames may differ in atom order
        perm, inv = graph_engine.sorted_perm(atype[f : f + 1])
        r = eng.predict_frames(coord[f : f + 1, perm], atype[f : f + 1, perm], None if box is None else box[f : f + 1])
        out["energy"].append(r["energy"].detach().reshape(1))
        out["force"].append(r["force"].detach()[:, inv])
        out["virial"].append(r["virial"].detach().reshape(1, 9))
    return {k: torch.cat(v) for k, v in out.items()}


def parity_train_step(model, loss_fn, batch, lr) -> None:
    """Accuracy-gate hook: one step of this variant's own code (analytic forces, upstream's loss,
    gradients into the flat buffer, the flat Adam/AdamW of flat_optim). With the compiled-step
    knobs (fused's default env) the gate's batch goes through the very compiled function the
    training loop runs (gather + forces + loss), and FlatAdam compiles its update likewise."""
    eng = FusedEngine.from_model(model)
    if not eng.compiled_step_wanted():
        graph_engine.parity_train_step(model, loss_fn, batch, lr, engine=eng)
        return
    flat, opt = graph_engine.parity_optimizer(model, batch["optim"], lr)
    eng.device = flat.buckets[0]["flat"].device
    eng.cuda = eng.device.type == "cuda"
    G = _parity_group(eng, loss_fn, batch["input"], batch["label"])
    eng.flat = flat
    with torch.enable_grad():
        eng.forward_backward(G, lr, torch.arange(G["bsz"], device=eng.device))
    opt.step()


def _parity_group(eng: FusedEngine, loss_fn, inp: dict, label: dict) -> dict:
    """The gate's batch as a one-group training set (what build_data makes of training frames):
    atoms sorted by type, the engine's geometry mode, labels in sorted order, upstream's find_*."""
    dev = eng.device
    coord, atype, perm, _, at, tcount, box = graph_engine.sorted_batch(eng, inp)
    if not bool((atype[:, perm] == at).all()):
        raise RuntimeError("fused variant: gate batch frames differ in composition")
    nf, nloc = atype.shape
    eng.loss = loss_fn
    eng.need_virial = bool(getattr(loss_fn, "has_v", False)) and box is not None
    mode = eng.geom_mode
    keep = {"compact": ["pidx", "coord", "shifts"], "onthefly": ["jidx", "diff"]}.get(
        mode, ["jidx"] + (["diff"] if eng.need_virial else []) + ["rt", "jac"])
    geom = eng.frames_geometry(coord[:, perm].detach().to(dev), at.to(dev),
                               None if box is None else box.detach().to(dev),
                               env=mode == "precomputed", compact=mode == "compact", only=keep)
    gp = eng.gprec
    lab_keys = ["energy", "force"] + (["virial"] if eng.need_virial else [])
    shape = {"energy": (1,), "force": (nloc, 3), "virial": (9,)}
    labels, finds = {}, {}
    for k in lab_keys:
        v = label.get(k)
        v = torch.zeros((nf,) + shape[k], dtype=gp, device=dev) if v is None else v.detach().to(dev, gp).reshape((nf,) + shape[k])
        labels[k] = v[:, perm] if k == "force" else v
        finds[k] = float(label.get(f"find_{k}", 0.0))
    G = {k: geom.get(k) for k in graph_engine.GEOM_KEYS}
    G.update(tcount=tcount, bsz=nf, nloc=nloc, finds=finds, labels=labels,
             bias=eng.out_bias_per_type().detach().to(dev),
             atype_dummy=torch.zeros((nf, nloc), dtype=torch.int64, device=dev),
             mask=torch.ones((nf, nloc), dtype=torch.int32, device=dev))
    return G
