"""What the fast engines (graph, fused) train: ``check_supported`` refuses, with ``Unsupported``
naming the input, every upstream set-up outside their scope (one se_e2_a energy model, Adam/AdamW,
the energy/force/virial loss, npy data, ...), so an unsupported input fails at start-up instead of
training something else than upstream would."""
from __future__ import annotations

from typing import Any


class Unsupported(RuntimeError):
    pass


def refuse(msg: str, variant: str = "graph") -> None:
    raise Unsupported(f"{variant} variant: unsupported input: {msg}")


def check_supported(tr: Any) -> None:
    from deepmd.pt.loss import EnergyStdLoss
    from deepmd.pt.model.descriptor.se_a import DescrptSeA

    if tr.multi_task:
        refuse("multi-task training")
    if tr.world_size > 1 and not tr.is_distributed:
        refuse("world_size > 1 without torch.distributed")
    if tr.opt_type not in ("Adam", "AdamW"):
        refuse(f"optimizer {tr.opt_type} (only Adam/AdamW)")
    if tr.enable_ema:
        refuse("training.enable_ema")
    if tr.gradient_max_norm and tr.gradient_max_norm > 0:
        refuse("training.gradient_max_norm")
    if tr.disp_avg:
        refuse("training.disp_avg")
    if tr.change_bias_after_training:
        refuse("training.change_bias_after_training")
    if tr.has_min_pair_filter:
        refuse("training_data.min_pair_dist")
    if tr.sharding.enabled:
        refuse("training.zero_stage")
    if tr.full_validator is not None:
        refuse("validating.full_validation")
    if tr.enable_tensorboard or tr.enable_profiler or tr.profiling:
        refuse("tensorboard/profiler")
    if getattr(tr, "_lora_enabled", False):
        refuse("LoRA")
    ds = tr.training_dataloader.dataset
    if not hasattr(ds, "systems"):
        refuse("non-npy (e.g. LMDB) training data")
    loss = tr.loss
    if type(loss) is not EnergyStdLoss:
        refuse(f"loss {type(loss).__name__} (only 'ener')")
    if loss.has_ae or loss.has_pf or loss.has_gf or loss.has_h:
        refuse("loss terms other than energy/force/virial")
    if loss.relative_f is not None or loss.enable_atom_ener_coeff:
        refuse("loss relative_f / enable_atom_ener_coeff")
    model = tr.model
    am = getattr(model, "atomic_model", None)
    if am is None or type(am).__name__ != "DPEnergyAtomicModel":
        refuse(f"model {type(model).__name__} (only standard energy model)")
    if type(model).__name__ not in ("EnergyModel",):
        refuse(f"model {type(model).__name__} (only standard energy model)")
    desc = am.descriptor
    if type(desc) is not DescrptSeA:
        refuse(f"descriptor {type(desc).__name__} (only se_e2_a)")
    sea = desc.sea
    if sea.compress:
        refuse("compressed descriptor")
    if list(sea.exclude_types):
        refuse("descriptor exclude_types")
    if getattr(am, "pair_excl", None) is not None or getattr(am, "atom_excl", None) is not None:
        refuse("pair/atom exclude types")
    fit = am.fitting_net
    if type(fit).__name__ != "EnergyFittingNet":
        refuse(f"fitting {type(fit).__name__}")
    if fit.numb_fparam > 0 or fit.numb_aparam > 0 or fit.dim_case_embd > 0:
        refuse("fparam/aparam/case embedding")
    if fit.remove_vaccum_contribution is not None:
        refuse("fitting remove_vaccum_contribution (atom_ener)")
    if list(getattr(fit, "exclude_types", []) or []):
        refuse("fitting exclude_types")
    if getattr(model, "has_spin", False) is True:
        refuse("spin")
