"""Training engine of the ``graph`` variant.

Upstream (``deepmd.pt.train.training.Trainer``) builds everything: model with its
statistics, loss, learning-rate schedule, optimizer settings and data. This engine
replaces only the training loop:

* all training frames live on the device, with their neighbour list, normalised
  environment matrix R~ and its Jacobian dR~/dr precomputed once (frames never move
  during training; davg/dstd are constant buffers);
* a batch is sampled on the device (system by upstream's sampler weights, frame
  uniform within the system), gathered into static buffers;
* energy = upstream's own embedding / fitting networks applied to R~ (functional
  descriptor assembly reading upstream's nn.Parameters), forces
  F = -sum (dE/dR~) (dR~/dr) scattered to atoms i and j, virial from the same pieces;
* the loss is upstream's own loss module, called on these predictions with the
  learning rate as a device tensor;
* on CUDA the whole step (sampling, forward, forces, loss, backward, Adam step,
  LR update) is captured in one CUDA graph per shape group and replayed.
"""
from __future__ import annotations

import logging
import os

import time
from typing import Any

import numpy as np
import torch

from . import flat_optim
from . import geometry as geo

log = logging.getLogger("deepmd.graph")


_MUL_FUNCS = (torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch._C.TensorBase.mul, torch.mul)


class F32Flag:
    """A label-availability flag (find_*) that behaves like upstream's np.float32 one.

    Upstream's batches carry ``find_energy`` etc. as ``np.float32``; the loss computes
    ``pref = pref * find`` so its prefactors end up rounded to float32. With the
    learning rate as a device tensor the same product would stay float64, so this
    flag rounds through float32 explicitly (a device op, capturable) to give the
    very same prefactor values as upstream. ``bool(flag)`` works like upstream's.
    """

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def __rmul__(self, other):
        if torch.is_tensor(other):
            return (other * self.value).to(torch.float32).to(other.dtype)
        return other * np.float32(self.value)

    __mul__ = __rmul__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``tensor * flag`` reaches the flag through torch's __torch_function__ protocol (the
        same product as __rmul__). Eager results are unchanged; it lets dynamo trace upstream's
        ``pref_e * find_energy`` instead of breaking the graph there ("Failed to convert
        args/kwargs to proxy": dynamo does not model Tensor.__mul__ -> NotImplemented -> __rmul__),
        so fused's compiled whole step (DPH_FUSED_COMPILE_STEP) keeps the loss in one graph."""
        if func in _MUL_FUNCS and not kwargs and len(args) == 2:
            a, b = args
            flag, other = (b, a) if isinstance(b, F32Flag) else (a, b)
            if isinstance(flag, F32Flag) and torch.is_tensor(other):
                return flag.__rmul__(other)
        return NotImplemented

    def __bool__(self) -> bool:
        return bool(self.value)

    def __float__(self) -> float:
        return self.value

    def __eq__(self, other) -> bool:
        return float(self) == float(other)

    __hash__ = None


class Unsupported(RuntimeError):
    pass


def _refuse(msg: str) -> None:
    raise Unsupported(f"graph variant: unsupported input: {msg}")


# --------------------------------------------------------------------------- checks
def check_supported(tr: Any) -> None:
    from deepmd.pt.loss import EnergyStdLoss
    from deepmd.pt.model.descriptor.se_a import DescrptSeA

    if tr.multi_task:
        _refuse("multi-task training")
    if tr.world_size > 1 and not tr.is_distributed:
        _refuse("world_size > 1 without torch.distributed")
    if tr.opt_type not in ("Adam", "AdamW"):
        _refuse(f"optimizer {tr.opt_type} (only Adam/AdamW)")
    if tr.enable_ema:
        _refuse("training.enable_ema")
    if tr.gradient_max_norm and tr.gradient_max_norm > 0:
        _refuse("training.gradient_max_norm")
    if tr.disp_avg:
        _refuse("training.disp_avg")
    if tr.change_bias_after_training:
        _refuse("training.change_bias_after_training")
    if tr.has_min_pair_filter:
        _refuse("training_data.min_pair_dist")
    if tr.sharding.enabled:
        _refuse("training.zero_stage")
    if tr.full_validator is not None:
        _refuse("validating.full_validation")
    if tr.enable_tensorboard or tr.enable_profiler or tr.profiling:
        _refuse("tensorboard/profiler")
    if getattr(tr, "_lora_enabled", False):
        _refuse("LoRA")
    ds = tr.training_dataloader.dataset
    if not hasattr(ds, "systems"):
        _refuse("non-npy (e.g. LMDB) training data")
    loss = tr.loss
    if type(loss) is not EnergyStdLoss:
        _refuse(f"loss {type(loss).__name__} (only 'ener')")
    if loss.has_ae or loss.has_pf or loss.has_gf or loss.has_h:
        _refuse("loss terms other than energy/force/virial")
    if loss.relative_f is not None or loss.enable_atom_ener_coeff:
        _refuse("loss relative_f / enable_atom_ener_coeff")
    model = tr.model
    am = getattr(model, "atomic_model", None)
    if am is None or type(am).__name__ != "DPEnergyAtomicModel":
        _refuse(f"model {type(model).__name__} (only standard energy model)")
    if type(model).__name__ not in ("EnergyModel",):
        _refuse(f"model {type(model).__name__} (only standard energy model)")
    desc = am.descriptor
    if type(desc) is not DescrptSeA:
        _refuse(f"descriptor {type(desc).__name__} (only se_e2_a)")
    sea = desc.sea
    if sea.compress:
        _refuse("compressed descriptor")
    if list(sea.exclude_types):
        _refuse("descriptor exclude_types")
    if getattr(am, "pair_excl", None) is not None or getattr(am, "atom_excl", None) is not None:
        _refuse("pair/atom exclude types")
    if getattr(sea, "env_protection", 0.0) not in (0.0, None) and False:
        pass
    fit = am.fitting_net
    if type(fit).__name__ != "EnergyFittingNet":
        _refuse(f"fitting {type(fit).__name__}")
    if fit.numb_fparam > 0 or fit.numb_aparam > 0 or fit.dim_case_embd > 0:
        _refuse("fparam/aparam/case embedding")
    if fit.remove_vaccum_contribution is not None:
        _refuse("fitting remove_vaccum_contribution (atom_ener)")
    if list(getattr(fit, "exclude_types", []) or []):
        _refuse("fitting exclude_types")
    if getattr(model, "has_spin", False) is True:
        _refuse("spin")


# --------------------------------------------------------------------------- data
class Group:
    """Frames sharing one shape (per-type atom counts, batch size, label flags)."""

    def __init__(self) -> None:
        self.systems: list[int] = []
        self.sys_prob: list[float] = []
        self.frames: list[dict] = []  # filled during build
        self.nframes_sys: list[int] = []


class _DDPRemoved(torch.nn.Module):
    """Stands where upstream's DDP wrapper stood, so `trainer._get_inner_module()` (save_model,
    validation) still finds the model at `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _drop_ddp(trainer: Any) -> None:
    """Data parallel: the engine averages the flat gradient itself and never calls DDP's forward,
    but DDP's reducer keeps every parameter's AccumulateGrad node alive, created on the default
    stream when upstream built DDP. Autograd then syncs the capture stream with the default
    stream and invalidates the CUDA-graph capture (seen on H200: cudaErrorStreamCaptureInvalidated
    after "The AccumulateGrad node's stream does not match ..."). So DDP goes, its model stays."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    w = getattr(trainer, "wrapper", None)
    if isinstance(w, DistributedDataParallel):
        trainer.wrapper = _DDPRemoved(w.module)
        del w
        gc.collect()
        log.info("graph: upstream's DDP wrapper dropped (the engine all-reduces the flat gradient itself)")


GEOM_MODES = ("precomputed", "onthefly", "compact")
# per-frame device arrays of the geometry modes (build_data keeps the mode's subset)
GEOM_KEYS = ("rt", "jac", "jidx", "diff", "pidx", "coord", "shifts")


def _cat_frames(parts: list) -> torch.Tensor:
    """torch.cat over frames; per-frame shift tables may differ in length (the image range
    depends on the cell): zero rows pad them to the longest (never indexed)."""
    if parts[0].dim() == 3 and len({p.shape[1] for p in parts}) > 1:
        n = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, 0, 0, n - p.shape[1])) for p in parts]
    return torch.cat(parts)


class GraphEngine:
    geom_default = "precomputed"  # graph's eager step would pay extra kernels for on-the-fly

    def __init__(self, trainer: Any, device: torch.device | None = None) -> None:
        check_supported(trainer)
        self.tr = trainer
        _drop_ddp(trainer)
        self._init_model(trainer.model, device)
        self.loss = trainer.loss
        self.params = list(trainer.wrapper.parameters())
        self._upstream_opt = trainer.optimizer
        # data parallel: torch.distributed was initialised by upstream's `dp --pt train` (torchrun
        # sets LOCAL_RANK); its DDP wrapper is gone (_drop_ddp) and the engine averages the flat
        # gradient itself.
        self.rank = int(getattr(trainer, "rank", 0) or 0)
        self.world_size = int(getattr(trainer, "world_size", 1) or 1)
        self.distributed = bool(getattr(trainer, "is_distributed", False)) and self.world_size > 1
        self._build_lr_table()

    @classmethod
    def for_model(cls, model: Any, device: torch.device | None = None) -> "GraphEngine":
        """An engine that can only predict (no trainer): used by the accuracy gate's
        same-weights parity, so the gate evaluates this variant's own forward/force code."""
        eng = cls.__new__(cls)
        eng._init_model(model, device)
        return eng

    def _init_model(self, model: Any, device: torch.device | None) -> None:
        from deepmd.pt.utils import env

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
        self.geom_mode = os.environ.get("DPH_GEOM", self.geom_default)
        if self.geom_mode not in GEOM_MODES:
            raise ValueError(f"DPH_GEOM={self.geom_mode!r} ({' | '.join(GEOM_MODES)})")

    # ----------------------------------------------------------------- forward
    def out_bias_per_type(self) -> torch.Tensor:
        out_bias, _ = self.am._fetch_out_stat(self.am.bias_keys)
        return out_bias["energy"].reshape(self.ntypes, -1)[:, 0]

    def descriptor(self, rt: torch.Tensor, tcount: list[int]) -> torch.Tensor:
        """rt: B x nloc x nnei x 4 (atoms sorted by type, tcount atoms per type)."""
        B, nloc = rt.shape[0], rt.shape[1]
        nets = self.sea.filter_layers.networks
        ng = self.ng
        if self.tos:
            xyz = None
            for tj in range(self.ntypes):
                rr = rt[:, :, self.sec[tj] : self.sec[tj + 1], :]
                gg = nets[tj](rr[..., :1])
                gr = torch.matmul(rr.transpose(-1, -2), gg)
                xyz = gr if xyz is None else xyz + gr
        else:
            parts = []
            a0 = 0
            for ti in range(self.ntypes):
                na = tcount[ti]
                if na == 0:
                    continue
                acc = None
                for tj in range(self.ntypes):
                    rr = rt[:, a0 : a0 + na, self.sec[tj] : self.sec[tj + 1], :]
                    gg = nets[tj * self.ntypes + ti](rr[..., :1])
                    gr = torch.matmul(rr.transpose(-1, -2), gg)
                    acc = gr if acc is None else acc + gr
                parts.append(acc)
                a0 += na
            xyz = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        xyz = xyz / self.nnei  # B x nloc x 4 x ng
        x1 = xyz.transpose(-1, -2)  # B x nloc x ng x 4
        x2 = xyz[..., : self.axis]  # B x nloc x 4 x axis
        d = torch.matmul(x1, x2).reshape(B, nloc, ng * self.axis)
        return d.to(self.gprec)

    def atomic_energy(self, desc: torch.Tensor, tcount: list[int], bias: torch.Tensor) -> torch.Tensor:
        xx = desc.to(self.fprec)
        nets = self.fit.filter_layers.networks
        bae = self.fit.bias_atom_e
        if self.fit.mixed_types:
            types = torch.repeat_interleave(
                torch.arange(self.ntypes, device=xx.device), torch.tensor(tcount, device=xx.device)
            )
            e = nets[0](xx) + bae[types].to(self.fprec)
            e = e[..., 0] + bias.to(e.dtype)[types]
            return e
        parts = []
        a0 = 0
        for ti in range(self.ntypes):
            na = tcount[ti]
            if na == 0:
                continue
            e = nets[ti](xx[:, a0 : a0 + na]) + bae[ti].to(self.fprec)
            e = e[..., 0] + bias[ti].to(e.dtype)
            parts.append(e)
            a0 += na
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

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
        gd = torch.matmul(g.unsqueeze(-2), jac).squeeze(-2)
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
                    _refuse(f"compact geometry: {nsh} image shifts x {nloc} atoms overflow int32")
                out["pidx"].append(torch.where(mask, im["pidx"], self_idx).to(torch.int32))
                out["coord"].append(im["coord"])  # float64 whatever the model precision
                out["shifts"].append(im["shifts"])
        return {k: _cat_frames(v) for k, v in out.items() if only is None or k in only}

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

    # ------------------------------------------------------------------ lr
    def _build_lr_table(self) -> None:
        tr = self.tr
        base = float(tr.lr_schedule.start_lr)
        # upstream's LambdaLR: lr = base * (value(step) / base)
        self.lr_values = [base * (tr.lr_schedule.value(s) / base) for s in range(tr.num_steps)]

    # ------------------------------------------------------------------ data
    def build_data(self) -> None:
        tr = self.tr
        ds = tr.training_dataloader.dataset
        weights = tr.training_dataloader.sampler.weights.detach().cpu().numpy().astype(np.float64)
        weights = weights / weights.sum()
        self.need_virial = bool(self.loss.has_v)
        lab_keys = ["energy", "force"] + (["virial"] if self.need_virial else [])
        groups: dict[tuple, dict] = {}
        for sid, system in enumerate(ds.systems):
            if weights[sid] <= 0:
                continue
            nfr = len(system)
            bsz = int(ds.batch_sizes[sid])
            f0 = system[0]
            at = torch.as_tensor(np.asarray(f0["atype"])).long()
            if not bool((at[1:] >= at[:-1]).all()):
                _refuse("atoms not sorted by type (set sort_atoms)")
            if (at < 0).any():
                _refuse("virtual atoms / mixed_type data")
            tcount = tuple(int((at == t).sum()) for t in range(self.ntypes))
            finds = tuple(float(f0.get(f"find_{k}", 0.0)) for k in lab_keys)
            key = (tcount, bsz, finds)
            g = groups.setdefault(key, {"sids": [], "prob": [], "nfr": [], "sys": []})
            g["sids"].append(sid)
            g["prob"].append(weights[sid])
            g["nfr"].append(nfr)
            g["sys"].append(system)
        self.groups = []
        t0 = time.time()
        for key, g in groups.items():
            tcount, bsz, finds = key
            nloc = sum(tcount)
            mode = self.geom_mode
            # what stays on the device: on-the-fly mode needs diff for R~ itself; compact mode
            # re-forms diff (R~ and the virial) from coordinates, shift vectors and one int32
            if mode == "compact":
                keep = ["pidx", "coord", "shifts"]
            elif mode == "onthefly":
                keep = ["jidx", "diff"]
            else:
                keep = ["jidx"] + (["diff"] if self.need_virial else []) + ["rt", "jac"]
            parts = {k: [] for k in keep}
            labs = {k: [] for k in lab_keys}
            nframes = 0
            for system in g["sys"]:
                frs = [system[f] for f in range(len(system))]
                coord = torch.as_tensor(np.stack([np.asarray(fr["coord"]) for fr in frs]), dtype=torch.float64)
                at = torch.as_tensor(np.asarray(frs[0]["atype"])).long()
                pbc = getattr(system._data_system, "pbc", True)
                has_box = pbc and frs[0].get("box") is not None and float(frs[0].get("find_box", 1.0)) != 0.0
                box = torch.as_tensor(np.stack([np.asarray(fr["box"]) for fr in frs]), dtype=torch.float64) if has_box else None
                geom = self.frames_geometry(coord, at, box, env=mode == "precomputed", compact=mode == "compact",
                                            only=keep)
                for k in parts:
                    # staged on the host: the device then holds each array once (no
                    # per-system pieces next to their concatenation)
                    parts[k].append(geom[k].cpu())
                del geom
                shape = {"energy": (1,), "force": (nloc, 3), "virial": (9,)}
                for k in lab_keys:
                    if frs[0].get(k) is None:
                        labs[k].append(torch.zeros((len(frs),) + shape[k], dtype=self.gprec))
                    else:
                        labs[k].append(torch.as_tensor(np.stack([np.asarray(fr[k]) for fr in frs]), dtype=self.gprec).reshape((len(frs),) + shape[k]))
                nframes += len(frs)
            dev = self.device
            G = {
                "tcount": list(tcount),
                "bsz": bsz,
                "finds": dict(zip(lab_keys, finds)),
                "nloc": nloc,
                "prob": float(sum(g["prob"])),
                "labels": {k: torch.cat(v).to(dev) for k, v in labs.items()},
            }
            for k in GEOM_KEYS:
                G[k] = _cat_frames(parts.pop(k)).to(dev) if k in parts else None
            del parts
            # sampling tables: system CDF within the group, frame offsets
            p = np.asarray(g["prob"], dtype=np.float64)
            p = p / p.sum()
            cdf = np.cumsum(p)
            cdf[-1] = 1.0
            G["cdf"] = torch.tensor(cdf, dtype=torch.float64, device=dev)
            G["nfr"] = torch.tensor(g["nfr"], dtype=torch.int64, device=dev)
            G["off"] = torch.tensor(np.concatenate([[0], np.cumsum(g["nfr"])[:-1]]), dtype=torch.int64, device=dev)
            G["nfr_max"] = int(max(g["nfr"]))
            G["replace"] = bsz > min(g["nfr"])
            G["bias"] = self.out_bias_per_type().detach().to(dev)
            # the loss only reads atype >= 0 (real-atom mask): all atoms are real
            G["atype_dummy"] = torch.zeros((bsz, nloc), dtype=torch.int64, device=dev)
            G["mask"] = torch.ones((bsz, nloc), dtype=torch.int32, device=dev)
            stored = {k: G[k] for k in GEOM_KEYS if G[k] is not None}
            stored.update({f"label_{k}": v for k, v in G["labels"].items()})
            nbytes = sum(t.numel() * t.element_size() for t in stored.values())
            G["nbytes"] = nbytes
            self.groups.append(G)
            log.info(
                "graph: group types=%s batch=%d systems=%d frames=%d prob=%.4f: device-resident geometry+labels "
                "(%s mode; %s) %d bytes (%d bytes/frame)",
                list(tcount), bsz, len(g["sids"]), nframes, G["prob"], self.geom_mode, "+".join(stored),
                nbytes, nbytes // max(1, nframes),
            )
        if not self.groups:
            _refuse("no training systems")
        gp = np.array([G["prob"] for G in self.groups])
        self.group_prob = gp / gp.sum()
        log.info("graph: geometry precomputed in %.1f s", time.time() - t0)

    # ------------------------------------------------------------------ step
    def sample(self, G: dict) -> torch.Tensor:
        dev = self.device
        u = torch.rand(1, dtype=torch.float64, device=dev)
        s = torch.searchsorted(G["cdf"], u, right=True).clamp_(max=G["cdf"].shape[0] - 1)
        nfr = G["nfr"].index_select(0, s)  # 1
        off = G["off"].index_select(0, s)
        B = G["bsz"]
        if B == 1 or G["replace"]:
            r = torch.rand(B, dtype=torch.float64, device=dev)
            fi = torch.minimum((r * nfr.to(torch.float64)).long(), nfr - 1)
        else:
            keys = torch.rand(G["nfr_max"], dtype=torch.float64, device=dev)
            ar = torch.arange(G["nfr_max"], device=dev)
            keys = torch.where(ar < nfr, keys, 2.0)
            fi = torch.topk(keys, B, largest=False).indices
        return off + fi

    def gather(self, G: dict, idx: torch.Tensor):
        """The batch's geometry: rt/jac are None in on-the-fly and compact mode (predict forms
        them); compact mode gathers the frames' packed indices, coordinates and shift tables
        (predict forms diff from them: inside the compiled function in fused)."""
        sel = {k: G[k].index_select(0, idx) for k in GEOM_KEYS if G.get(k) is not None}
        rt, jac, jidx, diff = self.step_geometry(sel)
        labels = {k: v.index_select(0, idx) for k, v in G["labels"].items()}
        return rt, jac, jidx, diff, labels

    def loss_and_more(self, G: dict, pred: dict, labels: dict, lr: Any):
        label = dict(labels)
        for k, v in G["finds"].items():
            label[f"find_{k}"] = F32Flag(v)
        nloc = G["nloc"]
        atype_dummy = G["atype_dummy"]
        # upstream's model returns the per-atom mask as int32, which makes the loss's
        # 1/natoms a float32 value; pass the same so the normalisations are identical
        pred = dict(pred, mask=G["mask"])
        _, loss, more = self.loss(
            {"atype": atype_dummy},
            lambda **kw: pred,
            label,
            natoms=nloc,
            learning_rate=lr,
        )
        return loss, more

    def forward_backward(self, G: dict, lr: Any, idx: torch.Tensor | None = None):
        """Sample, gather, predict, upstream's loss, gradients into the flat gradient buffer."""
        if idx is None:
            idx = self.sample(G)
        rt, jac, jidx, diff, labels = self.gather(G, idx)
        pred = self.predict(rt, jac, jidx, diff, G["tcount"], G["bias"], create_graph=True)
        loss, more = self.loss_and_more(G, pred, labels, lr)
        self.flat.grads_from_loss(loss)
        return loss, more

    def all_reduce_grads(self) -> None:
        """Data parallel: SUM of the flat gradient over the ranks (eager; outside any CUDA graph)."""
        if self.distributed:
            self.flat.all_reduce_grads()

    def update(self) -> None:
        """Average (data parallel) and the flat Adam/AdamW step."""
        if self.distributed:
            self.flat.divide_grads(self.world_size)
        self.opt.step()

    def train_step(self, G: dict, lr: Any, idx: torch.Tensor | None = None):
        loss, more = self.forward_backward(G, lr, idx)
        self.all_reduce_grads()
        self.update()
        return loss, more

    # ------------------------------------------------------------ optimizer
    def make_optimizer(self) -> None:
        """Flat parameter/gradient/moment buffers and the flat Adam/AdamW (flat_optim.py).
        Upstream's optimizer stays ``tr.optimizer``; its state is pointed at the flat buffers
        before every save (``sync_optimizer_state``), so upstream's checkpoints are unchanged."""
        tr = self.tr
        up = self._upstream_opt
        d = dict(getattr(up, "defaults", {}) or {})
        if d.get("amsgrad") or d.get("maximize"):
            _refuse("Adam amsgrad/maximize")
        betas = (float(tr.opt_param["adam_beta1"]), float(tr.opt_param["adam_beta2"]))
        wd = float(tr.opt_param["weight_decay"])
        eps = float(d.get("eps", 1e-8))
        start = tr.start_step
        lr0 = self.lr_values[start] if start < len(self.lr_values) else 0.0
        self.flat = flat_optim.FlatParams(self.params)
        if self.cuda:
            self.lr_table = torch.tensor(self.lr_values + [self.lr_values[-1] if self.lr_values else 0.0], dtype=torch.float64, device=self.device)
            self.step_ctr = torch.full((1,), start, dtype=torch.int64, device=self.device)
            self.lr_t = torch.tensor(lr0, dtype=torch.float64, device=self.device)
            lr = self.lr_t
        else:
            lr = lr0
        self.opt = flat_optim.FlatAdam(self.flat, decoupled=tr.opt_type == "AdamW", lr=lr, betas=betas, eps=eps,
                                       weight_decay=wd, step_device=self.device)
        # restart: carry upstream's loaded optimizer state over
        if up is not None and len(up.state) > 0:
            self.opt.load_from_torch(up)
        nparam = sum(b["flat"].numel() for b in self.flat.buckets)
        log.info("graph: flat %s over %d parameter tensors (%d values, %d bucket(s)%s)", tr.opt_type,
                 len(self.flat.params), nparam, len(self.flat.buckets),
                 f"; data parallel over {self.world_size} ranks" if self.distributed else "")

    def sync_optimizer_state(self, lr: float) -> None:
        """Upstream's optimizer (tr.optimizer, what Trainer.save_model writes) <- the flat state."""
        if self._upstream_opt is not None:
            self.opt.sync_to_torch(self._upstream_opt, lr)
            self.tr.optimizer = self._upstream_opt

    # ------------------------------------------------------------- capture
    def _snapshot(self):
        return self.opt.snapshot()

    def _restore(self, snap) -> None:
        self.opt.restore(snap)
        self.step_ctr.fill_(self.tr.start_step)

    def _body_a(self, G: dict):
        """Graph A: LR of this step, sample .. backward into the flat gradient."""
        idx = torch.clamp(self.step_ctr, max=self.lr_table.shape[0] - 1)  # warm-up may run past the end
        lr = self.lr_table.index_select(0, idx).reshape(())
        self.lr_t.copy_(lr)
        return self.forward_backward(G, self.lr_t)

    def _body_b(self) -> None:
        """Graph B: (average) + optimizer step + LR-step counter."""
        self.update()
        self.step_ctr.add_(1)

    def _replay(self, G: dict) -> None:
        if self.distributed:
            # NCCL stays outside the graphs: graph A, an eager all_reduce of the flat gradient on
            # the current stream, graph B; queued back to back, no host sync.
            G["graph_a"].replay()
            self.all_reduce_grads()
            G["graph_b"].replay()
        else:
            G["graph"].replay()

    def _warmup(self, s) -> None:
        with torch.cuda.stream(s):
            for _ in range(3):
                for G in self.groups:
                    self._body_a(G)
                    self.all_reduce_grads()
                    self._body_b()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()

    def capture(self) -> None:
        """One CUDA graph per group (single process) or two (data parallel: capturing NCCL inside
        one graph is possible, but it needs NCCL graph support we cannot test here; the split
        around an eager all_reduce is the robust choice)."""
        snap = self._snapshot()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        self._warmup(s)
        self._capture_started = True  # from here a failure is not a compile problem (see fused)
        if self.distributed:
            torch.distributed.barrier()
            torch.cuda.synchronize()
        # One memory pool for all groups' graphs: each replay writes every intermediate it reads,
        # graphs never run concurrently (one stream), and each group's outputs stay referenced
        # (G["out_*"]), so reuse across groups is safe in any replay order; separate pools cost
        # one step's workspace per group (Al-Cu-Mg has three groups).
        pool = torch.cuda.graph_pool_handle() if len(self.groups) > 1 else None
        for G in self.groups:
            if self.distributed:
                # thread_local: NCCL's watchdog thread keeps querying its events during capture
                ga = torch.cuda.CUDAGraph()
                with torch.cuda.graph(ga, pool=pool, capture_error_mode="thread_local"):
                    loss, more = self._body_a(G)
                gb = torch.cuda.CUDAGraph()  # B shares A's pool (always replayed right after A)
                with torch.cuda.graph(gb, pool=ga.pool(), capture_error_mode="thread_local"):
                    self._body_b()
                G["graph_a"], G["graph_b"] = ga, gb
            else:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    loss, more = self._body_a(G)
                    self._body_b()
                G["graph"] = g
            G["out_loss"] = loss
            G["out_more"] = more
        torch.cuda.synchronize()
        self._restore(snap)
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        from deepmd.dpmodel.train import TrainingTimer
        from deepmd.loggers.training import format_training_message, format_training_message_per_task

        try:
            from harness.child import runtime
        except Exception:  # noqa: BLE001
            runtime = None
        tr = self.tr
        t_setup = time.time()
        host_seed = self._seed_ranks()
        self.build_data()
        self.make_optimizer()
        if self.cuda:
            self.capture()
        if self.cuda:
            mem = torch.cuda.memory_allocated(self.device)
            log.info("graph: CUDA graphs captured (%d%s), device memory allocated %d bytes", len(self.groups),
                     ", two per group around the gradient all_reduce" if self.distributed else "", mem)
        log.info("graph: setup %.1f s; %s", time.time() - t_setup, "CUDA-graph replay" if self.cuda else "eager (no CUDA)")

        chief = self.rank == 0  # as upstream: rank 0 alone writes lcurve, logs metrics, saves
        fout = open(tr.disp_file, mode="w" if not tr.restart_training else "a", buffering=1) if chief else None
        log.info("Start to train %d steps.", tr.num_steps)
        if self.distributed:
            log.info("Rank: %d/%d", self.rank, self.world_size)
        tr.wrapper.train()
        tr.step_timer = TrainingTimer(start_step=tr.start_step, num_steps=tr.num_steps, disp_freq=tr.disp_freq)
        # the group sequence: one host RNG seed shared by all ranks, so their graphs line up
        rng = np.random.default_rng(host_seed)
        ngroups = len(self.groups)
        if runtime is not None:
            runtime.clock.claim("graph")
        for step_id in range(tr.start_step, tr.num_steps):
            if runtime is not None:
                runtime.clock.tick("graph")
            display_step_id = step_id + 1
            cur_lr = self.lr_values[step_id]
            gi = 0 if ngroups == 1 else int(rng.choice(ngroups, p=self.group_prob))
            G = self.groups[gi]
            if self.cuda:
                self._replay(G)
                more = G["out_more"]
            else:
                for grp in self.opt.param_groups:
                    grp["lr"] = cur_lr
                _, more = self.train_step(G, cur_lr)
            if chief and tr.display_in_training and (display_step_id % tr.disp_freq == 0 or display_step_id == 1):
                train_results = {}
                for k in sorted(more):
                    if "l2_" in k:
                        continue
                    v = more[k]
                    train_results[k] = float(v) if torch.is_tensor(v) else v
                valid_results = self._validate(cur_lr)
                log.info(format_training_message_per_task(batch=display_step_id, task_name="trn", rmse=train_results, learning_rate=cur_lr))
                if valid_results:
                    log.info(format_training_message_per_task(batch=display_step_id, task_name="val", rmse=valid_results, learning_rate=None))
                interval = tr.step_timer.record(display_step_id)
                if tr.timing_in_training:
                    log.info(format_training_message(batch=display_step_id, wall_time=interval.wall_time, eta=interval.eta, current_time=interval.timestamp))
                if tr.lcurve_should_print_header:
                    tr.print_header(fout, train_results, valid_results)
                    tr.lcurve_should_print_header = False
                tr.print_on_training(fout, display_step_id, cur_lr, train_results, valid_results)
            should_save = display_step_id == tr.num_steps or (
                tr.save_freq > 0 and display_step_id % tr.save_freq == 0 and step_id != tr.start_step
            )
            if should_save and chief:
                self.sync_optimizer_state(cur_lr)
                tr.latest_model = tr.ckpt_store.path_for(display_step_id)
                tr.save_model(tr.latest_model, lr=cur_lr, step=step_id)
                log.info(f"Saved model to {tr.latest_model}")
                tr.ckpt_store.publish(tr.latest_model)
        if self.cuda:
            torch.cuda.synchronize()
        if self.distributed:
            log.info("graph: rank %d/%d final parameter checksum %s", self.rank, self.world_size, self.flat.checksum())
        if chief and tr.timing_in_training:
            msg = tr.step_timer.format_average()
            if msg is not None:
                log.info(msg)
        if chief:
            log.info(f"Trained model has been saved to: {tr.save_ckpt}")
            fout.close()

    def _seed_ranks(self) -> int:
        """The host seed of the group sequence, and (data parallel) a rank-specific device RNG.

        Single process: unchanged (upstream seeded torch with mix_entropy([0, training.seed])).
        Data parallel: s0 = rank 0's torch.initial_seed(), broadcast; every rank seeds torch (its
        device generator, which draws the batches) with mix_entropy([rank, s0]), so ranks draw
        different batches even without training.seed, and the host RNG that picks the shape
        group gets s0 % 2**31 on every rank (same group sequence, so the graphs line up)."""
        s0 = int(torch.initial_seed())
        if not self.distributed:
            return self.rank + s0 % (2**31)
        from deepmd.pt.utils.utils import mix_entropy

        s0 = int(self.tr._broadcast_value_from_rank0(s0))
        torch.manual_seed(mix_entropy([self.rank, s0]))
        return s0 % (2**31)

    def _validate(self, cur_lr: float) -> dict:
        tr = self.tr
        if tr.validation_data is None:
            return {}
        # data parallel: tr.wrapper is _drop_ddp's shell (no forward); validate with the model
        # behind it (only rank 0 validates)
        wrapper = tr._get_inner_module() if self.distributed and hasattr(tr, "_get_inner_module") else tr.wrapper
        tr.wrapper.eval()
        single, sum_natoms = {}, 0
        try:
            for _ in range(tr.valid_numb_batch):
                input_dict, label_dict, _ = tr.get_data(is_train=False)
                if input_dict == {}:
                    return {}
                _, loss, more_loss = wrapper(**input_dict, cur_lr=cur_lr, label=label_dict)
                natoms = int((input_dict["atype"] >= 0).sum())
                sum_natoms += natoms
                for k, v in more_loss.items():
                    if "l2_" not in k:
                        single[k] = single.get(k, 0.0) + float(v) * natoms
        finally:
            # NB: unlike upstream we do not zero_grad here: the captured graph owns the
            # .grad buffers (they are overwritten by each replay anyway).
            tr.wrapper.train()
        return {k: v / sum_natoms for k, v in single.items()}


# ------------------------------------------------------------------ accuracy-gate hooks
def sorted_perm(atype: torch.Tensor):
    """Permutation sorting a frame's atoms by type (stable), and its inverse."""
    at0 = atype.reshape(atype.shape[0], -1)[0]
    perm = torch.argsort(at0, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, inv


def sorted_batch(eng: "GraphEngine", inp: dict):
    """A gate batch (upstream's input dict, all frames one composition) with its atoms sorted by
    type: (coord nf x nloc x 3, atype nf x nloc, perm, inv, sorted types, tcount, box nf x 9|None)."""
    coord = inp["coord"]
    nf = coord.shape[0]
    coord = coord.reshape(nf, -1, 3)
    atype = inp["atype"].reshape(nf, -1)
    perm, inv = sorted_perm(atype)
    at = atype[0, perm]
    tcount = [int((at == t).sum()) for t in range(eng.ntypes)]
    box = inp.get("box")
    return coord, atype, perm, inv, at, tcount, None if box is None else box.reshape(nf, 9)


def train_loss(eng: "GraphEngine", loss_fn, inp: dict, label: dict, lr):
    """Upstream's loss on an engine's predictions for one batch (all frames one composition)."""
    coord, atype, perm, inv, at, tcount, box = sorted_batch(eng, inp)
    need_virial = bool(getattr(loss_fn, "has_v", False)) and box is not None
    geom = eng.frames_geometry(coord[:, perm].detach(), at, None if box is None else box.detach())
    nf, nloc = atype.shape
    rt, jac, jidx, diff = eng.step_geometry(geom)
    pred = eng.predict(rt, jac, jidx, diff,
                       tcount, eng.out_bias_per_type().to(coord.device), create_graph=True, virial=need_virial)
    pred = dict(pred)
    pred["force"] = pred["force"][:, inv]
    pred["mask"] = torch.ones((nf, nloc), dtype=torch.int32, device=coord.device)
    _, loss, more = loss_fn({"atype": atype}, lambda **kw: pred, label, natoms=nloc, learning_rate=lr)
    return loss, more


def parity_optimizer(model, opt_cfg: dict, lr):
    """Flat buffers over the model's parameters and a fresh flat Adam/AdamW with the gate's
    optimizer settings (what the training loop builds in make_optimizer)."""
    if opt_cfg.get("gradient_max_norm", 0.0):
        raise RuntimeError("graph/fused variants: gradient_max_norm unsupported")
    flat = flat_optim.FlatParams(model.parameters())
    opt = flat_optim.FlatAdam(flat, decoupled=opt_cfg["type"] == "AdamW", lr=float(lr),
                              betas=tuple(opt_cfg["betas"]), eps=1e-8, weight_decay=opt_cfg["weight_decay"],
                              step_device=flat.buckets[0]["flat"].device)
    return flat, opt


def parity_train_step(model, loss_fn, batch, lr, engine: "GraphEngine | None" = None) -> None:
    """Accuracy-gate hook: one training step of the variant's own code on the gate's batch:
    its forward/forces, upstream's loss, gradients into the flat buffer (left in ``p.grad``, views
    of it) and the flat Adam/AdamW (flat_optim.FlatAdam, what the training loop runs)."""
    eng = engine if engine is not None else GraphEngine.for_model(model)
    flat, opt = parity_optimizer(model, batch["optim"], lr)
    with torch.enable_grad():
        loss, _ = train_loss(eng, loss_fn, batch["input"], batch["label"], lr)
        flat.grads_from_loss(loss)
    opt.step()
