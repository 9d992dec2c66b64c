"""Stage 5: the accuracy gate (ASC22 rule: an optimisation must give the same test results as the
reference). See docs/accuracy.md.

For every successful training run of a sweep, ``stage()`` returns a callable that

1. runs upstream's ``dp test`` in the run's backend (TF and JAX checkpoints are frozen first) on
   the run's checkpoint and the system's validation data, always with the *unpatched baseline*
   build (the judge is never patched by the variant), and parses energy RMSE/atom, force RMSE and
   virial RMSE/atom;
2. for a variant, compares those with the sweep's baseline run (same system, seed, steps) within
   a relative tolerance derived from a seed-spread calibration file
   (results/calibration/<system>-<device>-<steps>.json, written by ``dpharness calibrate``);
3. checks same-weights parity: the *baseline's* checkpoint evaluated (energy, force, virial) by
   the baseline build and by the variant's build + patch modules + input overrides, compared
   within a per-accuracy-class tolerance -- deterministic, independent of training noise;
4. checks one training step from those same weights on one fixed frame (gradients and the Adam
   update), which catches a wrong backward.

The verdict is "baseline" for the reference run itself, else "pass" or "fail" (with ``strict``
False, a variant that cannot be judged at all -- no baseline run, or no parity possible and no
calibration -- gets verdict None and says why). The gate never raises: a crash is a "fail"
whose ``detail`` names the cause.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from harness.prepare import build
from harness.results import runs as results
from harness.run import train
from harness.core.records import AccuracyResult, RunRecord
from harness.core.errors import RunFailed

from harness.core.paths import ROOT
from harness.core import fsutil
CALIBRATION = ROOT / "results" / "calibration"
CAL_SCHEMA = "dpharness.calibration/1"

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

DEFAULT_TEST_FRAMES = {"cpu": 20, "cuda": 0}  # dp test -n per validation system (0 = all)
PARITY_FRAMES = 2
DP_TEST_TIMEOUT_S = 3600
PARITY_TIMEOUT_S = 1800
METRICS = ("rmse_e_per_atom", "rmse_f", "rmse_v")
_DP_TEST_KEYS = {"Energy RMSE/Natoms": "rmse_e_per_atom", "Force  RMSE": "rmse_f",
                 "Virial RMSE/Natoms": "rmse_v"}


# ---------------------------------------------------------------- dp test

def baseline_tree(previous: list[RunRecord] | None = None) -> Path:
    """The unpatched baseline build that judges every run."""
    for r in previous or []:
        if r.run.variant.name == "baseline" and tuple(r.run.variant.chain) == ("baseline",):
            return r.run.variant.tree
    return build.build_variant("baseline").tree


def parse_dp_test(text: str) -> dict[str, float | None]:
    """RMSEs of the weighted-average block (last block) of `dp test`'s log."""
    tail = text.rsplit("weighted average of errors", 1)
    if len(tail) != 2:
        raise RuntimeError("dp test printed no 'weighted average of errors' block")
    out: dict[str, float | None] = {k: None for k in METRICS}
    for label, key in _DP_TEST_KEYS.items():
        m = re.search(re.escape(label) + r"\s*:\s*([-+0-9.eE]+|nan|inf)", tail[1])
        if m:
            out[key] = float(m.group(1))
    if out["rmse_e_per_atom"] is None and out["rmse_f"] is None:
        raise RuntimeError("dp test printed neither an energy nor a force RMSE")
    return out


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    lines = [ln for ln in lines if "Triton" not in ln]
    return " | ".join(lines[-n:])[-300:]


# dp test reads neither backend's training checkpoint: TF's is frozen to a graph, JAX's (an orbax
# directory) to StableHLO, the format upstream's JAX DeepEval loads.
FROZEN_NAME = {"tf": "frozen_model.pb", "jax": "frozen_model.hlo",
               # TF2: its checkpoint folder frozen to a SavedModel (a directory), all its DeepEval reads
               "tf2": "frozen_model.savedmodeltf"}
# pt-expt's DeepEval reads its own `.pt` training checkpoint (eager), so dp --pt-expt test takes it
# as it is. (Upstream's convert-backend cannot take that checkpoint to the PyTorch backend: its
# pt_expt serialize hook reads only exported .pte/.pt2 models, and exporting is a torch.export.)


def _frozen_model(checkpoint: Path, backend: str, out_dir: Path, env: dict[str, str], tree: Path) -> Path:
    """`dp --<backend> freeze` of the checkpoint with the baseline build. -c is the checkpoint
    itself when it is a directory (JAX), else its folder (TF: model.ckpt.index's prefix)."""
    ckpt = Path(checkpoint)
    frozen = out_dir / FROZEN_NAME[backend]
    cmd = train.launch_command(tree, (), [train.BACKEND_FLAG[backend], "freeze", "-c",
                                          str(ckpt if ckpt.is_dir() else ckpt.parent), "-o", str(frozen)])
    with open(out_dir / "dp_freeze.log", "w") as f:
        r = subprocess.run(cmd, cwd=out_dir, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=DP_TEST_TIMEOUT_S)
    if r.returncode != 0 or not frozen.exists():
        raise RuntimeError(f"dp {train.BACKEND_FLAG[backend]} freeze exit {r.returncode}: "
                           f"{_tail(out_dir / 'dp_freeze.log')}")
    return frozen


# Gate subprocesses run in their own sessions (a terminal's Ctrl-C must not kill a judge half-way);
# a stopped sweep kills them through this registry instead (stop_gates).
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
_STOPPED = threading.Event()


def _track(proc: subprocess.Popen) -> subprocess.Popen:
    with _LIVE_LOCK:
        _LIVE.add(proc)
    if _STOPPED.is_set():  # started after stop_gates ran: stop it too
        _kill(proc)
    return proc


def _untrack(proc: subprocess.Popen) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_gates() -> int:
    """Kill every running gate subprocess (dp test, parity evaluation) and refuse new ones for
    the rest of this process: the sweep was stopped. Returns how many were killed."""
    _STOPPED.set()
    with _LIVE_LOCK:
        live = list(_LIVE)
    for p in live:
        _kill(p)
    return len(live)


# Freezing traces the model with the judge's code: a patched dpmodel variant's checkpoint (jax-fix,
# tf2-xla-fix: type_one_side false) cannot be frozen by the unpatched build, whose trace stops at
# the very line the patch fixes. Those checkpoints go, through upstream's serialisation, into the
# PyTorch backend's model (its own se_e2_a code, no trace) and are tested by dp --pt test.
CONVERTED_NAME = "converted_model.pth"
_TO_PT = r"""
import importlib, sys
sys.path.insert(0, sys.argv[1])
src, dst, backend = sys.argv[2], sys.argv[3], sys.argv[4]
read = importlib.import_module(f"deepmd.{backend}.utils.serialization").serialize_from_file
from deepmd.pt.utils.serialization import deserialize_to_file


def plain(x):  # TF2's tracked ListWrapper/DictWrapper configs -> list/dict (TorchScript types them)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [plain(v) for v in x]
    return x


deserialize_to_file(dst, plain(read(src)))
"""


def _converted_model(checkpoint: Path, backend: str, out_dir: Path, env: dict[str, str], tree: Path) -> Path:
    """The checkpoint of a dpmodel-based backend as a PyTorch .pth, converted by `tree`."""
    out = out_dir / CONVERTED_NAME
    with open(out_dir / "dp_convert.log", "w") as f:
        r = subprocess.run([sys.executable, "-c", _TO_PT, str(tree), str(Path(checkpoint).resolve()), str(out),
                            backend.replace("-", "_")], cwd=out_dir, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=DP_TEST_TIMEOUT_S)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"converting the {backend} checkpoint to the PyTorch backend failed "
                           f"(exit {r.returncode}): {_tail(out_dir / 'dp_convert.log')}")
    return out


def start_dp_test(checkpoint: Path, validation: tuple[Path, ...], out_dir: Path, device: str,
                  frames: int, tree: Path, backend: str = "pt",
                  convert_to_pt: bool = False) -> tuple[subprocess.Popen, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = out_dir / "dp_test_systems.txt"
    listing.write_text("".join(f"{Path(p).resolve()}\n" for p in validation))
    log = out_dir / "dp_test.log"
    # JAX would otherwise take 75 % of the GPU, beside gates running concurrently
    jax_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if backend == "jax" else {}
    env = train.subprocess_env(device, {"DPH_VARIANT": "baseline", **jax_env}, out_dir)
    if convert_to_pt:
        model, backend = _converted_model(checkpoint, backend, out_dir, env, tree), "pt"
    elif backend in FROZEN_NAME:
        model = _frozen_model(checkpoint, backend, out_dir, env, tree)
    else:
        model = Path(checkpoint).resolve()
    # the judge is always the unpatched baseline build, in the backend that wrote the model
    cmd = train.launch_command(tree, (), [train.BACKEND_FLAG[backend], "test", "-m", str(model),
                                          "-f", str(listing), "-n", str(int(frames))])
    with open(log, "w") as f:
        proc = _track(subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True))
    return proc, log


def finish_dp_test(proc: subprocess.Popen, log: Path, frames: int) -> dict[str, Any]:
    try:
        rc = proc.wait(timeout=DP_TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"dp test timed out after {DP_TEST_TIMEOUT_S} s") from None
    finally:
        _untrack(proc)
    if rc != 0:
        raise RuntimeError(f"dp test exit {rc}: {_tail(log)}")
    res: dict[str, Any] = dict(parse_dp_test(log.read_text(errors="replace")))
    res["numb_test"] = int(frames)
    return res


def run_dp_test(checkpoint: Path, validation: tuple[Path, ...], out_dir: Path, device: str,
                frames: int, tree: Path | None = None) -> dict[str, Any]:
    """`dp --pt test` of `checkpoint` with the baseline build; returns the RMSEs."""
    proc, log = start_dp_test(checkpoint, validation, out_dir, device, frames, tree or baseline_tree())
    return finish_dp_test(proc, log, frames)


# ---------------------------------------------------------------- same-weights parity

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
    env = train.subprocess_env(device, {**env_extra, "DPH_VARIANT": name}, out.parent)
    log = out.with_suffix(".log")
    for p in (out, out.with_suffix(".json")):
        p.unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = _track(subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=f, stderr=subprocess.STDOUT,
                                       start_new_session=True))
    return proc, log


def finish_parity_eval(proc: subprocess.Popen, log: Path, out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        rc = proc.wait(timeout=PARITY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"parity evaluation timed out after {PARITY_TIMEOUT_S} s") from None
    finally:
        _untrack(proc)
    meta_p = out.with_suffix(".json")
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    if rc != 0:
        raise RuntimeError(f"parity evaluation exit {rc}: {_tail(log)}")
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    return meta, arrays


def _rel(diff: float, scale: float) -> float:
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
        out[f"max_rel_{q}"] = _rel(d, float(np.abs(b).max()) if b.size else 0.0)
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
        "step_update_max_rel": _rel(d_u, s_u),
        "step_update_max_abs": d_u,
        "step_update_masked": masked,
        "step_update_mask_floor": floor if have_grad else None,
        "step_grad_max_rel": _rel(d_g, s_g) if have_grad else None,
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
    return finish_parity_eval(proc, log, out)


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


# ---------------------------------------------------------------- calibration

def calibration_path(system: str, device: str, steps: int, directory: Path = CALIBRATION) -> Path:
    return directory / f"{system}-{device}-{int(steps)}.json"


def find_calibration(system: str, device: str, steps: int,
                     directory: Path = CALIBRATION) -> tuple[dict | None, str]:
    """The calibration for (system, device, steps), else the nearest steps for system/device."""
    exact = calibration_path(system, device, steps, directory)
    if exact.is_file():
        return json.loads(exact.read_text()), f"calibration {exact.name}"
    cands = []
    for p in directory.glob(f"{system}-{device}-*.json"):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if d.get("schema") == CAL_SCHEMA and d.get("system") == system and d.get("device") == device:
            cands.append((abs(int(d["steps"]) - int(steps)), int(d["steps"]), p.name, d))
    if not cands:
        return None, f"no seed-spread calibration for {system}"
    cands.sort(key=lambda c: c[:2])
    _, s, name, d = cands[0]
    return d, f"calibration {name} (nearest: {s} steps, none at {steps})"


def summarise(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


# Lower 5 % quantiles of chi-square with k degrees of freedom (k = seeds - 1), for the upper
# confidence bound on the seed-to-seed std; beyond the table the Wilson-Hilferty form is within 1 %.
_CHI2_LOWER_05 = {1: 0.003932, 2: 0.1026, 3: 0.3518, 4: 0.7107, 5: 1.1455, 6: 1.6354, 7: 2.1673,
                  8: 2.7326, 9: 3.3251, 10: 3.9403, 11: 4.5748, 12: 5.2260, 13: 5.8919, 14: 6.5706,
                  15: 7.2609}
# Two-sided normal quantile for a 1 % false-fail rate per metric.
GATE_Z = 2.576


def chi2_lower_05(k: int) -> float:
    if k in _CHI2_LOWER_05:
        return _CHI2_LOWER_05[k]
    return k * (1.0 - 2.0 / (9.0 * k) - 1.6449 * math.sqrt(2.0 / (9.0 * k))) ** 3


def std_upper_bound(st: dict[str, float]) -> float:
    """One-sided 95 % upper confidence bound on the seed-to-seed std, from n seeds: a spread
    estimated from 3 seeds can be 4x too small, and a gate built on it fails correct variants."""
    n = int(st["n"])
    if n < 2:
        return math.inf
    return st["std"] * math.sqrt((n - 1) / chi2_lower_05(n - 1))


def derive_threshold(st: dict[str, float], offset: float = 0.0) -> float:
    """Relative tolerance of a dp-test metric from its seed spread.

    The variant and the baseline are two independent draws of one training (other data order,
    other rounding), so their difference has std sqrt(2)*sigma; the gate admits
    GATE_Z * sqrt(2) * sigma_upper (sigma_upper: std_upper_bound), i.e. a correct variant fails
    at most ~1 % of the time per metric when the calibration's seeds are honest.  Never tighter
    than the observed range (max - min) / mean, nor than `offset` (reduced-precision classes
    only): the largest same-seed relative difference between the class's reference variant
    (upstream's fp32 override) and the baseline, i.e. what the allowed override itself changes."""
    if st["mean"] <= 0:
        return math.inf
    stat = GATE_Z * math.sqrt(2.0) * std_upper_bound(st) / st["mean"]
    return max(stat, (st["max"] - st["min"]) / st["mean"], offset)


RULE = ("rel_tol[class][metric] = max(2.576*sqrt(2)*std_upper/mean, (max-min)/mean over seeds "
        "[, max same-seed |x_class - x_float64| / x_float64 for reduced-precision classes]); "
        "std_upper = std*sqrt((n-1)/chi2_0.05(n-1)), the 95 % upper bound on the seed std")


def rederive(cal: dict[str, Any]) -> dict[str, Any]:
    """The calibration with thresholds recomputed from its own recorded runs by this rule (so a
    rule change never needs the GPU runs again)."""
    fresh = build_calibration(cal["system"], cal["device"], cal["steps"], cal["runs"], cal.get("numb_test", 0))
    fresh["created"] = cal.get("created", fresh["created"])
    fresh["rederived"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return fresh


def build_calibration(system: str, device: str, steps: int, runs: dict[str, list[dict]],
                      frames: int) -> dict[str, Any]:
    """runs: class -> [{"seed", "variant", "dp_test"}]. Stats and thresholds per class and metric."""
    stats: dict[str, dict] = {}
    thresholds: dict[str, dict] = {}
    ref = {r["seed"]: r["dp_test"] for r in runs.get("float64", []) if r.get("dp_test")}
    for cls, rs in runs.items():
        stats[cls], thresholds[cls] = {}, {}
        for m in METRICS:
            vals = [r["dp_test"][m] for r in rs if r.get("dp_test") and r["dp_test"].get(m) is not None]
            if len(vals) < 2:
                continue
            st = summarise(vals)
            offset = 0.0
            if cls != "float64":
                offs = [_rel(abs(r["dp_test"][m] - ref[r["seed"]][m]), abs(ref[r["seed"]][m]))
                        for r in rs if r["seed"] in ref and r["dp_test"].get(m) is not None
                        and ref[r["seed"]].get(m) is not None]
                if offs:
                    offset = max(offs)
                    st["max_rel_offset_vs_float64"] = offset
            stats[cls][m] = st
            thresholds[cls][m] = derive_threshold(st, offset)
    return {
        "schema": CAL_SCHEMA, "system": system, "device": device, "steps": int(steps),
        "numb_test": int(frames), "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
        "rule": RULE,
        "runs": runs, "stats": stats, "thresholds": thresholds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dp_test_verdict(var: dict, base: dict, cal: dict, cls: str) -> tuple[list[str], str]:
    """Reasons the variant's dp test differs from the baseline's by more than the calibrated
    seed spread of its class (empty: pass), and a note on which thresholds were used."""
    th = cal.get("thresholds") or {}
    note = ""
    if cls not in th:
        present = [c for c in ("float32", "float64") if c in th]
        if not present:
            return [], "calibration has no thresholds"
        used = max(present, key=lambda c: max(th[c].values(), default=0))
        note = f"class {cls} uncalibrated, using {used} thresholds"
        cls = used
    bad = []
    for m in METRICS:
        a, b, t = var.get(m), base.get(m), th[cls].get(m)
        if a is None or b is None or t is None:
            continue
        r = _rel(abs(a - b), abs(b))
        if not r <= t:
            bad.append(f"dp test {m} {a:.4g} vs baseline {b:.4g} (rel {r:.2e} > seed spread {t:.2e})")
    return bad, note


# ---------------------------------------------------------------- the stage

# backends whose model the same-weights parity can load the baseline's weights into: pt directly,
# pt-expt through upstream's serialisation (parity_eval --backend pt-expt)
PARITY_BACKENDS = ("pt", "pt-expt")


def _pt_expt_parity(rec: RunRecord, base: RunRecord, dp_proc, nframes: int, tree: Path, out: Path):
    """dp test result and three same-weights evaluations for a pt-expt run: the PyTorch baseline's
    reference, the variant's (its tree and modules, --backend pt-expt) and upstream's unpatched
    pt_expt code on the variant's input (skipped, i.e. the variant's own, when the variant is
    upstream's code alone: same tree, no modules)."""
    v, s, device = rec.run.variant, rec.run.system, rec.run.device
    var_proc = start_parity_eval(v.tree, v.modules, v.env, v.name, rec.train.input_path, base.train.checkpoint,
                                 s.validation[0], s.train[0], out, device, backend="pt-expt")
    own = Path(v.tree).resolve() == Path(tree).resolve() and not v.modules
    ref_out = out.with_name("parity_reference_pt_expt.npz")
    ref_proc = None if own else start_parity_eval(
        tree, (), {}, "pt-expt-reference", rec.train.input_path, base.train.checkpoint, s.validation[0],
        s.train[0], ref_out, device, backend="pt-expt")
    pt_ref = load_reference(base, baseline_tree([base]))
    dp = finish_dp_test(*dp_proc, nframes)
    var_res = finish_parity_eval(*var_proc, out)
    expt_res = var_res if ref_proc is None else finish_parity_eval(*ref_proc, ref_out)
    if var_res[0].get("load") == "ok" and expt_res[0].get("load") != "ok":
        raise RuntimeError(f"unpatched pt-expt parity reference: {expt_res[0].get('load')}")
    return dp, pt_ref, var_res, expt_res


def _find_baseline(rec: RunRecord, previous: list[RunRecord]) -> RunRecord | None:
    """The sweep's baseline run of the same system, seed and steps; of those, the one with the
    same GPU count (an N-GPU run trains on N times the frames, so it is judged against the N-GPU
    baseline when the sweep has one)."""
    cands = [r for r in previous
             if r.run.variant.name == "baseline" and r.run.system.name == rec.run.system.name
             and r.run.seed == rec.run.seed and r.run.steps == rec.run.steps
             and r.run.sweep_id == rec.run.sweep_id and r.train.status == "ok"
             and r.train.checkpoint is not None]
    same = [r for r in cands if r.run.gpus == rec.run.gpus]
    return (same or cands or [None])[-1]


def _fmt(d: dict | None) -> str:
    if not d:
        return "-"
    parts = [f"E/atom {d['rmse_e_per_atom']:.4g}" if d.get("rmse_e_per_atom") is not None else None,
             f"F {d['rmse_f']:.4g}" if d.get("rmse_f") is not None else None,
             f"V/atom {d['rmse_v']:.4g}" if d.get("rmse_v") is not None else None]
    return "dp test " + ", ".join(p for p in parts if p)


def evaluate(rec: RunRecord, previous: list[RunRecord], *, strict: bool = False,
             frames: int | None = None, calibration_dir: Path = CALIBRATION) -> AccuracyResult:
    """The gate for one run (may raise; `stage` wraps it)."""
    device = rec.run.device
    nframes = DEFAULT_TEST_FRAMES.get(device, 0) if frames is None else int(frames)
    tree = baseline_tree(previous + ([rec] if rec.run.variant.name == "baseline" else []))
    acc_dir = Path(rec.train.work_dir) / "accuracy"
    if rec.train.checkpoint is None:
        raise RuntimeError("training left no checkpoint")
    v = rec.run.variant
    dp_proc = start_dp_test(rec.train.checkpoint, rec.run.system.validation, acc_dir, device, nframes, tree,
                            v.backend, convert_to_pt=v.backend in ("jax", "tf2") and not v.upstream_only)
    # A baseline on N > 1 GPUs trains on N times the frames: with a 1-GPU baseline in the sweep it
    # is judged like a variant (same code, so parity is exact; dp test against the seed spread)
    # rather than taken as a reference.
    multi_gpu_baseline = (rec.run.variant.name == "baseline" and rec.run.gpus > 1
                          and _find_baseline(rec, previous) is not None)
    if rec.run.variant.name == "baseline" and not multi_gpu_baseline:
        # the reference of every variant's same-weights parity, computed once per sweep baseline
        ref_proc, ref_log, ref_out = start_reference(rec, tree)
        dp = finish_dp_test(*dp_proc, nframes)
        meta, _ = finish_parity_eval(ref_proc, ref_log, ref_out)
        if meta.get("load") != "ok":
            raise RuntimeError(f"baseline parity reference: {meta.get('load')}")
        return AccuracyResult(dp_test=dp, parity=None, verdict="baseline",
                              detail=f"reference run; {_fmt(dp)}")
    base = _find_baseline(rec, previous)
    if base is None:
        dp = finish_dp_test(*dp_proc, nframes)
        why = (f"no baseline run of sweep {rec.run.sweep_id} with the same system, seed and steps "
               "to compare with")
        return AccuracyResult(dp_test=dp, verdict="fail" if strict else None,
                              detail=f"not judged: {why}; {_fmt(dp)}")
    cls = rec.run.variant.accuracy_class
    s = rec.run.system
    out = acc_dir / "parity_variant.npz"
    reasons: list[str] = []
    notes: list[str] = []
    parity: dict[str, Any] | None = None
    if v.backend not in PARITY_BACKENDS:
        # parity loads the baseline's PyTorch weights into the variant's model: for another backend
        # that would only re-test PyTorch code, so the judge there is dp test against the seed spread
        dp = finish_dp_test(*dp_proc, nframes)
        var_meta = {"load": f"not applicable to the {v.backend} backend"}
        ref_meta = {"load": "ok"}
    elif v.backend == "pt-expt":
        dp, (ref_meta, ref), (var_meta, var), (expt_meta, expt_ref) = _pt_expt_parity(
            rec, base, dp_proc, nframes, tree, out)
    else:
        var_proc = start_parity_eval(v.tree, v.modules, v.env, v.name, rec.train.input_path,
                                     base.train.checkpoint, s.validation[0], s.train[0], out, device)
        ref_meta, ref = load_reference(base, baseline_tree([base]))
        dp = finish_dp_test(*dp_proc, nframes)
        var_meta, var = finish_parity_eval(*var_proc, out)
    if ref_meta.get("load") != "ok":
        raise RuntimeError(f"baseline parity reference: {ref_meta.get('load')}")
    if v.backend not in PARITY_BACKENDS:
        notes.append(f"same-weights parity {var_meta['load']}")
    elif var_meta.get("load") != "ok":
        notes.append("same-weights parity not applicable (the variant's parameters differ in shape: "
                     f"{str(var_meta.get('load'))[:120]})")
    elif v.backend == "pt-expt":
        # the step and the forward against upstream's unpatched pt_expt code (same backend, same
        # input); the forward also against the PyTorch baseline's (pt_expt's loss differs from
        # pt's by ~1e-8 relative on the same batch, so pt's step is no reference for it)
        parity = compare_eval(expt_ref, var, TOLERANCE[cls])
        parity["class"] = cls
        parity.update(compare_step(expt_ref, var, TOLERANCE[cls]))
        parity["reference"] = "unpatched pt-expt" + (" (the variant itself: it is upstream's code)"
                                                      if expt_meta is var_meta else "")
        parity["vs_pt"] = compare_eval(ref, var, TOLERANCE[cls])
        reasons += parity_verdict(parity, cls)
        reasons += [f"vs the PyTorch baseline: {r}" for r in parity_verdict(parity["vs_pt"], cls)]
        notes.append(f"pt-expt parity through pt_expt's own model/loss (eager; a compiled graph is judged "
                     f"by dp test); forward vs the PyTorch baseline F rel {parity['vs_pt']['max_rel_f']:.1e}")
    else:
        parity = compare_eval(ref, var, TOLERANCE[cls])
        parity["class"] = cls
        parity.update(compare_step(ref, var, TOLERANCE[cls]))
        if isinstance(var_meta.get("step"), str):
            notes.append(var_meta["step"])
        reasons += parity_verdict(parity, cls)
    base_dp = base.accuracy.dp_test if base.accuracy and base.accuracy.dp_test else None
    if base_dp is None:
        base_dp = run_dp_test(base.train.checkpoint, s.validation, Path(base.train.work_dir) / "accuracy",
                              device, nframes, tree)
    cal, cal_note = find_calibration(s.name, device, rec.run.steps, calibration_dir)
    notes.append(cal_note)
    if cal is not None:
        bad, note = dp_test_verdict(dp, base_dp, cal, cls)
        reasons += bad
        if note:
            notes.append(note)
    judged = parity is not None or cal is not None
    if not judged:
        return AccuracyResult(dp_test=dp, parity=parity, verdict="fail" if strict else None,
                              detail="not judged: " + "; ".join(notes) + f"; {_fmt(dp)}")
    if parity is not None:
        head = (f"parity F rel {parity['max_rel_f']:.1e} (tol {TOLERANCE[cls]:.0e}, {cls})"
                + (f", step {parity['step_update_max_rel']:.1e}" if parity.get("step_update_max_rel") is not None else ""))
    else:
        head = "dp test vs calibrated seed spread only"
    if reasons:
        return AccuracyResult(dp_test=dp, parity=parity, verdict="fail",
                              detail="; ".join(reasons + notes))
    return AccuracyResult(dp_test=dp, parity=parity, verdict="pass", detail="; ".join([head] + notes))


def stage(strict: bool = False, frames: int | None = None,
          calibration_dir: Path = CALIBRATION) -> Callable[[RunRecord, list[RunRecord]], AccuracyResult]:
    """The accuracy stage bench.run calls after each successful training run."""

    def accuracy_stage(rec: RunRecord, previous: list[RunRecord]) -> AccuracyResult:
        try:
            res = evaluate(rec, previous, strict=strict, frames=frames, calibration_dir=calibration_dir)
            if rec.run.variant.name == "baseline" and res.verdict != "baseline":
                # a judged N-GPU baseline is still the parity reference of the sweep's N-GPU
                # variants: cache it now, before their gates may run concurrently
                load_reference(rec, baseline_tree(previous + [rec]))
            return res
        except Exception as e:  # the gate must never crash the bench: a crash is a fail
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            return AccuracyResult(verdict="fail", detail=f"accuracy gate error: {msg}")

    accuracy_stage.stop = stop_gates  # bench calls it when the sweep is stopped mid-gate
    return accuracy_stage


# ---------------------------------------------------------------- CLI

def _dp_test_only(frames: int | None) -> Callable[[RunRecord, list[RunRecord]], AccuracyResult]:
    def st(rec: RunRecord, previous: list[RunRecord]) -> AccuracyResult:
        n = DEFAULT_TEST_FRAMES.get(rec.run.device, 0) if frames is None else frames
        try:
            dp = run_dp_test(rec.train.checkpoint, rec.run.system.validation,
                             Path(rec.train.work_dir) / "accuracy", rec.run.device, n)
        except Exception as e:
            return AccuracyResult(verdict="fail", detail=f"accuracy gate error: {e}"[:400])
        return AccuracyResult(dp_test=dp, detail="calibration run")

    st.stop = stop_gates
    return st


CALIBRATION_VARIANTS = {"float64": "baseline", "float32": "fp32"}


def calibrate(system: str, steps: int | str, device: str, seeds: list[int], classes: list[str],
              frames: int | None = None, out_dir: Path = CALIBRATION, work_root: Path = results.WORK,
              log: Callable[[str], None] = print, jobs: int = 1, extend: bool = False) -> Path:
    """Train each class's reference variant with every seed, dp-test each, write the calibration.
    extend: keep the seeds already in the (system, device, steps) file and add these (a tighter
    upper bound on the spread without re-running the old seeds)."""
    from harness.run import bench

    if len(seeds) < 3 and not extend:
        from harness.core.errors import UserError

        raise UserError("calibrate needs at least 3 seeds (a spread of two is no spread)")
    variants = [CALIBRATION_VARIANTS[c] for c in classes]
    runs: dict[str, list[dict]] = {c: [] for c in classes}
    resolved: dict[str, Any] = {}
    from harness.core.progress import Progress

    seeds_done = Progress(len(seeds), f"calibrate {system}", unit="seeds", stream=sys.stdout, tty=False,
                          every=1e-9, rate_from_start=True)
    lock = threading.Lock()

    def one_seed(seed: int) -> tuple[int, dict[str, Any], list[dict]]:
        req = bench.BenchRequest(system=system, variants=variants, steps=steps, device=device, seed=seed,
                                 runs_dir=out_dir / "runs", work_root=work_root)
        rows = bench.run(req, log=log, accuracy_stage=_dp_test_only(frames))
        with lock:
            seeds_done.update_to(seeds_done.n + 1)
        return seed, req, rows

    # seeds are independent and only their accuracy matters (not their speed): run `jobs` at once
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(one_seed, seeds))
    for seed, req, rows in outcomes:
        resolved = {"steps": req.steps, "device": rows[0]["device"]["kind"] if rows else device,
                    "system": rows[0]["system"] if rows else system}
        for cls, r in zip(classes, rows):
            acc = r.get("accuracy") or {}
            if r["status"] != "ok" or not acc.get("dp_test"):
                raise RunFailed(f"calibration run {r['run_id']} failed: {r.get('error') or acc.get('detail')}")
            runs[cls].append({"seed": seed, "variant": r["variant"], "run_id": r["run_id"],
                              "dp_test": acc["dp_test"]})
            log(f"seed {seed} {r['variant']}: {_fmt(acc['dp_test'])}")
    n = frames if frames is not None else DEFAULT_TEST_FRAMES.get(resolved["device"], 0)
    path = calibration_path(resolved["system"], resolved["device"], resolved["steps"], out_dir)
    if extend and path.is_file():
        old = json.loads(path.read_text())
        if int(old.get("numb_test", n)) != n:
            raise RunFailed(f"{path.name} was measured with {old.get('numb_test')} dp-test frames, not {n}")
        for cls, rs in old.get("runs", {}).items():
            new_seeds = {r["seed"] for r in runs.get(cls, [])}
            runs.setdefault(cls, [])[:0] = [r for r in rs if r["seed"] not in new_seeds]
    if min((len(rs) for rs in runs.values()), default=0) < 3:
        raise RunFailed(f"calibration of {resolved['system']} has fewer than 3 seeds per class")
    cal = build_calibration(resolved["system"], resolved["device"], resolved["steps"], runs, n)
    fsutil.atomic_write_json(path, cal)
    return path


def parity_check(system: str, variant: str, checkpoint: Path | None = None, device: str = "auto",
                 steps: int = 20, runs_dir: Path = results.RUNS, work_dir: Path | None = None) -> dict[str, Any]:
    """Same-weights parity of `variant` against baseline on a baseline checkpoint, without training.
    The checkpoint defaults to the newest successful baseline run of `system` in runs_dir."""
    from harness.run import bench
    from harness.prepare import systems
    from harness.prepare import variants
    from harness.core.errors import UserError

    backend = variants.load_variant(variant).backend
    if backend != "pt":  # parity runs PyTorch code: for another backend it would judge the wrong model
        return {"variant": variant, "verdict": "not applicable",
                "detail": f"same-weights parity not applicable to the {backend} backend"}
    dev = bench.resolve_device(device)
    sysobj = systems.load_system(system)
    if checkpoint is None:
        found = [r for r in results.load_runs(runs_dir) if r.get("variant") == "baseline"
                 and r.get("system") == sysobj.name and r.get("status") == "ok"
                 and (r.get("artifacts") or {}).get("checkpoint")]
        for r in sorted(found, key=lambda r: r.get("created", ""), reverse=True):
            p = Path(r["artifacts"]["checkpoint"])
            p = p if p.is_absolute() else ROOT / p
            if p.is_file():
                checkpoint = p
                break
        if checkpoint is None:
            raise UserError(f"no baseline checkpoint of {sysobj.name} under {runs_dir}: pass --checkpoint")
    bb, vb = build.build_variant("baseline"), build.build_variant(variant)
    wd = work_dir or results.WORK / f"parity-{time.strftime('%Y%m%dT%H%M%S')}-{sysobj.name}-{variant}"
    wd.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for b in (bb, vb):
        p = wd / f"input-{b.name}.json"
        p.write_text(json.dumps(train.make_input(sysobj, b.overrides, steps, upstream_options=b.upstream_options),
                                indent=2))
        inputs[b.name] = p
    rp = start_parity_eval(bb.tree, (), {}, "baseline", inputs["baseline"], checkpoint, sysobj.validation[0],
                           sysobj.train[0], wd / "parity_baseline.npz", dev)
    vp = start_parity_eval(vb.tree, vb.modules, vb.env, vb.name, inputs[vb.name], checkpoint,
                           sysobj.validation[0], sysobj.train[0], wd / "parity_variant.npz", dev)
    rmeta, ref = finish_parity_eval(*rp, wd / "parity_baseline.npz")
    vmeta, var = finish_parity_eval(*vp, wd / "parity_variant.npz")
    if vmeta.get("load") != "ok" or rmeta.get("load") != "ok":
        return {"variant": variant, "verdict": "not applicable", "detail": vmeta.get("load") or rmeta.get("load")}
    par = compare_eval(ref, var, TOLERANCE[vb.accuracy_class])
    par["class"] = vb.accuracy_class
    par.update(compare_step(ref, var, TOLERANCE[vb.accuracy_class]))
    bad = parity_verdict(par, vb.accuracy_class)
    return {"variant": variant, "system": sysobj.name, "checkpoint": str(checkpoint), "parity": par,
            "verdict": "fail" if bad else "pass", "detail": "; ".join(bad) or "within tolerance"}


def calibration_from_runs(system: str, device: str, steps: int, directory: Path = CALIBRATION) -> Path:
    """Rebuild (system, device, steps)'s calibration from the run records under directory/runs
    (a calibration call cut short by its time limit keeps every seed it finished): each class's
    reference variant, ok and dp-tested, one record per seed (the newest)."""
    by_variant = {v: c for c, v in CALIBRATION_VARIANTS.items()}
    runs: dict[str, dict[int, dict]] = {c: {} for c in CALIBRATION_VARIANTS}
    frames = set()
    for r in sorted(results.load_runs(directory / "runs"), key=lambda r: r.get("created", "")):
        dev = (r.get("device") or {}).get("kind")
        dp = (r.get("accuracy") or {}).get("dp_test")
        if (r.get("system") != system or dev != device or int(r.get("steps") or -1) != int(steps)
                or r.get("variant") not in by_variant or r.get("status") != "ok" or not dp):
            continue
        frames.add(int(dp.get("numb_test", 0)))
        runs[by_variant[r["variant"]]][int(r["seed"])] = {
            "seed": int(r["seed"]), "variant": r["variant"], "run_id": r["run_id"], "dp_test": dp}
    if len(frames) > 1:
        raise RunFailed(f"{system}: calibration runs used different dp-test frame counts {sorted(frames)}")
    runs_l = {c: [rs[k] for k in sorted(rs)] for c, rs in runs.items() if len(rs) >= 3}
    if "float64" not in runs_l:
        raise RunFailed(f"{system}-{device}-{steps}: fewer than 3 finished baseline seeds under {directory / 'runs'}")
    cal = build_calibration(system, device, int(steps), runs_l, frames.pop() if frames else 0)
    path = calibration_path(system, device, steps, directory)
    fsutil.atomic_write_json(path, cal)
    return path


def _print_calibration(cal: dict[str, Any]) -> None:
    for cls, th in cal["thresholds"].items():
        for m, t in th.items():
            st = cal["stats"][cls][m]
            print(f"{cal['system']:8} {cls:8} {m:16} n {st['n']} mean {st['mean']:.5g} std {st['std']:.2g} "
                  f"[{st['min']:.5g}, {st['max']:.5g}] -> rel tol {t:.3g}")


def _cmd_calibrate(a: argparse.Namespace) -> int:
    if a.from_runs:
        steps = int(a.steps) if str(a.steps).isdigit() else None
        if steps is None or a.device not in ("cpu", "cuda"):
            from harness.core.errors import UserError

            raise UserError("--from-runs needs --steps N and --device cpu|cuda (the calibration to rebuild)")
        path = calibration_from_runs(a.system, a.device, steps)
        _print_calibration(json.loads(path.read_text()))
        print(f"wrote {path}", file=sys.stderr)
        return 0
    if a.rederive:
        files = sorted(CALIBRATION.glob("*.json"))
        for f in files:
            cal = rederive(json.loads(f.read_text()))
            fsutil.atomic_write_json(f, cal)
            _print_calibration(cal)
            print(f"rederived {f}", file=sys.stderr)
        return 0
    seeds = [int(s) for s in str(a.seeds).split(",") if s.strip()]
    classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    for c in classes:
        if c not in CALIBRATION_VARIANTS:
            from harness.core.errors import UserError

            raise UserError(f"--classes: {c!r} is not one of {', '.join(CALIBRATION_VARIANTS)}")
    path = calibrate(a.system, a.steps, a.device, seeds, classes, frames=a.frames,
                     log=lambda m: print(m, file=sys.stderr), jobs=a.jobs, extend=a.extend)
    _print_calibration(json.loads(path.read_text()))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_parity(a: argparse.Namespace) -> int:
    out = parity_check(a.system, a.variant, Path(a.checkpoint) if a.checkpoint else None, a.device)
    print(json.dumps(out, indent=1))
    return 4 if out.get("verdict") == "fail" else 0


def register_cli(subparsers) -> None:
    """Add `calibrate` and `parity` to dpharness's sub-command parser (cli.build_parser)."""
    c = subparsers.add_parser("calibrate", help="seed-spread calibration of the accuracy gate's dp-test tolerance")
    c.add_argument("--system", default="water")
    c.add_argument("--steps", default="auto", help="training steps (use the sweep's; auto: 300 GPU, 20 CPU)")
    c.add_argument("--device", default="auto")
    c.add_argument("--seeds", default="1,2,3", help="comma list, at least 3")
    c.add_argument("--jobs", type=int, default=1, help="seeds trained at once (a GPU has room for several)")
    c.add_argument("--classes", default="float64,float32", help="accuracy classes to calibrate (float64,float32)")
    c.add_argument("--frames", type=int, default=None, help="dp test frames per validation system (0 = all)")
    c.add_argument("--extend", action="store_true",
                   help="add these seeds to the existing calibration of (system, device, steps)")
    c.add_argument("--from-runs", action="store_true",
                   help="rebuild the calibration from its run records under results/calibration/runs (no training)")
    c.add_argument("--rederive", action="store_true",
                   help="recompute every committed calibration's thresholds from its recorded runs (no training)")
    c.set_defaults(func=_cmd_calibrate)
    p = subparsers.add_parser("parity", help="same-weights parity of a variant vs baseline (no training)")
    p.add_argument("--system", default="water")
    p.add_argument("--variant", required=True)
    p.add_argument("--checkpoint", default=None, help="baseline checkpoint (default: newest baseline run)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_parity)
