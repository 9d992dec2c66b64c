"""Cell lists (binning) for the neighbour search: O(N) candidates instead of all pairs.

The dense search in ``geometry.batch_neighbors`` measures every (atom, image-atom) distance of a
frame at once, nloc x (nshift * nloc) of them: 1 M for 192 water atoms, 64 M for 1,536 and 4 G
(~100 GB) for 6,144. Here the image-extended atoms are binned on a Cartesian grid of cells no
smaller than rcut, so every neighbour of atom i lies in i's cell or one of its 26 neighbours,
and each atom gets a padded candidate row of at most 27 * (most atoms in one cell) extended
indices. Rows come in chunks so that peak memory grows linearly with the atoms.

The candidates of a row are sorted by extended index (``s * nloc + j``), the order in which the
dense search sees them, so the nearest-neighbour selection that follows gets the same values in
the same relative order; distances are formed by the same IEEE operations (``ext - coord_i``),
so both searches give bit-identical lists wherever a row has no two exactly equal distances (the
order among exact ties is topk's and may differ; the neighbours kept do not) - tests/integration/
test_workload.py checks both.
"""
from __future__ import annotations

import itertools

import torch

# cells are made a hair wider than rcut, so that a pair at exactly rcut can never fall two
# cells apart through rounding in the floor() of the binning
_WIDEN = 1.0 + 1e-6
_OFFSETS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.long)


class CellGrid:
    """The extended atoms ``ext`` (next x 3) of one frame binned for queries from ``coord``."""

    def __init__(self, coord: torch.Tensor, ext: torch.Tensor, rcut: float):
        dev = ext.device
        # only extended atoms within rcut of the local atoms' bounding box can be neighbours
        self.lo = coord.min(0).values - rcut
        hi = coord.max(0).values + rcut
        keep = ((ext >= self.lo) & (ext <= hi)).all(-1)
        kept = torch.nonzero(keep).squeeze(1)  # extended indices, ascending
        self.nb = torch.clamp(torch.floor((hi - self.lo) / (rcut * _WIDEN)), min=1).long()
        self.size = (hi - self.lo) / self.nb
        b3 = self._cell_of(ext[kept])
        bid = self._flat(b3)
        order = torch.argsort(bid, stable=True)  # stable: ascending index within a cell
        self.members = kept[order]
        nbins = int(self.nb.prod())
        self.counts = torch.bincount(bid, minlength=nbins)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.width = int(self.counts.max()) if kept.numel() else 0
        self.offsets = _OFFSETS.to(dev)

    def _cell_of(self, x: torch.Tensor) -> torch.Tensor:
        b = torch.floor((x - self.lo) / self.size).long()
        return torch.minimum(torch.clamp(b, min=0), self.nb - 1)

    def _flat(self, b3: torch.Tensor) -> torch.Tensor:
        return (b3[..., 0] * self.nb[1] + b3[..., 1]) * self.nb[2] + b3[..., 2]

    def candidates(self, q: torch.Tensor) -> torch.Tensor:
        """Candidate extended indices for the query points q (R x 3): R x M, ascending, -1 last."""
        nbr = self._cell_of(q)[:, None, :] + self.offsets[None]  # R x 27 x 3
        inside = ((nbr >= 0) & (nbr < self.nb)).all(-1)
        bid = self._flat(torch.where(inside[..., None], nbr, 0))
        cnt = torch.where(inside, self.counts[bid], 0)
        m = torch.arange(self.width, device=q.device)
        ok = m < cnt[..., None]  # R x 27 x width
        pos = torch.clamp(self.starts[bid][..., None] + m, max=max(self.members.numel() - 1, 0))
        big = torch.iinfo(torch.long).max
        cand = torch.where(ok, self.members[pos], big).reshape(q.shape[0], -1)
        cand = torch.sort(cand, dim=1).values
        # drop the columns that are padding in every row
        ncol = int(ok.sum((1, 2)).max()) if q.shape[0] else 0
        cand = cand[:, :ncol]
        return torch.where(cand == big, -1, cand)


def rows_per_chunk(width: int, budget: int = 4_000_000) -> int:
    """Query rows per chunk so one chunk holds about `budget` candidate pairs."""
    return max(1, budget // max(1, 27 * width))


def nearest_in_cells(local: torch.Tensor, ext: torch.Tensor, rcut: float, k: int, *,
                     norm=torch.linalg.norm, stable: bool = False):
    """The one cell-list search of the engine and of upstream's statistics (stats.py): for the
    local atoms of one frame (nloc x 3; local atom i is extended atom i), per chunk of rows,
    (r0, rs, pos, cand, d): the k smallest distances of each row with their positions in its
    candidate row `cand` (R x M ascending extended indices, -1 = none) and the displacements
    `d` (ext - coord_i, R x M x 3) of all candidates. The atom itself is at distance -1 (first,
    as upstream's ``rr[i, i] -= 1`` on a zero), padding at +inf. Selection as upstream's: torch.topk,
    or (stable) a stable sort as its dpmodel builder."""
    dev = ext.device
    grid = CellGrid(local, ext, rcut)
    step = rows_per_chunk(grid.width)
    for r0 in range(0, local.shape[0], step):
        q = local[r0 : r0 + step]
        cand = grid.candidates(q)  # R x M, ascending extended index, -1 = none
        d = ext[torch.clamp(cand, min=0)] - q[:, None, :]
        rr = norm(d, dim=-1)
        rr = torch.where(cand < 0, torch.inf, rr)
        me = torch.arange(r0, r0 + q.shape[0], device=dev)[:, None]
        rr = torch.where(cand == me, -1.0, rr)  # self (zero shift, distance 0) sorts first
        kk = min(k, rr.shape[1])
        if stable:
            rs, pos = torch.sort(rr, dim=1, stable=True)
            rs, pos = rs[:, :kk], pos[:, :kk]
        else:
            rs, pos = torch.topk(rr, kk, largest=False)
        yield r0, rs, pos, cand, d
