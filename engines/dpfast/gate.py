"""The accuracy gate's hooks of the dpfast engines (what ``harness.child.runtime.parity_forward``
and ``parity_train_step`` call once ``trainer.install`` registered them): the variant's own code
on the gate's frames, so the gate judges what trains.

* ``parity_forward``: energies, forces and virials of the engine's prediction path, frame by
  frame in the frames' own atom order (the engine sorts atoms by type and puts them back).
* ``parity_train_step``: one training step of the engine on the gate's batch, through the very
  route the training loop takes: the batch becomes a one-group training set made as
  ``DeviceData.build_data`` makes the training groups (``group_geometry``, ``label_array``,
  ``new_group``), then the engine's ``forward_backward`` (fused: the compiled whole step when its
  options compile it) and a fresh flat Adam/AdamW (``flat_optim``) with the gate's settings.
"""
from __future__ import annotations

import torch

from . import flat_optim
from .device_data import ShapeGroup, label_array, label_keys
from .fused import FusedEngine
from .graph import GraphEngine


def engine_for(name: str, model) -> GraphEngine:
    """A predict/step-only engine (no trainer) of the named kind on the model's device."""
    device = next(model.parameters()).device
    return (FusedEngine if name == "fused" else GraphEngine).for_model(model, device)


def sorted_perm(atype: torch.Tensor):
    """Permutation sorting a frame's atoms by type (stable), and its inverse."""
    at0 = atype.reshape(atype.shape[0], -1)[0]
    perm = torch.argsort(at0, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, inv


def parity_forward(name: str, model, coord, atype, box) -> dict:
    eng = engine_for(name, model)
    nf = coord.shape[0]
    coord = coord.reshape(nf, -1, 3).to(eng.device)
    atype = atype.reshape(nf, -1).to(eng.device)
    out = {"energy": [], "force": [], "virial": []}
    with torch.enable_grad():
        for f in range(nf):  # frames may differ in atom order
            perm, inv = sorted_perm(atype[f : f + 1])
            b = None if box is None else box[f : f + 1].to(eng.device)
            r = eng.predict_frames(coord[f : f + 1, perm], atype[f : f + 1, perm], b)
            out["energy"].append(r["energy"].detach().reshape(1))
            out["force"].append(r["force"].detach()[:, inv])
            out["virial"].append(r["virial"].detach().reshape(1, 9))
    return {k: torch.cat(v) for k, v in out.items()}


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


def parity_train_step(name: str, model, loss_fn, batch: dict, lr) -> None:
    """One training step of the engine on the gate's batch: gradients into the flat buffer (left
    in ``p.grad``, views of it) and the flat Adam/AdamW update."""
    eng = engine_for(name, model)
    flat, opt = parity_optimizer(model, batch["optim"], lr)
    G = parity_group(eng, loss_fn, batch["input"], batch["label"])
    eng.flat = flat
    with torch.enable_grad():
        eng.forward_backward(G, lr, torch.arange(G.bsz, device=eng.device))
    opt.step()


def parity_group(eng: GraphEngine, loss_fn, inp: dict, label: dict) -> ShapeGroup:
    """The gate's batch (upstream's input and label dicts, all frames one composition) as a
    one-group training set: atoms sorted by type, labels in sorted order, upstream's find_*."""
    dev = eng.device
    nf = inp["coord"].shape[0]
    coord = inp["coord"].reshape(nf, -1, 3)
    atype = inp["atype"].reshape(nf, -1)
    perm, _ = sorted_perm(atype)
    at = atype[0, perm]
    if not bool((atype[:, perm] == at).all()):
        raise RuntimeError(f"{eng.engine_name} variant: gate batch frames differ in composition")
    nloc = atype.shape[1]
    box = inp.get("box")
    box = None if box is None else box.reshape(nf, 9).detach().to(dev)
    eng.use_loss(loss_fn, has_box=box is not None)
    geom = eng.group_geometry(coord[:, perm].detach().to(dev), at.to(dev), box)
    labels, finds = {}, {}
    for k in label_keys(eng.need_virial):
        v = label.get(k)
        v = label_array(None if v is None else v.detach(), k, nf, nloc, eng.gprec, dev)
        labels[k] = v[:, perm] if k == "force" else v
        finds[k] = float(label.get(f"find_{k}", 0.0))
    tcount = [int((at == t).sum()) for t in range(eng.ntypes)]
    return eng.new_group(tcount, nf, finds, geom, labels)


def graph_parity_forward(model, coord, atype, box) -> dict:
    return parity_forward("graph", model, coord, atype, box)


def graph_parity_train_step(model, loss_fn, batch: dict, lr) -> None:
    parity_train_step("graph", model, loss_fn, batch, lr)


def fused_parity_forward(model, coord, atype, box) -> dict:
    return parity_forward("fused", model, coord, atype, box)


def fused_parity_train_step(model, loss_fn, batch: dict, lr) -> None:
    parity_train_step("fused", model, loss_fn, batch, lr)


# name -> (parity_forward, parity_train_step): what trainer.install registers
HOOKS = {
    "graph": (graph_parity_forward, graph_parity_train_step),
    "fused": (fused_parity_forward, fused_parity_train_step),
}
