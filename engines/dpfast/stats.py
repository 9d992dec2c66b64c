"""Upstream's neighbour lists through cell lists, for the parts of ``dp --pt train`` the engine
does not replace: the descriptor's input statistics (davg/dstd, trainer init) and the
validation forward of the training loop.

Both build their list with an all-pairs distance matrix (nf x nloc x nall): upstream's
``build_neighbor_list`` in ``deepmd.dpmodel.utils.nlist`` (statistics: EnvMatStatSe.iter) and in
``deepmd.pt.utils.nlist`` (the model's forward). At 12,288 water atoms (nall = 27 x nloc) that
is ~1 TB, the CUDA OOM that stopped the 4x4x4 sweep before the engine ran. ``install()``
replaces those two module functions (through ``harness.core.rebind``, which records it) to ``build_neighbor_list_dpmodel`` / ``_pt``: upstream's
own normalisation and ghost extension stay (linear in atoms), only the list is searched
with the engine's own cell-list search (``cells.nearest_in_cells``, the one geometry uses too), one frame and a bounded chunk of centre rows
at a time, so peak memory grows linearly with the atoms. Frames small enough for the all-pairs
matrix (``DENSE_LIMIT``, the engine's own switch) still go to upstream's builders.

Same list as upstream's, in upstream's conventions (indices into upstream's extended atoms,
per-type blocks of width sel[t], -1 padding, virtual atoms masked): the candidates of a row
are every extended atom within rcut (cells are no smaller than rcut), in ascending extended
index, with distances formed by the same ops (``ext_j - ext_i``, the same norm, self at -1).
The dpmodel path selects with a stable sort as upstream's does, so its list is bitwise
upstream's; the pt path uses topk as upstream's does: the same list except, possibly, the
order among exactly equal distances.
"""
from __future__ import annotations

from typing import Any

import torch

from harness.core import rebind

from .cells import nearest_in_cells
from .geometry import DENSE_MAX_PAIRS

# frames whose all-pairs matrix (nloc x nall) stays below this go to upstream's own builder, so
# small systems (192 water atoms: 1 M) keep upstream's code bit for bit; tests lower it to 0
DENSE_LIMIT = DENSE_MAX_PAIRS
BY = "dpfast.stats"  # the installer's name in the rebind log (and the run record)


def _nearest_rows(ext: torch.Tensor, nloc: int, rcut: float, nsel: int, norm, stable: bool) -> torch.Tensor:
    """One frame: extended indices (nloc x nsel, -1 = none) of each local atom's nsel nearest
    extended atoms within rcut, nearest first, as upstream's build_neighbor_list selects them
    before it splits types."""
    out = torch.full((nloc, nsel), -1, dtype=torch.int64, device=ext.device)
    if nloc == 0 or nsel == 0:
        return out
    for r0, rs, pos, cand, _ in nearest_in_cells(ext[:nloc], ext, rcut, nsel + 1, norm=norm, stable=stable):
        idx = torch.gather(cand, 1, pos)[:, 1:]
        idx = torch.where(rs[:, 1:] > rcut, -1, idx)  # also drops the inf padding
        out[r0 : r0 + idx.shape[0], : idx.shape[1]] = idx
    return out


def _distinguish_types(nlist: torch.Tensor, atype: torch.Tensor, sel: list[int]) -> torch.Tensor:
    """Upstream's nlist_distinguish_types (a stable partition of each row by neighbour type),
    without its nf x nloc x nall tile of the types."""
    mask = nlist < 0
    tn = torch.gather(atype, 1, torch.clamp(nlist, min=0).reshape(nlist.shape[0], -1)).reshape(nlist.shape)
    tn = tn.masked_fill(mask, -1)
    blocks = []
    for t, st in enumerate(sel):
        pick = (tn == t).to(torch.int32)
        pick, imap = torch.sort(pick, dim=-1, descending=True, stable=True)
        block = torch.gather(nlist, 2, imap).masked_fill(~pick.to(torch.bool), -1)
        blocks.append(block[..., :st])
    return torch.cat(blocks, dim=-1)


def cell_neighbor_list(coord, atype, nloc: int, rcut: float, sel, distinguish_types: bool = True,
                       *, stable: bool, norm=torch.linalg.norm) -> torch.Tensor:
    """build_neighbor_list's result (nf x nloc x nsel, int64) through cell lists.
    coord: nf x nall*3 extended coordinates (local atoms first), atype: nf x nall."""
    sel = [sel] if isinstance(sel, int) else list(sel)
    nf = coord.shape[0]
    xyz = coord.reshape(nf, -1, 3)
    is_vir = atype < 0
    if xyz.numel() > 0:
        # as upstream: virtual atoms far away, so no real atom sees them
        xyz = torch.where(is_vir[:, :, None], torch.max(coord) + 2.0 * rcut, xyz)
    nsel = sum(sel)
    rows = [_nearest_rows(xyz[f], nloc, rcut, nsel, norm, stable) for f in range(nf)]
    nlist = torch.stack(rows) if rows else torch.full((0, nloc, nsel), -1, dtype=torch.int64, device=coord.device)
    nlist = torch.where(is_vir[:, :nloc, None], -1, nlist)
    if distinguish_types:
        nlist = _distinguish_types(nlist, atype.long(), sel)
    return nlist


def _dense_is_small(coord, nloc: int) -> bool:
    nall = coord.shape[1] // 3 if coord.ndim == 2 else coord.shape[1]
    return nloc * nall <= DENSE_LIMIT


def build_neighbor_list_dpmodel(coord, atype, nloc, rcut, sel, distinguish_types=True, pair_excl=None):
    """Drop-in for deepmd.dpmodel.utils.nlist.build_neighbor_list on torch tensors (what the
    pt backend's input statistics pass); other array types go to upstream's."""
    if not isinstance(coord, torch.Tensor) or _dense_is_small(coord, nloc):
        return _upstream("deepmd.dpmodel.utils.nlist")(
            coord, atype, nloc, rcut, sel, distinguish_types=distinguish_types, pair_excl=pair_excl)
    from deepmd.dpmodel.utils.nlist import apply_pair_exclusion_nlist

    # upstream's dpmodel list: xp.linalg.vector_norm and a stable argsort
    nlist = cell_neighbor_list(coord, atype, nloc, rcut, sel, distinguish_types,
                               stable=True, norm=torch.linalg.vector_norm)
    return apply_pair_exclusion_nlist(nlist, atype, pair_excl)


def build_neighbor_list_pt(coord, atype, nloc, rcut, sel, distinguish_types=True, cap_neighbors=True):
    """Drop-in for deepmd.pt.utils.nlist.build_neighbor_list (the model forward's list)."""
    if not cap_neighbors or _dense_is_small(coord, nloc):  # cap_neighbors=False: data-sized, upstream's
        return _upstream("deepmd.pt.utils.nlist")(
            coord, atype, nloc, rcut, sel, distinguish_types=distinguish_types, cap_neighbors=cap_neighbors)
    return cell_neighbor_list(coord, atype, nloc, rcut, sel, distinguish_types, stable=False)


_TARGETS = {
    ("deepmd.dpmodel.utils.nlist", "build_neighbor_list"): build_neighbor_list_dpmodel,
    ("deepmd.pt.utils.nlist", "build_neighbor_list"): build_neighbor_list_pt,
}
_WHY = ("its all-pairs distance matrix (nf x nloc x nall) ran the 12,288-atom cell out of GPU memory: "
        "the same list through cell lists, linear in the atoms (upstream's own below DENSE_LIMIT)")


def _upstream(mod: str) -> Any:
    import importlib

    return rebind.original(importlib.import_module(mod), "build_neighbor_list")


def install() -> None:
    """Replace upstream's two all-pairs list builders by the cell-list ones (idempotent)."""
    import importlib

    for (mod, name), fn in _TARGETS.items():
        rebind.replace(importlib.import_module(mod), name, fn, by=BY, why=_WHY)


def uninstall() -> None:
    """Put upstream's builders back."""
    rebind.restore(BY)


def installed() -> bool:
    import importlib

    return any(rebind.is_replaced(importlib.import_module(mod), name) for mod, name in _TARGETS)
