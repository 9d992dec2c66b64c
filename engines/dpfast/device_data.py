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
    # ------------------------------------------------------------------ data
    def build_data(self) -> None:
        tr = self.tr
        ds = tr.training_dataloader.dataset
        weights = tr.training_dataloader.sampler.weights.detach().cpu().numpy().astype(np.float64)
        weights = weights / weights.sum()
        self.need_virial = bool(self.loss.has_v)
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
            mode = self.geom_mode
            keep = stored_geometry(mode, self.need_virial)  # what stays on the device
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
                shape = label_shapes(nloc)
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
                G[k] = cat_frames(parts.pop(k)).to(dev) if k in parts else None
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
            G.update(self.loss_statics(bsz, nloc, dev))
            # where each of upstream's systems sits in this group (follow_upstream_order)
            G["slots"] = dict(zip(g["sids"], np.concatenate([[0], np.cumsum(g["nfr"])[:-1]]).tolist()))
            if getattr(self, "follow_upstream_order", False):  # the step's frames, written before each replay
                G["idx_in"] = torch.zeros(bsz, dtype=torch.int64, device=dev)
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
            refuse("no training systems")
        gp = np.array([G["prob"] for G in self.groups])
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
            if sid in G["slots"]:
                break
        else:
            refuse(f"upstream drew system {sid} at step {step}, which the engine does not hold (zero weight?)")
        if fids.size != G["bsz"]:
            refuse(f"upstream's batch at step {step} has {fids.size} frames of system {sid}, not its batch size "
                   f"{G['bsz']} (the short last batch of an epoch, or frames dropped by min_pair_dist): the "
                   f"engine's fixed shapes cannot follow it; use a batch size that divides the system's frames")
        return gi, torch.as_tensor(G["slots"][sid] + fids, dtype=torch.int64).to(self.device)

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
