"""The fused engine's analytic energy and dE/dR~: se_e2_a's descriptor and fitting written out
with their first derivatives (``analytic_nets``), so forces are an explicit first-order function
of the parameters and the training loss needs ONE ordinary autograd backward:

* per descriptor block (centre type i, neighbour type j; one embedding net each) G(s) and dG/ds,
  the contraction R~^T G, summed per atom: xyz, then D = xyz^T xyz[:, :axis];
* fitting nets forward and their VJP with unit cotangent (E = sum of atomic energies);
* the descriptor VJP, and per block dE/dR~ = G gxyz^T (+ (gG . dG/ds) on the s column).

Grouping (``DPH_FUSED_GROUPED``) picks per-block GEMM chains or all blocks at once; the batched
variant (``DPH_FUSED_BATCHED``) pads every block into one [nblocks, NA, S] layout instead.
``AnalyticEnergy`` is a mixin of ``fused.FusedEngine``: it reads the model set-up of
``prediction.Predictor`` and the nets / knobs that ``FusedEngine._init_fused`` sets.
"""
from __future__ import annotations

import torch

from . import analytic_nets
from .prediction import cat_atoms, present_types


def _sum(xs: list) -> torch.Tensor:
    """xs[0] + xs[1] + ..., left to right."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


class AnalyticEnergy:
    """Atomic energies and dE/dR~ of the fused engine (per block, grouped, or batched)."""

    def _blocks(self, tcount):
        """(atom start, natoms, type i, type j, net index) for every descriptor block."""
        out = []
        if self.tos:
            for tj in range(self.ntypes):
                out.append((0, None, None, tj, tj))
            return out
        for ti, a0, na in present_types(tcount):
            for tj in range(self.ntypes):
                out.append((a0, na, ti, tj, tj * self.ntypes + ti))
        return out

    def energy_and_grad(self, rt: torch.Tensor, tcount: list, bias: torch.Tensor):
        """Atomic energies (B x nloc, gprec) and dE/dR~ (B x nloc x nnei x 4, dprec)."""
        sec = self.sec
        blocks = self._blocks(tcount)
        # ---- R~ blocks (type_i, type_j): B x na x sel_j x 4
        rrs = [rt[:, :, sec[tj] : sec[tj + 1], :] if self.tos else rt[:, a0 : a0 + na, sec[tj] : sec[tj + 1], :]
               for (a0, na, _, tj, _) in blocks]
        nets = [k for (*_, k) in blocks]
        ctx = embs = packed = None
        if getattr(self, "kernels", False):
            # ---- Triton kernels: net + contraction on chip per block, G never in memory
            from . import embed_autograd

            packed = {k: embed_autograd.ek.pack_net(self.emb_layers[k], differentiable=True) for k in set(nets)}
            grs = [embed_autograd.contract(rr, packed[k]) for rr, k in zip(rrs, nets)]
        elif self.grouped and self.grouped_contract and len(blocks) > 1:
            # ---- nets and contraction of all blocks at once (one bmm over sub-atoms)
            grs, ctx = analytic_nets.embed_contract_grouped(rrs, [self.emb_layers[k] for k in nets])
        else:
            # ---- embedding (value + tangent) per block, or all blocks' nets grouped (see
            # _embed_blocks); contraction per block
            embs = self._embed_blocks(rrs, nets)
            grs = [analytic_nets.contract(rr.transpose(-1, -2), G) for rr, (G, _) in zip(rrs, embs)]
        desc, x1, x2 = self.descriptor_from_xyz(self._per_atom(blocks, grs))
        desc = desc.to(self.fprec)
        # ---- fitting forward + VJP (unit cotangent: E = sum of atomic energies)
        if self.fit.mixed_types:
            ae, gdesc = self._fit_mixed(desc, tcount, bias)
        else:
            ae, gdesc = self._fit_per_type(desc, tcount, bias)
        gxyz = self._descriptor_vjp(gdesc, x1, x2)
        # ---- per block: dE/dR~ (analytic_nets.env_cotangent)
        if packed is not None:
            from . import cotangent_autograd

            gbs = [cotangent_autograd.cotangent(rr, packed[k], gxyz if self.tos else gxyz[:, a0 : a0 + na])
                   for (a0, na, *_), rr, k in zip(blocks, rrs, nets)]
        elif ctx is not None:
            gbs = analytic_nets.env_grad_grouped(ctx, gxyz, [0 if self.tos else a0 for (a0, *_) in blocks])
        else:
            gbs = []
            for (a0, na, *_), rr, (G, dG) in zip(blocks, rrs, embs):
                at = slice(None) if self.tos else slice(a0, a0 + na)  # the block's centre atoms
                gbs.append(analytic_nets.env_cotangent(rr, G, dG, gxyz[:, at]))  # B na nb 4
        g = self._per_pair(blocks, gbs)
        return ae, g

    def _fit_mixed(self, desc: torch.Tensor, tcount: list, bias: torch.Tensor):
        """One fitting net for all types (fitting mixed_types): atomic energies (B x nloc) and
        d(sum of their net outputs)/d desc."""
        bae = self.fit.bias_atom_e
        types = self.atom_types(tcount, desc.device)
        y, saved = analytic_nets.mlp_forward_saved(desc, self.fit_layers[0])
        ae = (y + bae[types].to(self.fprec))[..., 0] + bias.to(self.fprec)[types]
        gdesc = analytic_nets.mlp_vjp(torch.ones_like(y), self.fit_layers[0], saved)
        return ae, gdesc

    def _fit_per_type(self, desc: torch.Tensor, tcount: list, bias: torch.Tensor):
        """One fitting net per type, each on its type's atoms (grouped: all types' nets at once,
        fit_grouped): atomic energies (B x nloc) and d(sum of the net outputs)/d desc."""
        bae = self.fit.bias_atom_e
        present = present_types(tcount)
        types = [ti for ti, _, _ in present]
        xs = [desc[:, a0 : a0 + na] for _, a0, na in present]
        if self.grouped and self.grouped_fit and len(types) > 1:
            ys, gxs = analytic_nets.fit_grouped(xs, [self.fit_layers[ti] for ti in types])
        else:
            ys, gxs = [], []
            for ti, xx in zip(types, xs):
                y, saved = analytic_nets.mlp_forward_saved(xx, self.fit_layers[ti])
                ys.append(y)
                gxs.append(analytic_nets.mlp_vjp(torch.ones_like(y), self.fit_layers[ti], saved))
        aes, gds = [], []
        for ti, y, gx in zip(types, ys, gxs):
            e = y + bae[ti].to(self.fprec)
            aes.append(e[..., 0] + bias[ti].to(e.dtype))
            gds.append(gx)
        return cat_atoms(aes), cat_atoms(gds)

    def _descriptor_vjp(self, gdesc: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """gxyz = dE/dxyz (B x nloc x 4 x ng) from gdesc = dE/dD and the descriptor's factors
        x1 = xyz^T, x2 = xyz[:, :axis] (descriptor_from_xyz)."""
        B, nloc = x1.shape[:2]
        gd = gdesc.to(self.dprec).reshape(B, nloc, self.ng, self.axis)
        gx1 = analytic_nets.contract(gd, x2.transpose(-1, -2))  # B nloc ng 4
        gx2 = analytic_nets.contract(x1.transpose(-1, -2), gd)  # B nloc 4 axis
        gxyz = gx1.transpose(-1, -2)
        return torch.cat([gxyz[..., : self.axis] + gx2, gxyz[..., self.axis :]], dim=-1) / self.nnei

    def _by_centre_type(self, blocks: list, parts: list) -> list[list]:
        """The blocks' parts[b] in runs of consecutive blocks of one centre type (_blocks' order)."""
        runs = []
        for b, ((_, _, ti, _, _), x) in enumerate(zip(blocks, parts)):
            if b == 0 or blocks[b - 1][2] != ti:
                runs.append([x])
            else:
                runs[-1].append(x)
        return runs

    def _per_atom(self, blocks: list, grs: list) -> torch.Tensor:
        """Per-atom xyz [B, nloc, 4, ng] from the blocks' contributions grs[b] (B x na x 4 x ng):
        type_one_side: every block covers all atoms, summed; else the blocks of one type_i
        (consecutive in _blocks' order) are summed and the types concatenated along the atoms."""
        if self.tos:
            return _sum(grs)
        return cat_atoms([_sum(run) for run in self._by_centre_type(blocks, grs)])

    def _per_pair(self, blocks: list, gbs: list) -> torch.Tensor:
        """dE/dR~ [B, nloc, nnei, 4] from the blocks' parts gbs[b] (B x na x sel_j x 4): the
        neighbour types of one centre type side by side, the centre types along the atoms."""
        if self.tos:
            return torch.cat(gbs, dim=2)
        return cat_atoms([torch.cat(run, dim=2) for run in self._by_centre_type(blocks, gbs)])

    def _embed_blocks(self, rrs: list, nets: list) -> list:
        """(G, dG/ds) of every descriptor block rrs[b] (B x na x sel_j x 4) through embedding net
        nets[b]: with several blocks and grouping on, one chain of batched GEMMs over all of them
        (embed_grouped_with_tangent); else one GEMM chain per block (embed_with_tangent)."""
        if self.grouped and len(rrs) > 1:
            return analytic_nets.embed_grouped_with_tangent([rr[..., :1] for rr in rrs],
                                                            [self.emb_layers[k] for k in nets])
        return [analytic_nets.embed_with_tangent(rr[..., :1], self.emb_layers[k]) for rr, k in zip(rrs, nets)]

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


    def energy_and_grad_batched(self, rt: torch.Tensor, tcount: list, bias: torch.Tensor):
        B, nloc, nnei = rt.shape[:3]
        P = self._batch_plan(tcount, rt.device)
        K, NA, S = P["K"], P["NA"], P["S"]
        rflat = torch.cat([rt.reshape(B, nloc * nnei, 4), rt.new_zeros(B, 1, 4)], dim=1)
        rr = rflat.index_select(1, P["fwd"]).reshape(B, K, NA * S, 4)
        # ---- all embedding nets at once: value + tangent, weights stacked [K, in, out]
        G, dG = analytic_nets.embed_packed_with_tangent(rr[..., :1], [self.emb_layers[k] for k in P["nets"]])  # B K R ng
        ng = G.shape[-1]
        rr5 = rr.reshape(B, K, NA, S, 4)
        G5 = G.reshape(B, K, NA, S, ng)
        gr = analytic_nets.contract(rr5.transpose(-1, -2), G5)  # B K NA 4 ng
        xyz = rt.new_zeros(B, nloc + 1, 4, ng).index_add(1, P["atom"], gr.reshape(B, K * NA, 4, ng))[:, :nloc]
        desc, x1, x2 = self.descriptor_from_xyz(xyz)
        desc = desc.to(self.fprec)
        # ---- fitting nets of all types at once (padded [T, FA] rows)
        if self.fit.mixed_types:
            ae, gdesc = self._fit_mixed(desc, tcount, bias)
        else:
            bae = self.fit.bias_atom_e
            T, FA = len(P["types"]), P["FA"]
            dpad = torch.cat([desc, desc.new_zeros(B, 1, desc.shape[-1])], dim=1).index_select(1, P["fatom"]).reshape(B, T, FA, -1)
            stk = analytic_nets.stack_layers([self.fit_layers[t_] for t_ in P["types"]])
            h, saved = analytic_nets.mlp_forward_saved_stacked(dpad, stk)
            tix = torch.tensor(P["types"], device=rt.device)
            e = h[..., 0] + bae.index_select(0, tix).to(self.fprec)[:, :1].reshape(1, T, 1) + bias.index_select(0, tix).to(self.fprec).reshape(1, T, 1)
            ae = e.reshape(B, T * FA).index_select(1, P["finv"])
            gy = analytic_nets.mlp_vjp_stacked(torch.ones_like(h), stk, saved)
            gdesc = gy.reshape(B, T * FA, -1).index_select(1, P["finv"])
        # ---- descriptor VJP
        gxyz = self._descriptor_vjp(gdesc, x1, x2)
        gpad = torch.cat([gxyz, gxyz.new_zeros(B, 1, 4, ng)], dim=1).index_select(1, P["atom"]).reshape(B, K, NA, 4, ng)
        gpad_r = analytic_nets.env_cotangent(rr5, G5, dG.reshape(B, K, NA, S, ng), gpad).reshape(B, K * NA * S, 4)
        g = gpad_r.index_select(1, P["inv"]).reshape(B, nloc, nnei, 4)
        return ae, g
