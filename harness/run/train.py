"""Stage 4: the training run. Writes the run's input.json (system input + the variant's allowed
overrides + the sweep's step count), runs upstream's `dp <backend> train` through
harness.child.launch in a subprocess with the variant tree first on the path, and collects what it
observed (per-step times, peak memory, lcurve, checkpoint) into a TrainResult."""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.core import envvars, paths
from harness.run import distributed
from harness.core.errors import UserError
from harness.core.records import ALLOWED_OVERRIDES, RunSpec, System, TrainResult

BACKEND_FLAG = {"pt": "--pt", "jax": "--jax", "tf": "--tf", "pt-expt": "--pt-expt", "tf2": "--tf2"}


def set_path(d: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def get_path(d: dict[str, Any], path: str, default: Any = None) -> Any:
    for k in path.split("/"):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def make_input(system: System, overrides: dict[str, Any], steps: int, seed: int | None = None,
               upstream_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The input a run trains with. Only the ALLOWED_OVERRIDES differ between variants, plus, for
    the upstream-native variants, upstream's own switches (variants.UPSTREAM_OPTIONS, outside the
    three-parameter rule); the step count, display and save frequency are benchmark settings
    shared by every variant of a sweep."""
    from harness.prepare.variants import UPSTREAM_OPTIONS

    inp = copy.deepcopy(system.input)
    for key, value in overrides.items():
        if key not in ALLOWED_OVERRIDES:
            raise UserError(f"override {key!r} is not allowed (only {', '.join(ALLOWED_OVERRIDES)})")
        set_path(inp, key, value)
    for key, value in (upstream_options or {}).items():
        if key not in UPSTREAM_OPTIONS or type(value) is not UPSTREAM_OPTIONS[key][0]:
            raise UserError(f"upstream option {key} = {value!r} is not allowed "
                            f"(only {', '.join(UPSTREAM_OPTIONS)}, booleans)")
        set_path(inp, key, value)
    tr = inp.setdefault("training", {})
    tr["training_data"]["systems"] = [str(p) for p in system.train]
    if "validation_data" in tr:
        tr["validation_data"]["systems"] = [str(p) for p in system.validation]
    tr["numb_steps"] = int(steps)
    tr["disp_freq"] = max(1, min(int(tr.get("disp_freq", 100)), int(steps)))
    tr["save_freq"] = max(1, int(steps))  # one checkpoint, at the end: no I/O in the timed window
    tr["disp_file"] = "lcurve.out"
    if seed is not None:
        tr["seed"] = int(seed)
    return inp


def launch_command(tree: Path, modules: tuple[Path, ...], dp_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "harness.child.launch", "--tree", str(tree)]
    for m in modules:
        cmd += ["--module", str(m)]
    return cmd + ["--", *dp_args]


def subprocess_env(device: str, extra: dict[str, str], work_dir: Path) -> dict[str, str]:
    env = paths.harness_importable(os.environ)
    env[envvars.DPH_RUN_DIR] = str(work_dir)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2))))
    if device == "cpu":
        env["DEVICE"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


BACKEND_MODULE = {"pt": "torch", "jax": "jax", "tf": "tensorflow", "pt-expt": "torch", "tf2": "tensorflow"}


@functools.lru_cache(maxsize=None)
def backend_missing(backend: str) -> str | None:
    """Why the backend cannot run here (None if it can): checked in a child, as training would be;
    once per process (a child's import of torch costs seconds, and the answer does not change)."""
    mod = BACKEND_MODULE[backend]
    r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    hint = {"tensorflow": "pip install tensorflow-cpu==2.21.*",
            "jax": "pip install -r harness/pins/jax.txt"}.get(mod, f"install {mod}")
    return f"backend {backend} unavailable: {mod} is not installed on this machine ({hint})"


COMPILE_COMPAT = "deepmd/pt/utils/compile_compat.py"


def upstream_refusal(backend: str, upstream_options: dict[str, Any], tree: Path) -> str | None:
    """Why upstream itself would refuse this run's settings on this machine (None: it would not):
    pt_expt's `enable_compile` runs only on the torch releases upstream lists in
    SUPPORTED_COMPILE_TORCH (check_compile_torch_version; 3.2.0: 2.11-2.13). Read from the tree,
    compared with the installed torch, without importing either: a run upstream refuses is
    recorded unavailable with upstream's reason, not trained into a failure."""
    if backend != "pt-expt" or not upstream_options.get("training/enable_compile"):
        return None
    import ast
    from importlib import metadata

    try:
        text = (Path(tree) / COMPILE_COMPAT).read_text()
        m = re.search(r"^SUPPORTED_COMPILE_TORCH\s*=\s*(\(.*?\))\s*$", text, re.M)
        supported = [tuple(v) for v in ast.literal_eval(m.group(1))] if m else None
        torch_v = metadata.version("torch")
    except (OSError, ValueError, SyntaxError, metadata.PackageNotFoundError):
        return None  # cannot tell: upstream's own check will say at start-up
    if not supported:
        return None
    rel = tuple(int(x) for x in re.findall(r"\d+", torch_v.split("+")[0])[:2])
    if rel in supported:
        return None
    return (f"upstream refuses training.enable_compile on torch {torch_v}: deepmd 3.2.0 supports "
            f"torch.compile only on torch {', '.join(f'{a}.{b}' for a, b in supported)} "
            f"({COMPILE_COMPAT} SUPPORTED_COMPILE_TORCH)")


# Set while a side-by-side run (calibrate, equivalence: trainings in worker threads, which no
# signal reaches) is being stopped: every training this process waits on stops as on Ctrl-C.
_STOP = threading.Event()


def stop_trainings() -> None:
    """Stop every training this process is waiting on, in any thread, as Ctrl-C stops one (SIGINT
    to its process group, SIGKILL after 30 s), until resume_trainings()."""
    _STOP.set()


def resume_trainings() -> None:
    _STOP.clear()


def run_training(spec: RunSpec, progress=None) -> TrainResult:
    """Train; never raises for a failed run (status says it), only for bad input."""
    wd = spec.work_dir
    wd.mkdir(parents=True, exist_ok=True)
    inp = make_input(spec.system, spec.variant.overrides, spec.steps, spec.seed, spec.variant.upstream_options)
    input_path = wd / "input.json"
    input_path.write_text(json.dumps(inp, indent=2))
    log_path = wd / "train.log"
    tf_v2 = spec.variant.backend == "tf-v2"
    if tf_v2:  # the TF v2 family: its own interpreter, v2's `dp train` (no backend flag, no stat skip)
        missing = spec.variant.unavailable
        cmd, why = distributed.tf_v2_command(Path(spec.variant.tree), spec.gpus,
                                             [*spec.launch_prefix, *tf_v2_launch_command(Path(spec.variant.tree))])
    else:
        missing = backend_missing(spec.variant.backend)
        # sel is explicit and checked by `dpharness systems`; upstream's own scan costs ~30 s per run
        dp_args = [BACKEND_FLAG[spec.variant.backend], "train", "input.json", "--skip-neighbor-stat"]
        cmd, why = distributed.training_command(spec.variant.backend, spec.gpus,
                                                [*spec.launch_prefix,
                                                 *launch_command(spec.variant.tree, spec.variant.modules, dp_args)])
    missing = missing or why or upstream_refusal(spec.variant.backend, spec.variant.upstream_options,
                                                 spec.variant.tree)
    if missing:
        log_path.write_text(missing + "\n")
        return TrainResult(status="unavailable", error=missing, step_s=[], clock="host", startup_s=None,
                           wall_s=0.0, gpu_peak_bytes=None, work_dir=wd, checkpoint=None, lcurve=None,
                           input_path=input_path, log_path=log_path, command=tuple(cmd or ()))
    env = subprocess_env(spec.device, {**distributed.distributed_env(spec.gpus),
                                       **spec.variant.env, envvars.DPH_VARIANT: spec.variant.name}, wd)
    if tf_v2 and "TF_XLA_FLAGS" in spec.variant.env:
        # XLA dumps every module it compiles: none means auto-jit never engaged (checked below)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={wd / 'xla_dump'}").strip()
    if spec.profile:
        env[envvars.DPH_PROFILE] = "steady"
    env.update(spec.launch_env)
    t0 = time.perf_counter()
    deadline = None if spec.timeout_s is None else time.monotonic() + spec.timeout_s
    status, error, timed_out = "ok", None, False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                if _STOP.is_set():
                    raise KeyboardInterrupt  # stop_trainings(): the same stop as Ctrl-C, below
                if progress is not None:
                    progress(_read_progress(wd), spec.steps)
                if deadline is not None and time.monotonic() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and everything it started
                    proc.wait()
                    timed_out = True
                    status, error = "failed", f"timed out after {spec.timeout_s:.0f} s"
                    break
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status, error = "interrupted", "interrupted (SIGINT/SIGTERM)"
    wall = time.perf_counter() - t0
    if status == "ok" and proc.returncode != 0:
        status, error = "failed", _diagnose(log_path, proc.returncode)
        if error.startswith("GPU out of memory"):  # say what was too big, so the user can shrink it
            bs = inp["training"]["training_data"].get("batch_size")
            error = (f"GPU out of memory training {spec.system.name} ({spec.system.atoms_per_frame} atoms/frame, "
                     f"batch_size {bs}, variant {spec.variant.name}): " + error[len("GPU out of memory: "):])
    steps_file = wd / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else {}
    step_s = steps.get("step_s") or []
    if status == "ok" and len(step_s) < spec.steps - 1:
        status, error = "failed", f"only {len(step_s)} of {spec.steps} steps were timed"
    engine = steps.get("engine")
    if status == "ok" and isinstance(engine, dict) and engine.get("fallback"):
        # the manifest allowed it: timed and kept, but never counted as the variant's speed
        status, error = "fallback", f"engine fell back to {engine['fallback']}: {engine.get('fallback_reason')}"
    world_size = None
    if tf_v2 and status == "ok":
        world_size, error = tf_v2_check(log_path, wd, spec.gpus, "TF_XLA_FLAGS" in spec.variant.env,
                                        spec.variant.env.get("DP_INTERFACE_PREC", "high"))
        status = "failed" if error else status
    ckpt = _latest_checkpoint(wd)
    lcurve = wd / "lcurve.out"
    return TrainResult(
        status=status, error=error, step_s=step_s, clock=steps.get("clock", "host"),
        startup_s=steps.get("startup_s"), wall_s=wall, gpu_peak_bytes=steps.get("gpu_peak_bytes"),
        work_dir=wd, checkpoint=ckpt, lcurve=lcurve if lcurve.is_file() else None,
        input_path=input_path, log_path=log_path, upstream_avg_step_s=upstream_average(log_path),
        command=tuple(cmd), returncode=None if timed_out else proc.returncode, timed_out=timed_out,
        world_size=world_size, engine=engine, replaced=steps.get("replaced"),
    )


def tf_v2_launch_command(venv: Path) -> list[str]:
    """One rank of a TF v2 run: the family's interpreter, the harness's timing launcher, v2's dp."""
    return [str(venv / "bin" / "python"), "-m", "harness.child.tf_v2_launch", "--", "train", "input.json"]


_WORLD = re.compile(r"world size:\s+(\d+)")
SERIAL_FALLBACK = "Switch to serial execution due to lack of horovod module"


_FLOAT_PREC = re.compile(r"build float prec:\s+(\w+)")
INTERFACE_PREC = {"high": "double", "": "double", "low": "float"}  # DP_INTERFACE_PREC -> v2's log word


def tf_v2_check(log_path: Path, wd: Path, gpus: int, xla: bool, interface_prec: str = "high"
                ) -> tuple[int, str | None]:
    """(world size, None) or (.., why the run does not count): v2 logs its world size only when
    it trains distributed and otherwise falls back to serial silently when horovod will not
    import, so an N-process run is trusted only when its log says `world size: N`; under XLA's
    flags at least one XLA module must have been compiled; the interface precision v2 logs
    (`build float prec`) must be the one DP_INTERFACE_PREC asked for."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    precs = set(_FLOAT_PREC.findall(text))
    want = INTERFACE_PREC.get(interface_prec.lower())
    if precs != {want}:
        return 1, (f"DP_INTERFACE_PREC={interface_prec}: v2's log says build float prec "
                   f"{', '.join(sorted(precs)) or 'nothing'}, not {want}")
    sizes = {int(m) for m in _WORLD.findall(text)}
    size = max(sizes) if sizes else 1
    if gpus > 1 and (SERIAL_FALLBACK in text or size != gpus):
        why = ("v2 fell back to serial training (horovod did not import)" if SERIAL_FALLBACK in text
               else f"the training log says world size {size}, not {gpus}")
        return size, f"{gpus} processes asked for: {why}"
    if xla and not list((wd / "xla_dump").glob("*.before_optimizations.txt")):
        return size, f"TF_XLA_FLAGS set but XLA compiled no cluster (nothing in {wd / 'xla_dump'})"
    return size, None


_AVERAGE = re.compile(r"average training time:\s*([0-9.eE+-]+)\s*s/batch")


def upstream_average(log_path: Path) -> float | None:
    """Upstream's own "average training time: X s/batch" (the last one its log printed): its host
    clock over whole display intervals, display and validation included, the first interval
    excluded only in runs longer than 2 x disp_freq. A cross-check of the step clock, not a
    replacement (4 decimals: 0.0000 for sub-0.1 ms steps)."""
    try:
        found = _AVERAGE.findall(log_path.read_text(errors="replace"))
    except OSError:
        return None
    try:
        return float(found[-1]) if found else None
    except ValueError:
        return None


def _read_progress(wd: Path) -> int:
    try:
        return int((wd / "progress").read_text() or 0)
    except (OSError, ValueError):
        return 0


def _latest_checkpoint(wd: Path) -> Path | None:
    for name in ("model.ckpt.pt", "model.ckpt.jax", "model.ckpt.index", "model.ckpt.tf2"):
        p = wd / name
        if p.exists():
            return p.resolve() if p.is_symlink() else p
    cands = sorted(wd.glob("model.ckpt-*.pt"), key=lambda p: p.stat().st_mtime)
    return cands[-1] if cands else None


def _diagnose(log_path: Path, rc: int) -> str:
    """One line naming the cause of a failed run, from the end of its log."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if rc < 0:
        return f"killed by signal {-rc}"
    from harness.child import resume

    stopped = resume.read_stopped(log_path.parent) if rc == resume.STOP_EXIT else None
    if stopped is not None:  # the child handled SIGTERM: it stopped at a step boundary (child/resume.py)
        at = f"at step {stopped['steps_done']}" if stopped.get("steps_done") is not None else "before its first step"
        ck = f", checkpoint {stopped['checkpoint']}" if stopped.get("checkpoint") else ""
        return f"killed by signal {int(signal.SIGTERM)} (SIGTERM): stopped {at}{ck}"
    for ln in reversed(lines):
        if "OutOfMemoryError" in ln or "out of memory" in ln.lower():
            return "GPU out of memory: " + ln[-200:]
    exc = _last_exception(lines)
    if exc is not None:
        return exc
    for ln in reversed(lines):
        if ln.split(":")[0].endswith(("Error", "Exception")) or "Error:" in ln:
            return ln[-300:]
    return f"exit code {rc}" + (f": {lines[-1][-200:]}" if lines else "")


# "pkg.mod.SomeError: message" / "GuardOnDataDependentSymNode: ..." right after a traceback's frames
_EXC_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Node|Interrupt|Exit)?: \S")
_FRAME = re.compile(r'^File "(.*?/(deepmd/[^"]+))", line (\d+)')


def _last_exception(lines: list[str]) -> str | None:
    """The exception line of the log's last traceback, with the innermost upstream frame
    (deepmd/...:line) that raised it, e.g. "GuardOnDataDependentSymNode: Could not extract ...
    (at deepmd/dpmodel/descriptor/se_e2_a.py:596)"; None if the log has no traceback."""
    tb = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")), default=None)
    if tb is None:
        return None
    where, exc = None, None
    for ln in lines[tb + 1:]:
        m = _FRAME.match(ln)
        if m:
            if "/_vendors/" not in ln or where is None:  # a vendored array shim is not the cause
                where = f"{m.group(2)}:{m.group(3)}"
            continue
        if _EXC_LINE.match(ln):
            exc = ln
            if not ln.endswith("in user code:"):  # TF's tf.function error: the frames follow
                break
    if exc is None:
        return None
    return exc[:260] + (f" (at {where})" if where else "")


# public names for harness/run/user_train.py (dpharness train)
read_progress = _read_progress
diagnose = _diagnose
