"""Same-weights parity: the baseline's checkpoint evaluated by the baseline build and by the
variant's build, compared per accuracy class; one training step from those weights compared too."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any
import numpy as np

from harness.core import envvars
from harness.run import train
from harness.core.records import RunRecord
from harness.judge.processes import UpstreamOutOfMemory, log_tail, oom_line, track, wait_tracked


# Same-weights parity tolerance per accuracy class: relative error max|a-b| / max|b| of energy,
# force and virial. float64: a float64 variant may only reorder float64 arithmetic (measured
# reorderings stay ~1e-13..1e-12); float32: upstream's own fp32 precision override evaluated on
# fp64 weights differs by ~1e-7..3e-6 (measured on water, see docs/accuracy.md); mixed: bf16/tf32
# style kernels with float32 accumulation.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "mixed": 1e-3}


# One training step is compared at TOLERANCE x STEP_FACTOR, for two reasons.
# (a) The update is the difference of two stored parameters, p' - p, so in the model's precision
#     it is quantised at ulp(|p|): relative to the update size (lr = 1e-3 at step 0 upstream) that
#     is eps_mach * |p| / lr ~ 6e-8 / 1e-3 = 6e-5 for float32 weights of order 1, i.e. ~6x the
#     float32 class tolerance; for float64 it is ~1e-13, far inside 100 x 1e-10.
# (b) The gradient of the force loss is a mixed second derivative (d/dθ of dE/dr) summed over
#     every atom with upstream's force prefactor (1000 at step 0): more accumulated rounding and
#     cancellation than the forward; measured fp32-vs-fp64 gradient differences are ~2e-6 of the
#     largest gradient, and up to ~5e-4 of the update for elements whose gradient is near Adam's
#     eps. x100 keeps >=2x headroom over those measurements while a 1e-6 relative error in the
#     forward (the broken-force test variant) still fails by orders of magnitude in float64.
STEP_FACTOR = 100


# Adam's first step moves each element by lr * g / (|g| + eps). Where |g| is within ~1e3 * eps of
# zero the direction is set by eps, not by the gradient, and rounding noise of the gradient is
# amplified by up to 1/eps: those elements are compared through the gradient check only.
ADAM_EPS = 1e-8


UPDATE_MASK_G = 1e3 * ADAM_EPS


PARITY_FRAMES = 2


PARITY_TIMEOUT_S = 1800


def start_parity_eval(tree: Path, modules: tuple[Path, ...], env_extra: dict[str, str], name: str,
                      input_path: Path, checkpoint: Path, eval_system: Path, train_system: Path | None,
                      out: Path, device: str, frames: int = PARITY_FRAMES,
                      backend: str = "pt") -> tuple[subprocess.Popen, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "harness.child.parity_eval", "--tree", str(tree), "--backend", backend]
    for m in modules:
        cmd += ["--module", str(m)]
    cmd += ["--input", str(Path(input_path).resolve()), "--checkpoint", str(Path(checkpoint).resolve()),
            "--eval-system", str(Path(eval_system).resolve()), "--frames", str(int(frames)),
            "--out", str(out.resolve())]
    if train_system is not None:
        cmd += ["--train-system", str(Path(train_system).resolve())]
    env = train.subprocess_env(device, {**env_extra, envvars.DPH_VARIANT: name}, out.parent)
    log = out.with_suffix(".log")
    for p in (out, out.with_suffix(".json")):
        p.unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = track(subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return proc, log


def finish_parity_eval(proc: subprocess.Popen, log: Path, out: Path,
                       upstream: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """upstream: the child ran the unpatched baseline build (the reference), so running out of
    memory there is upstream's limit (UpstreamOutOfMemory), not the variant's failure."""
    rc = wait_tracked(proc, PARITY_TIMEOUT_S, "parity evaluation")
    meta_p = out.with_suffix(".json")
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    if rc != 0:
        oom = oom_line(log.read_text(errors="replace")) if upstream and log.is_file() else None
        if oom:
            raise UpstreamOutOfMemory(f"upstream's parity reference ran out of memory (exit {rc}): {oom}")
        raise RuntimeError(f"parity evaluation exit {rc}: {log_tail(log)}")
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def relative(diff: float, scale: float) -> float:
    """diff / scale; against a zero scale 0 for no difference, infinity for any other."""
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.inf


def compare_eval(ref: dict[str, np.ndarray], var: dict[str, np.ndarray], tol: float) -> dict[str, Any]:
    """Max abs/rel differences of energy, force, virial (relative: max|a-b| / max|b|)."""
    out: dict[str, Any] = {}
    for q, key in (("e", "energy"), ("f", "force"), ("v", "virial")):
        a, b = var[key].astype(np.float64), ref[key].astype(np.float64)
        if a.shape != b.shape:
            raise RuntimeError(f"parity: {key} shape {a.shape} != baseline {b.shape}")
        d = float(np.abs(a - b).max()) if a.size else 0.0
        if not np.all(np.isfinite(a)):
            d = math.inf
        out[f"max_abs_{q}"] = d
        out[f"max_rel_{q}"] = relative(d, float(np.abs(b).max()) if b.size else 0.0)
    out["rms_f"] = float(np.sqrt(np.mean((var["force"] - ref["force"]) ** 2)))
    out["tolerance"] = tol
    out["frames"] = int(ref["energy"].shape[0])
    return out


def compare_step(ref: dict[str, np.ndarray], var: dict[str, np.ndarray], tol: float = 0.0) -> dict[str, Any]:
    """Differences of one training step: parameter updates and (when both have them) gradients.

    tol: the class's relative tolerance. The gradient check admits errors up to
    STEP_FACTOR * tol * max|g|; an element whose |g| is below that may legitimately change sign,
    which flips Adam's first update (~lr * sign(g)) by 2 lr. Such elements are judged by the
    gradient check only, like the eps-dominated ones (UPDATE_MASK_G)."""
    upd = sorted(k for k in ref if k.startswith("upd/") and ref[k].size)
    if not upd:
        return {"step_update_max_rel": None, "step_grad_max_rel": None}
    missing = [k for k in upd if k not in var or var[k].shape != ref[k].shape]
    if missing:
        raise RuntimeError(f"parity step: parameter {missing[0][4:]} missing or reshaped in the variant")
    have_grad = all(k.replace("upd/", "grad/", 1) in ref and k.replace("upd/", "grad/", 1) in var for k in upd)
    d_u, s_u, d_g, s_g, masked = 0.0, 0.0, 0.0, 0.0, 0
    g_max = max((float(np.abs(ref[k.replace("upd/", "grad/", 1)]).max()) for k in upd), default=0.0) \
        if have_grad else 0.0
    floor = max(UPDATE_MASK_G, STEP_FACTOR * tol * g_max)
    for k in upd:
        du = np.abs(var[k] - ref[k])
        if not np.all(np.isfinite(var[k])):
            du = np.full_like(du, np.inf)
        s_u = max(s_u, float(np.abs(ref[k]).max()))
        if have_grad:
            g = k.replace("upd/", "grad/", 1)
            gr = ref[g]
            ok = np.abs(gr) >= floor
            masked += int((~ok).sum())
            if ok.any():
                d_u = max(d_u, float(du[ok].max()))
            dg = np.abs(var[g] - gr)
            d_g = max(d_g, float(dg.max()) if np.all(np.isfinite(var[g])) else math.inf)
            s_g = max(s_g, float(np.abs(gr).max()))
        else:
            d_u = max(d_u, float(du.max()))
    return {
        "step_update_max_rel": relative(d_u, s_u),
        "step_update_max_abs": d_u,
        "step_update_masked": masked,
        "step_update_mask_floor": floor if have_grad else None,
        "step_grad_max_rel": relative(d_g, s_g) if have_grad else None,
        "step_params": len(upd),
    }


def reference_paths(base: RunRecord) -> Path:
    return Path(base.train.work_dir) / "accuracy" / "parity_baseline.npz"


def start_reference(base: RunRecord, tree: Path) -> tuple[subprocess.Popen, Path, Path]:
    s = base.run.system
    out = reference_paths(base)
    proc, log = start_parity_eval(tree, (), {}, "baseline", base.train.input_path, base.train.checkpoint,
                                  s.validation[0], s.train[0], out, base.run.device)
    return proc, log, out


def load_reference(base: RunRecord, tree: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The baseline build's same-weights outputs for the sweep baseline (computed once, cached)."""
    out = reference_paths(base)
    if out.is_file() and out.with_suffix(".json").is_file():
        meta = json.loads(out.with_suffix(".json").read_text())
        if meta.get("load") == "ok" and meta.get("eval"):
            with np.load(out) as z:
                return meta, {k: z[k] for k in z.files}
    proc, log, out = start_reference(base, tree)
    return finish_parity_eval(proc, log, out, upstream=True)


def parity_verdict(par: dict[str, Any], cls: str) -> list[str]:
    """Reasons the parity numbers fail their class tolerance (empty: pass)."""
    tol = TOLERANCE[cls]
    bad = [f"{q} rel {par[f'max_rel_{q}']:.2e} > {tol:.0e}" for q in ("e", "f", "v")
           if not par[f"max_rel_{q}"] <= tol]
    stol = tol * STEP_FACTOR
    for key, label in (("step_update_max_rel", "step update"), ("step_grad_max_rel", "step gradient")):
        v = par.get(key)
        if v is not None and not v <= stol:
            bad.append(f"{label} rel {v:.2e} > {stol:.0e}")
    return bad
