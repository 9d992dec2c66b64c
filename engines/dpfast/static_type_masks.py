"""Static shapes for any type layout, for the ``compile`` engine's trace (upstream_compile):
upstream's se_e2_a block forward with its per-centre-type boolean indexing replaced by an exactly
equivalent multiply with the type mask, put on one block instance while make_fx traces it."""
from __future__ import annotations

import contextlib
import types

import torch

from harness.core import rebind

from deepmd.pt.model.descriptor import se_a as _se_a

BY = "dpfast.upstream_compile.trace"

BLOCK = _se_a.DescrptBlockSeA


def _masked_block_forward(self, nlist, extended_coord, extended_atype, extended_atype_embd=None,
                          mapping=None, type_embedding=None):
    """Upstream's DescrptBlockSeA.forward (3.2.0, non-compressed, type_one_side false) with the
    per-centre-type boolean indexing replaced by a multiply with the type mask; used only while
    make_fx traces (see `_static_type_masks`), never on upstream's eager path.

    Upstream, for each network (centre type ti, neighbour type ii) in `filter_layers.networks`
    order, evaluates the network on the rows of type ti only (`dmatrix[ti_mask, ...]`) and does
    `xyz_scatter[ti_mask] += gr`; the shapes of those selections depend on the atom types, which
    the compiler cannot take in one graph for all type layouts. Here every network runs on all
    nf*nloc rows and `xyz_scatter += gr * (atype == ti)`. This is exactly upstream's value:
    * each row's own-type terms are multiplied by 1.0 (exact), the others by 0.0, giving (+/-)0
      (the terms are finite: a tanh network of the finite, env-protected dmatrix);
    * x + (+/-)0 == x exactly, so a row only changes at its own type's networks, and those are
      added in the same network order (ii = 0, 1, ... for its ti) as upstream's `+=` adds them,
      starting from the same zeros;
    * rr, ss, gg, gr of a row are computed from that row alone (row-wise network and batched
      matmul), so its values do not depend on which other rows are in the batch.
    The derivatives through the mask are zero for the other rows, so they add exact zeros to the
    coordinate gradient as well. The price: every network sees all centre atoms, i.e. ntypes
    times upstream's embedding work (upstream runs each centre atom through ntypes networks,
    this runs it through ntypes**2).
    Everything else (prod_env_mat, exclusion mask, the scaling and the final contractions) is
    upstream's code, with upstream's helper calls.
    """
    if self.type_one_side or self.compress or type_embedding is not None:
        return _upstream_block_forward(self, nlist, extended_coord, extended_atype,
                                       extended_atype_embd, mapping, type_embedding)
    del extended_atype_embd, mapping
    nf = nlist.shape[0]
    nloc = nlist.shape[1]
    atype = extended_atype[:, :nloc]
    dmatrix, diff, sw = _se_a.prod_env_mat(
        extended_coord,
        nlist,
        atype,
        self.mean,
        self.stddev,
        self.rcut,
        self.rcut_smth,
        protection=self.env_protection,
    )
    dmatrix = dmatrix.view(-1, self.nnei, 4)
    nfnl = dmatrix.shape[0]
    xyz_scatter = torch.zeros(
        [nfnl, 4, self.filter_neuron[-1]],
        dtype=self.prec,
        device=extended_coord.device,
    )
    # nfnl x nnei
    exclude_mask = self.emask(nlist, extended_atype).view(nfnl, self.nnei)
    flat_atype = atype.ravel()
    for embedding_idx, ll in enumerate(self.filter_layers.networks):
        # ti: center atom type, ii: neighbor type (upstream's numbering)
        ii = embedding_idx // self.ntypes
        ti = embedding_idx % self.ntypes
        # nfnl x nt: all rows (upstream: the rows of type ti)
        mm = exclude_mask[:, self.sec[ii] : self.sec[ii + 1]]
        # nfnl x nt x 4
        rr = dmatrix[:, self.sec[ii] : self.sec[ii + 1], :]
        rr = rr * mm[:, :, None]
        ss = rr[:, :, :1]
        # nfnl x nt x ng
        gg = ll.forward(ss)
        # nfnl x 4 x ng
        gr = torch.matmul(rr.permute(0, 2, 1), gg)
        # upstream: xyz_scatter[ti_mask] += gr
        xyz_scatter += gr * flat_atype.eq(ti).to(gr.dtype)[:, None, None]

    xyz_scatter /= self.nnei
    xyz_scatter_1 = xyz_scatter.permute(0, 2, 1)
    rot_mat = xyz_scatter_1[:, :, 1:4]
    xyz_scatter_2 = xyz_scatter[:, :, 0 : self.axis_neuron]
    result = torch.matmul(xyz_scatter_1, xyz_scatter_2)
    result = result.view(nf, nloc, self.filter_neuron[-1] * self.axis_neuron)
    rot_mat = rot_mat.view([nf, nloc] + list(rot_mat.shape[1:]))  # noqa:RUF005
    return (result, rot_mat, None, None, sw)


_upstream_block_forward = BLOCK.forward


@contextlib.contextmanager
def static_type_masks(block):
    """While tracing: this model's se_e2_a block runs `_masked_block_forward` (an instance
    attribute through harness.core.rebind, so no other model and no eager call is affected);
    removed afterwards."""
    rebind.replace(block, "forward", types.MethodType(_masked_block_forward, block), by=BY,
                   why="while make_fx traces the compile engine's graph: se_e2_a's per-centre-type "
                       "boolean indexing as an exactly equal multiply with the type mask (static shapes)")
    try:
        yield
    finally:
        rebind.restore(BY)
