"""The model half of the fast engines: energy, forces and virial of type-sorted frames from their
geometry, computed with upstream's own se_e2_a embedding / fitting networks (its nn.Parameters,
read in place), plus the geometry itself (neighbour lists, R~ and its Jacobian, per geometry mode).

``Predictor`` holds no trainer: the accuracy gate builds one from a bare model
(``for_model``), and ``graph.GraphEngine`` adds the device-resident data and the training loop to
it. Forces here come from autograd (dE/dR~, then the Jacobian); ``fused`` overrides ``predict``
with its analytic path and reuses the rest.
"""
from __future__ import annotations

from typing import Any

import torch

from . import geometry as geo
from . import options
from .analytic_nets import contract
from .options import EngineOptions
from .support import refuse

GEOM_MODES = ("precomputed", "onthefly", "compact")
# per-frame device arrays of the geometry modes (build_data keeps the mode's subset)
GEOM_KEYS = ("rt", "jac", "jidx", "diff", "pidx", "coord", "shifts")


def cat_frames(parts: list) -> torch.Tensor:
    """torch.cat over frames; per-frame shift tables may differ in length (the image range
    depends on the cell): zero rows pad them to the longest (never indexed)."""
    if parts[0].dim() == 3 and len({p.shape[1] for p in parts}) > 1:
        n = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0, 0, n - p.shape[1])) for p in parts]
    return torch.cat(parts)



def present_types(tcount) -> list[tuple[int, int, int]]:
    """(type, first atom, atom count) of every type present in a frame whose atoms are sorted by
    type (tcount atoms of each type), in type order."""
    out = []
    a0 = 0
    for ti, na in enumerate(tcount):
        if na == 0:
            continue
        out.append((ti, a0, na))
        a0 += na
    return out


def cat_atoms(parts: list) -> torch.Tensor:
    """Per-type pieces (B x na_t x ...) side by side along the atoms."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Predictor:
    """se_e2_a energy / forces / virial of upstream's model, and the geometry they start from."""

    geom_default = "precomputed"  # graph's eager step would pay extra kernels for on-the-fly

    @classmethod
    def for_model(cls, model: Any, device: torch.device | None = None,
                  opts: EngineOptions | None = None) -> "Predictor":
        """An engine of this class that can only predict (no trainer): the accuracy gate's
        same-weights parity, so the gate evaluates this variant's own forward/force code.
        Through the class's own constructor (trainer=None), never around it."""
        return cls(model=model, device=device, opts=opts)

    def __init__(self, model: Any, device: torch.device | None = None, opts: EngineOptions | None = None) -> None:
        from deepmd.pt.utils import env

        self.opts = options.current() if opts is None else opts  # the variant's manifest, typed
        self.device = torch.device(device) if device is not None else env.DEVICE
        self.cuda = self.device.type == "cuda"
        am = model.atomic_model
        self.am = am
        self.sea = am.descriptor.sea
        self.fit = am.fitting_net
        sea = self.sea
        self.ntypes = sea.ntypes
        self.sel = list(sea.sel)
        self.sec = list(sea.sec)
        self.nnei = sea.nnei
        self.rcut = float(sea.rcut)
        self.rcut_smth = float(sea.rcut_smth)
        self.protection = float(getattr(sea, "env_protection", 0.0) or 0.0)
        self.axis = sea.axis_neuron
        self.ng = sea.filter_neuron[-1]
        self.tos = sea.type_one_side
        self.dprec = sea.prec
        self.fprec = self.fit.prec
        self.gprec = env.GLOBAL_PT_FLOAT_PRECISION
        # "precomputed": R~ and dR~/dr of every training frame kept on the device;
        # "onthefly": only neighbour indices and displacements kept, R~ and its Jacobian
        # computed in the step (closed form, geometry.env_closed_form);
        # "compact": per frame the wrapped coordinates and image shift vectors (float64) and per
        # pair one int32 s*nloc + j; the step re-forms the displacements bitwise
        # (geometry.compact_diff) and continues as on-the-fly
        self.geom_mode = self.opts.geom or self.geom_default

    # ----------------------------------------------------------------- forward
    def out_bias_per_type(self) -> torch.Tensor:
        out_bias, _ = self.am._fetch_out_stat(self.am.bias_keys)
        return out_bias["energy"].reshape(self.ntypes, -1)[:, 0]

    def descriptor(self, rt: torch.Tensor, tcount: list[int]) -> torch.Tensor:
        """rt: B x nloc x nnei x 4 (atoms sorted by type, tcount atoms per type)."""
        nets = self.sea.filter_layers.networks
        if self.tos:
            xyz = None
            for tj in range(self.ntypes):
                rr = rt[:, :, self.sec[tj] : self.sec[tj + 1], :]
                gg = nets[tj](rr[..., :1])
                gr = contract(rr.transpose(-1, -2), gg)
                xyz = gr if xyz is None else xyz + gr
        else:
            parts = []
            for ti, a0, na in present_types(tcount):
                acc = None
                for tj in range(self.ntypes):
                    rr = rt[:, a0 : a0 + na, self.sec[tj] : self.sec[tj + 1], :]
                    gg = nets[tj * self.ntypes + ti](rr[..., :1])
                    gr = contract(rr.transpose(-1, -2), gg)
                    acc = gr if acc is None else acc + gr
                parts.append(acc)
            xyz = cat_atoms(parts)
        return self.descriptor_from_xyz(xyz)[0]

    def descriptor_from_xyz(self, xyz: torch.Tensor):
        """se_e2_a's descriptor D = xyz^T xyz[:, :axis] of the summed contraction xyz = R~^T G
        (B x nloc x 4 x ng, not yet / nnei): (D as B x nloc x ng*axis in the global precision,
        x1 = xyz^T, x2 = xyz[:, :axis]) (fused's descriptor VJP reuses x1 and x2)."""
        xyz = xyz / self.nnei  # B x nloc x 4 x ng
        x1 = xyz.transpose(-1, -2)  # B x nloc x ng x 4
        x2 = xyz[..., : self.axis]  # B x nloc x 4 x axis
        d = contract(x1, x2).reshape(xyz.shape[0], xyz.shape[1], self.ng * self.axis)
        return d.to(self.gprec), x1, x2

    def atom_types(self, tcount, device) -> torch.Tensor:
        """The type of every atom of a type-sorted frame (nloc, int64)."""
        return torch.repeat_interleave(torch.arange(self.ntypes, device=device), torch.tensor(tcount, device=device))

    def atomic_energy(self, desc: torch.Tensor, tcount: list[int], bias: torch.Tensor) -> torch.Tensor:
        xx = desc.to(self.fprec)
        nets = self.fit.filter_layers.networks
        bae = self.fit.bias_atom_e
        if self.fit.mixed_types:
            types = self.atom_types(tcount, xx.device)
            e = nets[0](xx) + bae[types].to(self.fprec)
            e = e[..., 0] + bias.to(e.dtype)[types]
            return e
        parts = []
        for ti, a0, na in present_types(tcount):
            e = nets[ti](xx[:, a0 : a0 + na]) + bae[ti].to(self.fprec)
            e = e[..., 0] + bias[ti].to(e.dtype)
            parts.append(e)
        return cat_atoms(parts)

    def predict(
        self,
        rt: torch.Tensor | None,
        jac: torch.Tensor | None,
        jidx: torch.Tensor,
        diff: torch.Tensor | None,
        tcount: list[int],
        bias: torch.Tensor,
        create_graph: bool,
        virial: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Energy (B x 1), force (B x nloc x 3), virial (B x 9).

        rt/jac: precomputed R~ and dR~/dr, or None (on-the-fly mode: both from diff).
        jidx: B x nloc*nnei, neighbour index flattened over the batch (b*nloc + j).
        virial: None = when diff is given and the engine needs it (see want_virial).
        """
        virial = self.want_virial(diff, virial)
        rt, factors, jidx, diff = self.env_for_step(rt, jidx, diff, tcount)
        if not rt.requires_grad:
            rt = rt.detach().requires_grad_(True)
        desc = self.descriptor(rt, tcount)
        ae = self.atomic_energy(desc, tcount, bias)  # B x nloc
        energy = ae.to(self.gprec).sum(dim=1, keepdim=True)
        (g,) = torch.autograd.grad(energy.sum(), rt, create_graph=create_graph)
        return self.forces_from_env_grad(energy, g, jac, factors, jidx, diff, virial)

    def env_for_step(self, rt, jidx, diff, tcount):
        """(rt, factors, jidx, diff) for a step: compact mode's diff formed from its packed index;
        without a precomputed rt, R~ and the factors of its closed-form Jacobian from diff."""
        jidx, diff = self.expand_geom(jidx, diff)
        factors = None
        if rt is None:
            rt, factors = self.env_from_diff(diff, tcount)
        return rt, factors, jidx, diff

    def forces_from_env_grad(self, energy, g, jac, factors, jidx, diff, virial: bool):
        """Forces (and the virial when asked) from g = dE/dR~, through the precomputed Jacobian
        or, on the fly, through the closed-form Jacobian's VJP."""
        vd = diff if virial else None
        if factors is not None:
            return self.forces_from_pair_grad(energy, geo.jacobian_vjp(g, diff, factors), jidx, vd)
        return self.forces_from_grad(energy, g, jac, jidx, vd)

    def expand_geom(self, jidx, diff):
        """Compact mode: (packed index, (coord, shifts)) -> (flat neighbour index, diff in the
        model precision), formed in float64 exactly as the stored on-the-fly diff (then rounded
        like it). Other modes: unchanged."""
        if isinstance(diff, tuple):
            jf, d = geo.compact_diff(jidx, diff[0], diff[1])
            return jf, d.to(self.dprec)
        return jidx, diff

    def step_geometry(self, geom: dict):
        """(rt, jac, jidx, diff) as predict takes them, from per-frame geometry arrays of the batch
        (gather's index_select of the stored ones, or frames_geometry's): jidx gets the batch
        offsets b*nloc; compact mode passes the packed index and (coord, shifts) instead."""
        if self.geom_mode == "compact":
            return None, None, geom["pidx"], (geom["coord"], geom["shifts"])
        jidx = geom["jidx"].long()
        B, nloc = jidx.shape[0], jidx.shape[1]
        jidx = jidx + (torch.arange(B, device=jidx.device) * nloc)[:, None, None]
        return geom.get("rt"), geom.get("jac"), jidx, geom.get("diff")

    def want_virial(self, diff, virial: bool | None) -> bool:
        if virial is None:
            virial = getattr(self, "need_virial", True)
        return bool(virial) and diff is not None

    def center_stats(self, tcount, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """davg, dstd of every (type-sorted) centre atom: nloc x nnei x 4 (device ops on the
        constant buffers only: capturable, and constant-folded by Inductor)."""
        avg, std = [], []
        for t, na in enumerate(tcount):
            if na:
                avg.append(self.sea.mean[t : t + 1].expand(na, -1, -1))
                std.append(self.sea.stddev[t : t + 1].expand(na, -1, -1))
        return torch.cat(avg).to(dtype), torch.cat(std).to(dtype)

    def env_from_diff(self, diff: torch.Tensor, tcount):
        """On-the-fly R~ (B x nloc x nnei x 4) and the factors of its closed-form Jacobian."""
        avg, std = self.center_stats(tcount, diff.dtype)
        return geo.env_closed_form(diff, avg, std, self.rcut, self.rcut_smth, self.protection)

    def forces_from_grad(self, energy, g, jac, jidx, diff) -> dict[str, torch.Tensor]:
        """Energy, forces and virial from g = dE/dR~ (B x nloc x nnei x 4), however g was obtained:
        F_i = -dE/dr_i through the precomputed Jacobian, scattered to both atoms of each pair."""
        # dE/d(r_j - r_i) for every pair: B x nloc x nnei x 3
        gd = contract(g.unsqueeze(-2), jac).squeeze(-2)
        return self.forces_from_pair_grad(energy, gd, jidx, diff)

    def forces_from_pair_grad(self, energy, gd, jidx, diff) -> dict[str, torch.Tensor]:
        """gd = dE/d(r_j - r_i) (B x nloc x nnei x 3): forces on both atoms of each pair; the virial
        when diff is given."""
        B, nloc = gd.shape[:2]
        gd = gd.to(self.gprec)
        fi = gd.sum(dim=2).reshape(B * nloc, 3)
        fj = torch.zeros_like(fi).index_add(0, jidx.reshape(-1), gd.reshape(-1, 3))
        force = (fi - fj).reshape(B, nloc, 3)
        out = {"energy": energy, "force": force}
        if diff is not None:
            # virial_ab = - sum_pairs d_a * dE/dd_b
            vir = -torch.einsum("bnka,bnkc->bac", diff.to(self.gprec), gd)
            out["virial"] = vir.reshape(B, 9)
        return out

    # ------------------------------------------------------------- geometry
    def frames_geometry(self, coord: torch.Tensor, atype: torch.Tensor, box: torch.Tensor | None, chunk: int = 64,
                        env: bool | None = None, compact: bool | None = None, only=None):
        """Geometry of F frames of one composition (atype: nloc, sorted): neighbour index
        ``jidx`` (int32, padding -> the centre atom itself) and displacements ``diff`` (padding:
        zero vector), plus ``rt``/``jac`` when env (default: precomputed mode), plus when compact
        (default: compact mode) ``pidx`` (int32 s*nloc + j, padding -> the centre atom with the
        zero shift), ``coord`` (wrapped, float64) and ``shifts`` (float64 image shift vectors).
        only: keep just these keys (build_data: compact mode then never holds a system's
        displacements on the device)."""
        if env is None:
            env = self.geom_mode == "precomputed"
        if compact is None:
            compact = self.geom_mode == "compact"
        dev = self.device
        coord = coord.reshape(coord.shape[0], -1, 3)
        nf, nloc = coord.shape[:2]
        at = atype.reshape(-1).to(dev).long()
        out = {"jidx": [], "diff": []}
        if env:
            out.update(rt=[], jac=[])
        if compact:
            out.update(pidx=[], coord=[], shifts=[])
        for f0 in range(0, nf, chunk):
            c = coord[f0 : f0 + chunk].to(dev)
            bx = None if box is None else box.reshape(nf, 9)[f0 : f0 + chunk].to(dev)
            jloc, diff, mask, *img = geo.batch_neighbors(c, at, bx, self.rcut, self.sel, images=compact)
            if env:
                rt, jac = geo.env_and_jacobian(
                    diff, mask, at[None, :].expand(c.shape[0], nloc), self.sea.mean, self.sea.stddev,
                    self.rcut, self.rcut_smth, self.protection,
                )
                out["rt"].append(rt.to(self.dprec))
                out["jac"].append(jac.to(self.dprec))
            self_idx = torch.arange(nloc, device=dev)[None, :, None].expand_as(jloc)
            for k, v in (("jidx", lambda: torch.where(mask, jloc, self_idx).to(torch.int32)),
                         ("diff", lambda: diff.to(self.dprec))):
                if only is None or k in only:
                    out[k].append(v())
            if compact:
                im = img[0]
                nsh = im["shifts"].shape[1]
                if nsh * nloc >= 2**31:
                    refuse(f"compact geometry: {nsh} image shifts x {nloc} atoms overflow int32")
                out["pidx"].append(torch.where(mask, im["pidx"], self_idx).to(torch.int32))
                out["coord"].append(im["coord"])  # float64 whatever the model precision
                out["shifts"].append(im["shifts"])
        return {k: cat_frames(v) for k, v in out.items() if only is None or k in only}

    def predict_frames(self, coord, atype, box, need_virial=True):
        """Test helper: predictions for frames of one composition (coord nf x nloc x 3)."""
        coord = coord.reshape(coord.shape[0], -1, 3)
        nf, nloc = coord.shape[:2]
        at = atype.reshape(-1, nloc)[0]
        if not bool((at[1:] >= at[:-1]).all()):
            raise ValueError("atoms must be sorted by type")
        tcount = [int((at == t).sum()) for t in range(self.ntypes)]
        geom = self.frames_geometry(coord, at, box)
        rt, jac, jidx, diff = self.step_geometry(geom)
        return self.predict(
            rt, jac, jidx, diff,
            tcount, self.out_bias_per_type().to(self.device), create_graph=False, virial=need_virial,
        )
