"""The training data of the fast engines, resident on the device: every training frame's geometry
(what the geometry mode stores) and labels, grouped by shape (per-type atom counts, batch size,
label flags); the batch of a step drawn on the device (system by upstream's sampler weights, frame
uniform within it) and gathered from those arrays; and the batch handed to upstream's own loss
(``loss_and_more``, with ``F32Flag`` label flags rounding the prefactors as upstream's do).

``DeviceData`` is a mixin of ``graph.GraphEngine``: it reads the trainer (``self.tr``), the loss
and the ``prediction.Predictor`` half of the engine (geometry, bias, precisions).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .prediction import GEOM_KEYS, cat_frames
from .support import refuse

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


def stored_geometry(mode: str, need_virial: bool) -> list[str]:
    """The per-frame geometry arrays a geometry mode keeps on the device: on-the-fly mode needs
    diff for R~ itself; compact mode re-forms diff (R~ and the virial) from coordinates, shift
    vectors and one int32 per pair; precomputed mode keeps R~ and its Jacobian (and diff for
    the virial)."""
    if mode == "compact":
        return ["pidx", "coord", "shifts"]
    if mode == "onthefly":
        return ["jidx", "diff"]
    return ["jidx"] + (["diff"] if need_virial else []) + ["rt", "jac"]


def label_keys(need_virial: bool) -> list[str]:
    return ["energy", "force"] + (["virial"] if need_virial else [])


def label_shapes(nloc: int) -> dict[str, tuple]:
    """Per-frame shape of every label."""
    return {"energy": (1,), "force": (nloc, 3), "virial": (9,)}


def label_array(value, key: str, nf: int, nloc: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """One label of nf frames in the engine's shape; a label the data lacks is zeros (its find_*
    flag is 0, so upstream's loss leaves it out)."""
    shape = (nf,) + label_shapes(nloc)[key]
    if value is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.as_tensor(value).to(device=device, dtype=dtype).reshape(shape)


@dataclass(eq=False)
class ShapeGroup:
    """Frames of one shape -- per-type atom counts ``tcount`` (atoms sorted by type), batch size
    ``bsz``, label flags ``finds`` -- resident on the device, as one compiled step / CUDA graph
    trains them. ``DeviceData.new_group`` is the one route that makes one (the training set's
    groups and the accuracy gate's one-batch group alike)."""

    tcount: tuple[int, ...]
    bsz: int
    nloc: int
    finds: dict[str, float]  # find_<label> of upstream's batches (1.0: the data has the label)
    labels: dict[str, torch.Tensor]  # label_keys -> [frames, *label_shapes]
    geom: dict[str, torch.Tensor | None]  # GEOM_KEYS -> [frames, ...]; what the geometry mode keeps
    bias: torch.Tensor  # per-type energy bias (upstream's out_bias)
    atype_dummy: torch.Tensor  # [bsz, nloc] zeros: the loss reads only atype >= 0
    mask: torch.Tensor  # [bsz, nloc] int32 ones, as upstream's model returns it
    nbytes: int = 0  # device bytes of geometry and labels
    # sampling (training groups): systems' probability, CDF, frame counts and offsets
    prob: float = 1.0
    cdf: torch.Tensor | None = None
    nfr: torch.Tensor | None = None
    off: torch.Tensor | None = None
    nfr_max: int = 0
    replace: bool = False
    slots: dict[int, int] = field(default_factory=dict)  # upstream's system id -> first frame here
    idx_in: torch.Tensor | None = None  # follow_upstream_order: the step's frames, written before a replay
    # captured (graph / fused on CUDA): the step's CUDA graph(s) and its outputs
    graph: Any = None
    graph_a: Any = None
    graph_b: Any = None
    out_loss: Any = None
    out_more: Any = None
    step_view: dict | None = None  # fused's compiled step's inputs (fused._step_view)

    def loss_inputs(self) -> dict:
        """What upstream's loss reads of the group besides predictions and labels (loss_and_more)."""
        return {"finds": self.finds, "nloc": self.nloc, "atype_dummy": self.atype_dummy, "mask": self.mask}


class DeviceData:
    """Device-resident training frames (``build_data``), the step's batch (``sample``,
    ``gather``) and upstream's loss on it (``loss_and_more``)."""

    def loss_statics(self, nbatch: int, nloc: int, device) -> dict:
        """A group's constant loss inputs: the per-type energy bias, and the atom types / per-atom
        mask the loss reads (the loss only reads atype >= 0, the real-atom mask: all atoms are
        real; upstream's model returns the mask as int32, which makes the loss's 1/natoms a
        float32 value, so the same is passed)."""
        return {
            "bias": self.out_bias_per_type().detach().to(device),
            "atype_dummy": torch.zeros((nbatch, nloc), dtype=torch.int64, device=device),
            "mask": torch.ones((nbatch, nloc), dtype=torch.int32, device=device),
        }

    def use_loss(self, loss_fn, has_box: bool = True) -> None:
        """Upstream's loss object this engine's steps call (the trainer's in training; the gate's
        own in the accuracy gate); virials are predicted when the loss has a virial term and the
        frames have a box."""
        self.loss = loss_fn
        self.need_virial = bool(getattr(loss_fn, "has_v", False)) and has_box

    def group_geometry(self, coord: torch.Tensor, at: torch.Tensor, box: torch.Tensor | None) -> dict:
        """The geometry arrays of frames of one composition that the engine's geometry mode keeps
        on the device (stored_geometry)."""
        mode = self.geom_mode
        return self.frames_geometry(coord, at, box, env=mode == "precomputed", compact=mode == "compact",
                                    only=stored_geometry(mode, self.need_virial))

    def new_group(self, tcount, bsz: int, finds: dict, geom: dict, labels: dict) -> ShapeGroup:
        """A shape group on the device from its frames' geometry (group_geometry) and labels."""
        dev = self.device
        nloc = sum(tcount)
        G = ShapeGroup(tcount=tuple(int(n) for n in tcount), bsz=int(bsz), nloc=nloc, finds=dict(finds),
                       labels={k: v.to(dev) for k, v in labels.items()},
                       geom={k: None if geom.get(k) is None else geom[k].to(dev) for k in GEOM_KEYS},
                       **self.loss_statics(bsz, nloc, dev))
        stored = [t for t in G.geom.values() if t is not None] + list(G.labels.values())
        G.nbytes = sum(t.numel() * t.element_size() for t in stored)
        return G
    # ------------------------------------------------------------------ data
    def build_data(self) -> None:
        tr = self.tr
        ds = tr.training_dataloader.dataset
        weights = tr.training_dataloader.sampler.weights.detach().cpu().numpy().astype(np.float64)
        weights = weights / weights.sum()
        self.use_loss(self.loss)
        lab_keys = label_keys(self.need_virial)
        groups: dict[tuple, dict] = {}
        for sid, system in enumerate(ds.systems):
            if weights[sid] <= 0:
                continue
            nfr = len(system)
            bsz = int(ds.batch_sizes[sid])
            if getattr(self, "follow_upstream_order", False) and nfr % bsz:
                # upstream's loader ends each epoch with a short batch here: fixed shapes cannot follow it
                refuse(f"following upstream's order: system {sid} has {nfr} frames, not a multiple of its batch "
                       f"size {bsz} (upstream's short last batch of an epoch); use a batch size that divides it")
            f0 = system[0]
            at = torch.as_tensor(np.asarray(f0["atype"])).long()
            if not bool((at[1:] >= at[:-1]).all()):
                refuse("atoms not sorted by type (set sort_atoms)")
            if (at < 0).any():
                refuse("virtual atoms / mixed_type data")
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
            parts: dict[str, list] = {}
            labs = {k: [] for k in lab_keys}
            nframes = 0
            for system in g["sys"]:
                frs = [system[f] for f in range(len(system))]
                coord = torch.as_tensor(np.stack([np.asarray(fr["coord"]) for fr in frs]), dtype=torch.float64)
                at = torch.as_tensor(np.asarray(frs[0]["atype"])).long()
                pbc = getattr(system._data_system, "pbc", True)
                has_box = pbc and frs[0].get("box") is not None and float(frs[0].get("find_box", 1.0)) != 0.0
                box = torch.as_tensor(np.stack([np.asarray(fr["box"]) for fr in frs]), dtype=torch.float64) if has_box else None
                for k, v in self.group_geometry(coord, at, box).items():
                    # staged on the host: the device then holds each array once (no
                    # per-system pieces next to their concatenation)
                    parts.setdefault(k, []).append(v.cpu())
                for k in lab_keys:
                    v = None if frs[0].get(k) is None else np.stack([np.asarray(fr[k]) for fr in frs])
                    labs[k].append(label_array(v, k, len(frs), nloc, self.gprec))
                nframes += len(frs)
            geom = {k: cat_frames(v) for k, v in parts.items()}
            del parts
            G = self.new_group(tcount, bsz, dict(zip(lab_keys, finds)), geom, {k: torch.cat(v) for k, v in labs.items()})
            del geom
            # sampling tables: system CDF within the group, frame offsets
            dev = self.device
            p = np.asarray(g["prob"], dtype=np.float64)
            G.prob = float(p.sum())
            p = p / p.sum()
            cdf = np.cumsum(p)
            cdf[-1] = 1.0
            G.cdf = torch.tensor(cdf, dtype=torch.float64, device=dev)
            G.nfr = torch.tensor(g["nfr"], dtype=torch.int64, device=dev)
            G.off = torch.tensor(np.concatenate([[0], np.cumsum(g["nfr"])[:-1]]), dtype=torch.int64, device=dev)
            G.nfr_max = int(max(g["nfr"]))
            G.replace = bsz > min(g["nfr"])
            # where each of upstream's systems sits in this group (follow_upstream_order)
            G.slots = dict(zip(g["sids"], np.concatenate([[0], np.cumsum(g["nfr"])[:-1]]).tolist()))
            if getattr(self, "follow_upstream_order", False):  # the step's frames, written before each replay
                G.idx_in = torch.zeros(bsz, dtype=torch.int64, device=dev)
            self.groups.append(G)
            stored = [k for k, v in G.geom.items() if v is not None] + [f"label_{k}" for k in G.labels]
            log.info(
                "graph: group types=%s batch=%d systems=%d frames=%d prob=%.4f: device-resident geometry+labels "
                "(%s mode; %s) %d bytes (%d bytes/frame)",
                list(tcount), bsz, len(g["sids"]), nframes, G.prob, self.geom_mode, "+".join(stored),
                G.nbytes, G.nbytes // max(1, nframes),
            )
        if not self.groups:
            refuse("no training systems")
        gp = np.array([G.prob for G in self.groups])
        self.group_prob = gp / gp.sum()
        log.info("graph: geometry precomputed in %.1f s", time.time() - t0)

    # ------------------------------------------------------------------ step
    def upstream_batch(self, step: int) -> tuple[int, torch.Tensor]:
        """The frames upstream's own loop trains on at this step: one batch drawn by upstream's
        sampler (Trainer._next_training_batch, the draw behind its SAMPLER_RECORD lines), as
        (group index, frame indices into that group). Nothing of upstream's RNG is re-implemented:
        the same calls in the same order draw the same frames. A batch the engine's fixed shapes
        cannot take (upstream's short last batch of an epoch, frames dropped by min_pair_dist) is
        refused, naming the step."""
        _, _, log_dict = self.tr._next_training_batch("Default")
        sid = int(np.asarray(log_dict["sid"]).reshape(-1)[0])
        fids = np.asarray(log_dict.get("fid"), dtype=np.int64).reshape(-1)
        for gi, G in enumerate(self.groups):
            if sid in G.slots:
                break
        else:
            refuse(f"upstream drew system {sid} at step {step}, which the engine does not hold (zero weight?)")
        if fids.size != G.bsz:
            refuse(f"upstream's batch at step {step} has {fids.size} frames of system {sid}, not its batch size "
                   f"{G.bsz} (the short last batch of an epoch, or frames dropped by min_pair_dist): the "
                   f"engine's fixed shapes cannot follow it; use a batch size that divides the system's frames")
        return gi, torch.as_tensor(G.slots[sid] + fids, dtype=torch.int64).to(self.device)

    def sample(self, G: ShapeGroup) -> torch.Tensor:
        dev = self.device
        u = torch.rand(1, dtype=torch.float64, device=dev)
        s = torch.searchsorted(G.cdf, u, right=True).clamp_(max=G.cdf.shape[0] - 1)
        nfr = G.nfr.index_select(0, s)  # 1
        off = G.off.index_select(0, s)
        B = G.bsz
        if B == 1 or G.replace:
            r = torch.rand(B, dtype=torch.float64, device=dev)
            fi = torch.minimum((r * nfr.to(torch.float64)).long(), nfr - 1)
        else:
            keys = torch.rand(G.nfr_max, dtype=torch.float64, device=dev)
            ar = torch.arange(G.nfr_max, device=dev)
            keys = torch.where(ar < nfr, keys, 2.0)
            fi = torch.topk(keys, B, largest=False).indices
        return off + fi

    def gather(self, geom: dict, labels: dict, idx: torch.Tensor):
        """The batch's geometry: rt/jac are None in on-the-fly and compact mode (predict forms
        them); compact mode gathers the frames' packed indices, coordinates and shift tables
        (predict forms diff from them: inside the compiled function in fused)."""
        sel = {k: v.index_select(0, idx) for k, v in geom.items() if v is not None}
        rt, jac, jidx, diff = self.step_geometry(sel)
        labels = {k: v.index_select(0, idx) for k, v in labels.items()}
        return rt, jac, jidx, diff, labels

    def loss_and_more(self, pred: dict, labels: dict, lr: Any, *, finds: dict, nloc: int,
                      atype_dummy: torch.Tensor, mask: torch.Tensor):
        """Upstream's loss on the engine's predictions for a batch of one shape group (its
        ShapeGroup.loss_inputs(); fused's compiled step passes the same from its step view)."""
        label = dict(labels)
        for k, v in finds.items():
            label[f"find_{k}"] = F32Flag(v)
        # upstream's model returns the per-atom mask as int32, which makes the loss's
        # 1/natoms a float32 value; pass the same so the normalisations are identical
        pred = dict(pred, mask=mask)
        _, loss, more = self.loss(
            {"atype": atype_dummy},
            lambda **kw: pred,
            label,
            natoms=nloc,
            learning_rate=lr,
        )
        return loss, more
