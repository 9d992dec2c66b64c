"""What the fast engine (engines/dpfast: graph, fused and their kin) trains, decided from the
input JSON alone, before anything is built or trained. It mirrors the start-up check inside the
training child (engines/dpfast/support.py check_supported), which stays the backstop for what
only the built trainer can see (unsorted atoms, mixed_type data): every key below is one that
check refuses, named the way the user wrote it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.core.errors import UserError

SEA = ("se_e2_a", "se_a")
ADAM = ("Adam", "AdamW")
FUSED_ACTIVATIONS = ("tanh", "linear", "none")  # engines/dpfast/analytic_nets.py


def dotted(d: Any, path: str, default: Any = None) -> Any:
    """d["a"]["b"] for path "a.b"; default where a level is missing or not a dict."""
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _on(v: Any) -> bool:
    """A key that turns a feature on: true, a non-zero number, a non-empty list or dict."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v != 0
    return bool(v)


def _pair(loss: dict, term: str, both: bool) -> bool:
    # upstream's EnergyStdLoss: has_ae/has_pf/has_gf need start AND limit non-zero, has_h either
    s, lim = loss.get(f"start_pref_{term}", 0.0) or 0.0, loss.get(f"limit_pref_{term}", 0.0) or 0.0
    return (s != 0 and lim != 0) if both else (s != 0 or lim != 0)


def engine_refusal(inp: dict[str, Any], engine_variant: str = "fused") -> str | None:
    """The first input key the fast engine does not train, as 'key = value (why)'; None: it trains
    this input. engine_variant 'fused' also checks the activations its hand-written VJPs cover."""
    model = inp.get("model") if isinstance(inp.get("model"), dict) else {}
    if "model_dict" in model:
        return "model.model_dict (multi-task training)"
    if model.get("type", "standard") not in ("standard", "ener"):
        return f"model.type = {model.get('type')!r} (only the standard energy model)"
    for key in ("type_embedding", "spin", "lora"):
        if model.get(key) is not None:
            return f"model.{key} (only a plain se_e2_a energy model)"
    for key in ("pair_exclude_types", "atom_exclude_types"):
        if _on(model.get(key)):
            return f"model.{key}"
    desc = model.get("descriptor") if isinstance(model.get("descriptor"), dict) else {}
    if desc.get("type", "se_e2_a") not in SEA:
        return f"model.descriptor.type = {desc.get('type')!r} (only se_e2_a)"
    if _on(desc.get("exclude_types")):
        return "model.descriptor.exclude_types"
    fit = model.get("fitting_net") if isinstance(model.get("fitting_net"), dict) else {}
    if fit.get("type", "ener") != "ener":
        return f"model.fitting_net.type = {fit.get('type')!r} (only ener)"
    for key in ("numb_fparam", "numb_aparam", "dim_case_embd", "exclude_types"):
        if _on(fit.get(key)):
            return f"model.fitting_net.{key} = {fit.get(key)!r}"
    if any(x is not None for x in (fit.get("atom_ener") or [])):
        return "model.fitting_net.atom_ener"
    if engine_variant.startswith("fused"):
        for where, sect in (("descriptor", desc), ("fitting_net", fit)):
            act = str(sect.get("activation_function", "tanh")).lower()
            if act not in FUSED_ACTIVATIONS:
                return f"model.{where}.activation_function = {act!r} (fused: tanh or linear)"
    loss = inp.get("loss") if isinstance(inp.get("loss"), dict) else {}
    if loss.get("type", "ener") != "ener":
        return f"loss.type = {loss.get('type')!r} (only ener)"
    for term, both in (("ae", True), ("pf", True), ("gf", True), ("h", False)):
        if _pair(loss, term, both):
            return f"loss.start_pref_{term}/limit_pref_{term} (only energy/force/virial terms)"
    for key in ("relative_f", "enable_atom_ener_coeff"):
        if _on(loss.get(key)):
            return f"loss.{key}"
    opt = dotted(inp, "optimizer.type") or dotted(inp, "training.opt_type") or "Adam"
    if opt not in ADAM:
        return f"optimizer {opt!r} (only Adam/AdamW)"
    tr = inp.get("training") if isinstance(inp.get("training"), dict) else {}
    for key in ("enable_ema", "gradient_max_norm", "disp_avg", "change_bias_after_training", "zero_stage",
                "tensorboard", "enable_profiler", "profiling"):
        if _on(tr.get(key)):
            return f"training.{key} = {tr.get(key)!r}"
    for part in ("training_data", "validation_data"):
        data = tr.get(part) if isinstance(tr.get(part), dict) else {}
        if _on(data.get("min_pair_dist")):
            return f"training.{part}.min_pair_dist"
        systems = data.get("systems")
        for s in [systems] if isinstance(systems, str) else (systems or []):
            if str(s).rstrip("/").endswith(".lmdb"):
                return f"training.{part}.systems {s!r} (LMDB data; the engine reads npy systems)"
    if _on(dotted(inp, "validating.full_validation")):
        return "validating.full_validation"
    return None


def refusal_message(where: str | Path, variant: str, why: str) -> str:
    return (f"{where}: variant {variant} does not train {why}; `--variant baseline` (upstream) trains it")


def check_engine_input(inp: dict[str, Any], variant: str, where: str | Path) -> None:
    """UserError (exit 2) naming the key when `variant`'s engine does not train `inp`."""
    why = engine_refusal(inp, variant)
    if why is not None:
        raise UserError(refusal_message(where, variant, why))


CHILD_MARK = "unsupported input: "  # what engines/dpfast/support.py refuse() writes


def child_refusal(error: str | None, variant: str, where: str | Path) -> str | None:
    """The one-line refusal for a training child that stopped on the engine's own check
    (support.Unsupported in its log), None for any other failure."""
    if not error or CHILD_MARK not in error:
        return None
    why = error.split(CHILD_MARK, 1)[1].split(" (at deepmd/")[0].strip()
    return refusal_message(where, variant, why)
