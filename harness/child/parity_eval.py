"""Entry point of a same-weights parity subprocess (used by harness.judge.gate):

    python -m harness.child.parity_eval --tree TREE [--module M ...] --input input.json
        --checkpoint CKPT --eval-system DIR --frames N --train-system DIR --out OUT.npz

Like harness.child.launch it puts the variant's built upstream tree first on sys.path and imports the
variant's patch modules in order, so the variant's diffs and monkeypatches are in effect. Then:

1. builds the model from the input's model section the way `dp train` does (update_deepmd_input +
   normalize, then upstream's own model factory), so precision overrides apply;
2. loads the *baseline* checkpoint's weights into it (load_state_dict casts to the model's dtypes);
3. evaluates energy [nf], force [nf, nat, 3], virial [nf, 9] on the first N frames of DIR
   (or through ``harness.child.runtime.parity_forward`` when a patch module registered one);
4. takes one optimizer step on one fixed training frame (frame 0 of the first training set),
   with upstream's loss built from the input's loss section, upstream's Adam settings and the
   learning rate of step 0 (or through ``harness.child.runtime.parity_train_step``), and records each
   parameter's gradient and update.

Everything is written as float64 to OUT.npz, plus OUT.json with metadata. Nothing is compared
here: the parent compares the variant's file with the baseline's.

``--backend pt-expt`` (upstream's PyTorch-Exportable backend): the weights, loaded into the
PyTorch model as above, are carried into pt_expt's own model through upstream's serialisation
(pt ``serialize()`` -> pt_expt ``BaseModel.deserialize``), which then evaluates (eager) and
takes the step with pt_expt's own loss and wrapper; gradients and updates are carried back
the same way, so they carry the PyTorch parameter names the parent compares by.
"""
from __future__ import annotations

import argparse

import json
import sys
import traceback
from pathlib import Path


def _load_modules(tree: str, modules: list[str]) -> None:
    from harness.child import patch_loader  # noqa: F401  (the hooks live in runtime; patch modules set them)
    from harness.child import runtime

    patch_loader.put_on_path(tree, modules)
    patch_loader.import_modules(modules)


def _config(input_path: Path) -> dict:
    from deepmd.utils.argcheck import normalize
    from deepmd.utils.compat import update_deepmd_input

    config = json.loads(input_path.read_text())
    config = update_deepmd_input(config, warning=False, dump=None)
    return normalize(config)


def _frames(system: Path, n: int, type_map: list[str]):
    """First n frames of a DeePMD npy system (sets in order), atom types mapped to type_map."""
    import numpy as np

    types = np.loadtxt(system / "type.raw", dtype=int, ndmin=1)
    tmf = system / "type_map.raw"
    if tmf.is_file():
        names = tmf.read_text().split()
        types = np.array([type_map.index(names[t]) for t in types])
    coords, boxes = [], []
    for s in sorted(p for p in system.glob("set.*") if p.is_dir()):
        c = np.load(s / "coord.npy")
        b = np.load(s / "box.npy")
        coords.append(c.reshape(c.shape[0], -1))
        boxes.append(b.reshape(b.shape[0], 9))
        if sum(len(x) for x in coords) >= n:
            break
    coord = np.concatenate(coords)[:n]
    box = np.concatenate(boxes)[:n]
    nf = coord.shape[0]
    return coord.reshape(nf, -1, 3), np.tile(types, (nf, 1)), box


def _batch(system: Path, type_map: list[str], loss, model, device):
    """Frame 0 of `system` as upstream's data loader would hand it to Trainer.step."""
    import torch
    from deepmd.pt.train.training import get_additional_data_requirement
    from deepmd.pt.utils.dataloader import collate_batch
    from deepmd.pt.utils.dataset import DeepmdDataSetForLoader

    ds = DeepmdDataSetForLoader(str(system), type_map=type_map)
    ds.add_data_requirement(loss.label_requirement + get_additional_data_requirement(model))
    batch = collate_batch([ds[0]])
    input_keys = ("coord", "atype", "spin", "box", "fparam", "aparam", "charge_spin")
    inp = dict.fromkeys(input_keys)
    label = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and k != "box":
            v = v.to(device)
        if k in input_keys:
            if k == "fparam" and batch.get("find_fparam", 1.0) == 0.0:
                continue
            if k == "charge_spin" and batch.get("find_charge_spin", 1.0) == 0.0:
                continue
            inp[k] = v
        elif k not in ("sid", "fid"):
            label[k] = v
    if isinstance(inp.get("box"), torch.Tensor):
        inp["box"] = inp["box"].to(device)
    return inp, label


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness.child.parity_eval")
    p.add_argument("--tree", required=True)
    p.add_argument("--module", action="append", default=[])
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--eval-system", required=True, type=Path)
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--train-system", type=Path, default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--backend", default="pt", choices=("pt", "pt-expt"))
    a = p.parse_args(argv)
    _load_modules(a.tree, a.module)
    meta: dict = {"eval": None, "step": None, "load": None}
    arrays: dict = {}
    try:
        _run(a, meta, arrays)
    finally:
        import numpy as np

        from harness.core import fsutil

        def savez(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        fsutil.atomic_write(a.out, savez)
        fsutil.atomic_write_json(a.out.with_suffix(".json"), meta)
    return 0


def _run(a, meta: dict, arrays: dict) -> None:
    import torch
    from deepmd.pt.train import training
    from deepmd.pt.train.wrapper import ModelWrapper
    from deepmd.pt.utils import env

    from harness.child import runtime

    device = env.DEVICE
    config = _config(a.input)
    model_params = config["model"]
    type_map = list(model_params["type_map"])
    lr_params = dict(config["learning_rate"])
    try:
        from deepmd.pt.utils.learning_rate import BaseLR

        lr = float(BaseLR(**{**lr_params, "num_steps": int(config["training"]["numb_steps"])}).value(0))
    except Exception:  # schedule API differs: step 0 of every upstream schedule is start_lr
        lr = float(lr_params["start_lr"])
    model = training.get_model_for_wrapper(model_params)
    loss = training.get_loss(dict(config["loss"]), float(lr_params["start_lr"]),
                             len(type_map), model)
    wrapper = ModelWrapper(model, loss, model_params=model_params).to(device)
    state = torch.load(a.checkpoint, map_location=device, weights_only=True)
    if "model" in state:
        state = state["model"]
    # the checkpoint's own model_params (the baseline's) must not replace the variant's
    state = {k: v for k, v in state.items() if k != "_extra_state"}
    try:
        missing, unexpected = wrapper.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: the variant's architecture differs (type_one_side)
        meta["load"] = "incompatible: " + " ".join(str(e).split())[:300]
        return
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        meta["load"] = f"incompatible: missing {missing[:3]} unexpected {list(unexpected)[:3]}"
        return
    meta["load"] = "ok"
    meta["dtypes"] = sorted({str(t.dtype) for t in wrapper.parameters()})
    meta["lr"] = lr

    if a.backend == "pt-expt":
        return _run_pt_expt(a, meta, arrays, config, model, loss, lr, device)

    # ---- 3. same-weights evaluation
    c, t, b = _eval_inputs(a, type_map, device)
    fwd = runtime.parity_forward
    if fwd is not None:
        out = fwd(model, c, t, b)
    else:
        out = model(c.reshape(c.shape[0], -1), t, box=b)
    _keep_eval(arrays, meta, out, t.shape, hook=fwd is not None)

    # ---- 4. one training step
    optim = _step_settings(a, config, meta)
    if optim is None:
        return
    opt_type = optim["type"]
    inp, label = _batch(a.train_system, type_map, loss, model, device)
    names = [n for n, q in wrapper.named_parameters() if q.requires_grad]
    params = dict(wrapper.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    wrapper.train()
    hook = runtime.parity_train_step
    if hook is not None:
        hook(model, loss, {"input": inp, "label": label, "optim": optim}, lr)
    else:
        cls = torch.optim.Adam if opt_type == "Adam" else torch.optim.AdamW
        opt = cls(wrapper.parameters(), lr=lr, betas=optim["betas"], weight_decay=optim["weight_decay"],
                  fused=device.type != "cpu")
        opt.zero_grad(set_to_none=True)
        _, loss_value, _ = wrapper(**inp, cur_lr=lr, label=label, task_key="Default")
        loss_value.backward()
        if optim["gradient_max_norm"] > 0.0:
            torch.nn.utils.clip_grad_norm_(wrapper.parameters(), optim["gradient_max_norm"])
        with torch.device(device):
            opt.step()
        meta["loss"] = float(loss_value.detach())
    for i, n in enumerate(names):
        q = params[n]
        arrays[f"upd/{n}"] = (q.detach().to(torch.float64) - before[n].to(torch.float64)).cpu().numpy()
        if q.grad is not None:
            arrays[f"grad/{n}"] = q.grad.detach().to(torch.float64).cpu().numpy()
    meta["step"] = {"hook": hook is not None, "params": len(names), "optimizer": optim}


def _eval_inputs(a, type_map: list[str], device):
    """coord [nf, nat, 3], atype [nf, nat], box [nf, 9] of the evaluated frames, on `device`."""
    import torch

    coord, atype, box = _frames(a.eval_system, a.frames, type_map)
    return (torch.tensor(coord, dtype=torch.float64, device=device),
            torch.tensor(atype, dtype=torch.long, device=device),
            torch.tensor(box, dtype=torch.float64, device=device))


def _keep_eval(arrays: dict, meta: dict, out: dict, shape, **info) -> None:
    """Energy [nf], force [nf, nat, 3], virial [nf, 9] as float64 numpy, and what was evaluated."""
    import torch

    nf, nat = shape
    for key, sh in (("energy", (nf,)), ("force", (nf, nat, 3)), ("virial", (nf, 9))):
        arrays[key] = out[key].detach().to(torch.float64).reshape(sh).cpu().numpy()
    meta["eval"] = {"frames": int(nf), "atoms": int(nat), **info}


def _step_settings(a, config: dict, meta: dict) -> dict | None:
    """Upstream's Adam settings for the replayed step; None (meta says why) when none is replayed."""
    if a.train_system is None:
        return None
    opt_cfg = dict(config.get("optimizer") or {"type": "Adam"})
    opt_type = opt_cfg.get("type", "Adam")
    if opt_type not in ("Adam", "AdamW"):
        meta["step"] = f"skipped: optimizer {opt_type} (only Adam/AdamW are replayed)"
        return None
    return {
        "type": opt_type,
        "betas": (float(opt_cfg.get("adam_beta1", 0.9)), float(opt_cfg.get("adam_beta2", 0.999))),
        "weight_decay": float(opt_cfg.get("weight_decay", 0.0)),
        "gradient_max_norm": float(config["training"].get("gradient_max_norm", 0.0) or 0.0),
    }


def _run_pt_expt(a, meta: dict, arrays: dict, config: dict, pt_model, pt_loss, lr: float, device) -> None:
    """Steps 3 and 4 through upstream's pt_expt model, loss and wrapper (see the module doc)."""
    import copy

    import torch
    from deepmd.pt_expt.model import BaseModel as ExptModel
    from deepmd.pt_expt.train import training as expt_training
    from deepmd.pt_expt.train.wrapper import ModelWrapper as ExptWrapper

    model_params = config["model"]
    type_map = list(model_params["type_map"])
    emodel = ExptModel.deserialize(pt_model.serialize()).to(device)
    meta["backend"] = "pt-expt"
    c, t, b = _eval_inputs(a, type_map, device)
    out = emodel(c.reshape(c.shape[0], -1).clone().requires_grad_(True), t, box=b)
    _keep_eval(arrays, meta, out, t.shape, hook=False, backend="pt-expt")
    optim = _step_settings(a, config, meta)
    if optim is None:
        return
    loss = expt_training.get_loss(dict(config["loss"]), float(config["learning_rate"]["start_lr"]),
                                  len(type_map), emodel)
    ewrapper = ExptWrapper(emodel, loss, model_params=model_params).to(device)
    inp, label = _batch(a.train_system, type_map, pt_loss, pt_model, device)
    inp = {k: v for k, v in inp.items() if v is not None}
    inp["coord"] = inp["coord"].clone().requires_grad_(True)
    eparams = dict(emodel.named_parameters())
    names = [n for n, q in eparams.items() if q.requires_grad]

    def in_pt_names(values: dict) -> dict:
        """pt_expt parameter values -> {pt wrapper parameter name: value}, through serialisation."""
        m = copy.deepcopy(emodel)
        with torch.no_grad():
            for n, q in m.named_parameters():
                q.copy_(values[n])
        back = type(pt_model).deserialize(m.serialize())
        return {f"model.Default.{n}": q.detach().to(torch.float64) for n, q in back.named_parameters()}

    before = in_pt_names({n: q.detach().clone() for n, q in eparams.items()})
    ewrapper.train()
    cls = torch.optim.Adam if optim["type"] == "Adam" else torch.optim.AdamW
    opt = cls([eparams[n] for n in names], lr=lr, betas=optim["betas"], weight_decay=optim["weight_decay"],
              fused=device.type != "cpu")
    opt.zero_grad(set_to_none=True)
    _, loss_value, _ = ewrapper(**inp, cur_lr=lr, label=label, task_key="Default")
    loss_value.backward()
    if optim["gradient_max_norm"] > 0.0:
        torch.nn.utils.clip_grad_norm_([eparams[n] for n in names], optim["gradient_max_norm"])
    grads = {n: (q.grad.detach().clone() if q.grad is not None else torch.zeros_like(q)) for n, q in eparams.items()}
    with torch.device(device):
        opt.step()
    meta["loss"] = float(loss_value.detach())
    after = in_pt_names({n: q.detach().clone() for n, q in eparams.items()})
    grad_pt = in_pt_names(grads)
    for n in after:
        arrays[f"upd/{n}"] = (after[n] - before[n]).cpu().numpy()
        arrays[f"grad/{n}"] = grad_pt[n].cpu().numpy()
    meta["step"] = {"hook": False, "params": len(after), "optimizer": optim, "backend": "pt-expt"}


if __name__ == "__main__":
    from harness.child import forkserver  # served: this process stays a proxy of a forked child

    served = forkserver.delegate("harness.child.parity_eval", sys.argv[1:])
    if served is not None:
        sys.exit(served)
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
