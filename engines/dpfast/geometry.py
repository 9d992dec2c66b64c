"""Fixed-shape geometry for the ``graph`` variant.

Training frames never move, so everything that depends only on coordinates is
computed once per frame here and kept on the device:

* the neighbour list, padded to ``sel`` with upstream's semantics
  (``deepmd.pt.utils.nlist.build_neighbor_list`` with ``cap_neighbors=True``:
  keep the ``sum(sel)`` nearest neighbours within ``rcut`` over *all* periodic
  images, then split them into per-type blocks of width ``sel[t]``, each block
  sorted by distance, padded with "no neighbour");
* the normalised environment matrix ``R~ = (env(r_ij) - davg) / dstd`` exactly as
  ``deepmd.pt.model.descriptor.env_mat.prod_env_mat`` forms it (padding entries
  are ``-davg/dstd``, as upstream);
* its Jacobian ``dR~/d(r_j - r_i)`` (nloc x nnei x 4 x 3), obtained by autograd of
  the same formula (padding entries: zero);
* the local index of every neighbour (for scattering forces) and the displacement
  vectors (for the virial).
"""
from __future__ import annotations

import math

import torch

from .cells import nearest_in_cells


def smooth_weight(distance: torch.Tensor, rmin: float, rmax: float) -> torch.Tensor:
    # == deepmd.pt.utils.preprocess.compute_smooth_weight
    distance = torch.clamp(distance, min=rmin, max=rmax)
    uu = (distance - rmin) / (rmax - rmin)
    uu2 = uu * uu
    return uu2 * uu * (-6 * uu2 + 15 * uu - 10) + 1


def _image_shifts(box: torch.Tensor | None, rcut: float) -> torch.Tensor:
    """Integer lattice shifts (nshift x 3) that cover every image within rcut."""
    if box is None:
        return torch.zeros(1, 3, dtype=torch.float64)
    b = box.reshape(3, 3).to(torch.float64)
    vol = torch.abs(torch.linalg.det(b))
    # distance between opposite faces of the cell along each lattice vector
    n = []
    for a in range(3):
        c1 = b[(a + 1) % 3]
        c2 = b[(a + 2) % 3]
        d = float(vol / torch.linalg.norm(torch.linalg.cross(c1, c2)))
        n.append(int(math.ceil(rcut / d)))
    rng = [torch.arange(-k, k + 1, dtype=torch.float64) for k in n]
    g = torch.stack(torch.meshgrid(*rng, indexing="ij"), dim=-1).reshape(-1, 3)
    # put the zero shift first (any order is fine; this keeps self detection simple)
    order = torch.argsort((g != 0).any(-1).to(torch.int64), stable=True)
    return g[order]


def batch_neighbors(
    coord: torch.Tensor,
    atype: torch.Tensor,
    box: torch.Tensor | None,
    rcut: float,
    sel: list[int],
    images: bool = False,
):
    """Neighbour lists of F frames of one composition, all periodic images considered.

    coord: F x nloc x 3, atype: nloc, box: F x 9 (or None: no periodicity).
    Returns ``jloc`` (F x nloc x nnei, local index of the neighbour, -1 = none),
    ``diff`` (F x nloc x nnei x 3, r_j - r_i; zero for none) and ``mask`` (bool).
    images=True adds a dict: ``pidx`` (F x nloc x nnei, image-extended index s*nloc + j of
    every neighbour, -1 = none), ``coord`` (F x nloc x 3, the wrapped float64 coordinates used
    here) and ``shifts`` (F x nshift x 3, the float64 image shift vectors used here, the zero
    shift first), from which ``diff == (shifts[s] + coord[j]) - coord[i]`` bit for bit (the
    very operations below; see ``compact_diff``).
    """
    dev = coord.device
    coord = coord.reshape(coord.shape[0], -1, 3).to(torch.float64)
    nf, nloc = coord.shape[:2]
    if box is not None:
        b = box.reshape(nf, 3, 3).to(torch.float64).to(dev)
        # wrap into the cell like upstream's normalize_coord
        frac = torch.linalg.solve(b.transpose(1, 2), coord.transpose(1, 2)).transpose(1, 2)
        frac = frac - torch.floor(frac)
        coord = frac @ b
        # one shift set covering every frame (extra images are harmless: only
        # candidates within rcut are kept)
        nmax = None
        for f in range(nf):
            g = _image_shifts(b[f].cpu(), rcut)
            if nmax is None or g.shape[0] > nmax.shape[0]:
                nmax = g
        shifts = torch.einsum("sk,fkc->fsc", nmax.to(dev), b)  # F x nshift x 3
    else:
        shifts = torch.zeros(nf, 1, 3, dtype=torch.float64, device=dev)
    nshift = shifts.shape[1]
    # candidates: (shift, atom) flattened; index = s * nloc + j (zero shift first)
    ext = (shifts[:, :, None, :] + coord[:, None, :, :]).reshape(nf, -1, 3)
    next_ = ext.shape[1]
    ext_j = torch.arange(nloc, device=dev).repeat(nshift)
    ext_t = atype.to(dev).long().reshape(-1).repeat(nshift)
    nsel = sum(sel)
    jl, df, pl = [], [], []
    if use_cells(nloc, next_):
        chunks = _nearest_by_cells(ext, coord, rcut, nsel)
    else:
        chunks = _nearest_dense(ext, coord, rcut, nsel)
    for c, rs, idx, dsel in chunks:
        valid = rs <= rcut  # upstream: rr > rcut -> -1
        typ = torch.where(valid, ext_t[idx], -1)
        out_j = torch.full((c * nloc, nsel), -1, dtype=torch.long, device=dev)
        out_d = torch.zeros((c * nloc, nsel, 3), dtype=torch.float64, device=dev)
        out_p = torch.full((c * nloc, nsel), -1, dtype=torch.long, device=dev) if images else None
        off = 0
        for t, st in enumerate(sel):
            is_t = typ == t
            # position of each type-t candidate within its block (distance order kept)
            pos = torch.cumsum(is_t.to(torch.long), dim=1) - 1
            take = is_t & (pos < st)
            r_i, c_i = torch.nonzero(take, as_tuple=True)
            dst = off + pos[r_i, c_i]
            src = idx[r_i, c_i]
            out_j[r_i, dst] = ext_j[src]
            out_d[r_i, dst] = dsel[r_i, c_i]
            if images:
                out_p[r_i, dst] = src  # == s * nloc + j (ext's layout)
            off += st
        jl.append(out_j.reshape(c, nloc, nsel))
        df.append(out_d.reshape(c, nloc, nsel, 3))
        if images:
            pl.append(out_p.reshape(c, nloc, nsel))
    jloc = torch.cat(jl)
    if images:
        return jloc, torch.cat(df), jloc >= 0, {"pidx": torch.cat(pl), "coord": coord, "shifts": shifts}
    return jloc, torch.cat(df), jloc >= 0


# a frame's dense distance matrix is nloc x (nshift * nloc); above this many entries the
# neighbour search bins atoms into cells instead (192 water atoms: 1.0 M, dense; 1,536: 64 M)
DENSE_MAX_PAIRS = 4_000_000


def use_cells(nloc: int, next_: int) -> bool:
    return nloc * next_ > DENSE_MAX_PAIRS


def _nearest(rr: torch.Tensor, k: int):
    """The k smallest of each row, by torch.topk as upstream's build_neighbor_list does: on the
    same distance matrix, equal distances (images of one atom in a small cell) come out in
    upstream's order, which decides which of them a sel truncation keeps. The cell search runs the
    same op on fewer columns: the same neighbours, in the same order whenever no two distances
    of a row are exactly equal (the order among exact ties may differ, the set kept does not
    unless the tie straddles the sel cut)."""
    return torch.topk(rr, min(k, rr.shape[1]), largest=False)


def _pad_selection(rs, idx, nsel: int, rcut: float):
    """Pad the k nearest to nsel columns with "no neighbour" (distance beyond rcut)."""
    if rs.shape[1] >= nsel:
        return rs, idx
    padn = nsel - rs.shape[1]
    rs = torch.cat([rs, torch.full((rs.shape[0], padn), rcut + 1.0, dtype=rs.dtype, device=rs.device)], 1)
    idx = torch.cat([idx, torch.zeros((idx.shape[0], padn), dtype=idx.dtype, device=idx.device)], 1)
    return rs, idx


def _nearest_dense(ext, coord, rcut: float, nsel: int):
    """Per chunk of frames: (frames, distances, extended indices, displacements) of the nsel
    nearest candidates of every atom, from every (atom, extended atom) pair at once."""
    nf, nloc = coord.shape[:2]
    next_ = ext.shape[1]
    dev = coord.device
    fchunk = max(1, 3_000_000 // (nloc * next_))
    for f0 in range(0, nf, fchunk):
        d = ext[f0 : f0 + fchunk, None, :, :] - coord[f0 : f0 + fchunk, :, None, :]  # c x nloc x next x 3
        c = d.shape[0]
        d = d.reshape(c * nloc, next_, 3)
        rr = torch.linalg.norm(d, dim=-1)
        rows = torch.arange(c * nloc, device=dev)
        rr[rows, rows % nloc] = -1.0  # self (zero shift) sorts first, as upstream
        rs, idx = _nearest(rr, nsel + 1)
        rs, idx = _pad_selection(rs[:, 1:], idx[:, 1:], nsel, rcut)
        yield c, rs, idx, d[rows[:, None], idx]


def _nearest_by_cells(ext, coord, rcut: float, nsel: int):
    """As _nearest_dense, one frame at a time, candidates from cell lists (O(N) memory)."""
    nf = coord.shape[0]
    dev = coord.device
    for f in range(nf):
        rs_all, idx_all, d_all = [], [], []
        for _, rs, pos, cand, d in nearest_in_cells(coord[f], ext[f], rcut, nsel + 1):
            rows = torch.arange(cand.shape[0], device=dev)[:, None]
            idx = torch.clamp(cand[rows, pos], min=0)
            rs, idx, dsel = rs[:, 1:], idx[:, 1:], d[rows, pos][:, 1:]
            if rs.shape[1] < nsel:
                dsel = torch.cat([dsel, dsel.new_zeros(dsel.shape[0], nsel - rs.shape[1], 3)], 1)
            rs, idx = _pad_selection(rs, idx, nsel, rcut)
            rs_all.append(rs)
            idx_all.append(idx)
            d_all.append(dsel)
        yield 1, torch.cat(rs_all), torch.cat(idx_all), torch.cat(d_all)



def compact_diff(pidx: torch.Tensor, coord: torch.Tensor, shifts: torch.Tensor):
    """Displacements from the compact geometry (``batch_neighbors(images=True)``), bitwise.

    pidx: B x nloc x nnei (any int dtype; s*nloc + j, padding = the centre atom itself with the
    zero shift, s = 0, j = i, whose displacement is then exactly +0), coord: B x nloc x 3,
    shifts: B x nshift x 3 (float64; the zero shift first). Returns the flat neighbour index
    ``jf`` (B x nloc x nnei, int64, b*nloc + j) and ``diff = (shift_s + r_j) - r_i`` in float64:
    the same two IEEE additions, in the same order, as batch_neighbors (``ext = shifts + coord``,
    ``d = ext - coord_i``), so the result equals the stored on-the-fly diff bit for bit. Pure
    gathers + elementwise ops (coordinates are data: no gradient), for Inductor to fuse.
    """
    B, nloc = coord.shape[0], coord.shape[1]
    nsh = shifts.shape[1]
    p = pidx.long()
    s = torch.div(p, nloc, rounding_mode="floor")
    j = p - s * nloc
    b = torch.arange(B, device=p.device).view(B, 1, 1)
    jf = j + b * nloc
    rj = coord.reshape(B * nloc, 3)[jf]
    sh = shifts.reshape(B * nsh, 3)[s + b * nsh]
    return jf, (sh + rj) - coord[:, :, None, :]


def env_and_jacobian(
    diff: torch.Tensor,
    mask: torch.Tensor,
    center_type: torch.Tensor,
    davg: torch.Tensor,
    dstd: torch.Tensor,
    rcut: float,
    rcut_smth: float,
    protection: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R~ (... x nloc x nnei x 4) and dR~/d diff (... x nnei x 4 x 3), float64.

    center_type: (... x nloc) types of the centre atoms.

    Same formula as ``deepmd.pt.model.descriptor.env_mat._make_env_mat`` followed by
    ``(env - davg[atype]) / dstd[atype]``.
    """
    diff = diff.detach().to(torch.float64).clone().requires_grad_(True)
    m = mask.unsqueeze(-1)
    length = torch.linalg.norm(diff, dim=-1, keepdim=True)
    length = length + ~m
    t0 = 1 / (length + protection)
    t1 = diff / (length + protection) ** 2
    weight = smooth_weight(length, rcut_smth, rcut) * m
    env = torch.cat([t0, t1], dim=-1) * weight
    jac = []
    for k in range(4):
        (g,) = torch.autograd.grad(env[..., k].sum(), diff, retain_graph=k < 3)
        jac.append(g)
    jac = torch.stack(jac, dim=-2)  # nloc x nnei x 4 x 3
    avg = davg.to(torch.float64).to(diff.device)[center_type]
    std = dstd.to(torch.float64).to(diff.device)[center_type]
    rt = (env.detach() - avg) / std
    jac = jac / std.unsqueeze(-1)
    jac = jac * m.unsqueeze(-1)
    return rt.detach(), jac.detach()


# ------------------------------------------------------------------ on-the-fly (closed form)
def env_closed_form(
    diff: torch.Tensor,
    avg: torch.Tensor,
    std: torch.Tensor,
    rcut: float,
    rcut_smth: float,
    protection: float = 0.0,
):
    """R~ and the factors of its analytic Jacobian, from the displacements alone.

    diff: ... x nnei x 3 (r_j - r_i; the zero vector marks a padding entry: two atoms
    never coincide); avg, std: broadcastable to ... x nnei x 4 (davg/dstd of the centre
    type). All in diff's dtype, elementwise (no autograd), so that Inductor fuses it.

    Same formula as ``env_and_jacobian`` (upstream's ``_make_env_mat`` + normalisation):
    with r = |d| (1 for padding), q = r + protection, w = sw(r) (C2 switch between
    rcut_smth and rcut, zero for padding), env = w * [1/q, d/q^2]. Its Jacobian
    d env / d d_a, n = d / r:

        d env_0 / d d_a = (w'/q - w/q^2) n_a                      = A n_a
        d env_k / d d_a = (w/q^2) delta_ka + (w'/q^2 - 2w/q^3) d_k n_a = c delta_ka + B d_k n_a

    with w' = dw/dr = -30 u^2 (u-1)^2 / (rcut - rcut_smth), u = clamp(r) scaled to [0, 1]
    (zero outside the switch band, and at its ends). Then each row k is divided by std_k.
    Returns ``rt`` (... x 4) and the factors ``(n, A, B, c, std)``, consumed by
    ``jacobian_dense`` (the explicit ... x 4 x 3 Jacobian) or ``jacobian_vjp``
    (g . dR~/dd without forming the Jacobian).
    """
    d2 = (diff * diff).sum(-1, keepdim=True)
    m = (d2 > 0).to(diff.dtype)
    length = torch.sqrt(d2) + (1 - m)  # == upstream's  norm + ~mask
    q = length + protection
    t0 = 1 / q
    t1 = diff / q**2
    h = rcut - rcut_smth
    uu = (torch.clamp(length, min=rcut_smth, max=rcut) - rcut_smth) / h
    uu2 = uu * uu
    w = (uu2 * uu * (-6 * uu2 + 15 * uu - 10) + 1) * m  # == smooth_weight(length) * mask
    dw = (-30 / h) * uu2 * (uu - 1) ** 2 * m
    env = torch.cat([t0, t1], dim=-1) * w
    rt = (env - avg) / std
    n = diff / length
    c = w * t0 * t0
    A = (dw - w * t0) * t0
    B = (dw - 2 * w * t0) * t0 * t0
    return rt, (n, A, B, c, std)


def jacobian_dense(diff: torch.Tensor, factors) -> torch.Tensor:
    """dR~/d diff (... x nnei x 4 x 3) from ``env_closed_form``'s factors (padding: zero)."""
    n, A, B, c, std = factors
    row0 = (A * n).unsqueeze(-2)  # ... x 1 x 3
    eye = torch.eye(3, dtype=diff.dtype, device=diff.device)
    rows = c.unsqueeze(-1) * eye + (B.unsqueeze(-1) * diff.unsqueeze(-1)) * n.unsqueeze(-2)
    return torch.cat([row0, rows], dim=-2) / std.unsqueeze(-1)


def jacobian_vjp(g: torch.Tensor, diff: torch.Tensor, factors) -> torch.Tensor:
    """sum_k g_k dR~_k/d diff_a (... x nnei x 3) for g = dE/dR~ (... x nnei x 4), without
    forming the Jacobian: n_a (A g0/s0 + B sum_k (g_k/s_k) d_k) + c g_a/s_a."""
    n, A, B, c, std = factors
    gs = g / std
    radial = A * gs[..., :1] + B * (gs[..., 1:] * diff).sum(-1, keepdim=True)
    return radial * n + c * gs[..., 1:]
