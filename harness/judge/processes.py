"""The gate's child processes: upstream's `dp test` (freezing or converting a checkpoint first
where the backend needs it), and the registry that stops them all when a sweep is stopped."""
from __future__ import annotations

import re
import shlex
import shutil
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from harness.core import envvars
from harness.prepare import build
from harness.run import train
from harness.core.records import RunRecord



DEFAULT_TEST_FRAMES = {"cpu": 20, "cuda": 0}  # dp test -n per validation system (0 = all)


DP_TEST_TIMEOUT_S = 3600


METRICS = ("rmse_e_per_atom", "rmse_f", "rmse_v")


_DP_TEST_KEYS = {"Energy RMSE/Natoms": "rmse_e_per_atom", "Force  RMSE": "rmse_f",
                 "Virial RMSE/Natoms": "rmse_v"}


def baseline_tree(previous: list[RunRecord] | None = None) -> Path:
    """The unpatched baseline build that judges every run."""
    for r in previous or []:
        if r.run.variant.name == "baseline" and tuple(r.run.variant.chain) == ("baseline",):
            return r.run.variant.tree
    return build.build_variant("baseline").tree


def parse_dp_test(text: str) -> dict[str, float | None]:
    """RMSEs of the weighted-average block (last block) of `dp test`'s log."""
    tail = text.rsplit("weighted average of errors", 1)
    if len(tail) != 2 and text.count("# testing system") == 1:
        tail = text.rsplit("# testing system", 1)  # one system: v2's dp test prints no average block
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


def log_tail(path: Path, n: int = 3) -> str:
    """The last n non-empty lines of a child's log, joined on one line (for an error message)."""
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
                           f"{log_tail(out_dir / 'dp_freeze.log')}")
    return frozen


# Gate subprocesses run in their own sessions (a terminal's Ctrl-C must not kill a judge half-way);
# a stopped sweep kills them through this registry instead (stop_gates).
_LIVE: set[subprocess.Popen] = set()


_LIVE_LOCK = threading.Lock()


_STOPPED = threading.Event()


def track(proc: subprocess.Popen) -> subprocess.Popen:
    """Register a gate subprocess with the stop registry (stop_gates); wait_tracked unregisters it."""
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
                           f"(exit {r.returncode}): {log_tail(out_dir / 'dp_convert.log')}")
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
    env = train.subprocess_env(device, {envvars.DPH_VARIANT: "baseline", **jax_env}, out_dir)
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
        proc = track(subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return proc, log


def start_v2_dp_test(checkpoint: Path, validation: tuple[Path, ...], out_dir: Path, device: str,
                     frames: int, venv: Path) -> tuple[subprocess.Popen, Path]:
    """The TF v2 family's own judge: v2's `dp freeze` of the run's checkpoint folder to a .pb,
    then v2's `dp test` of it on the validation systems (linked under one folder: v2's test takes
    one directory and finds the systems in it), in one child whose log finish_dp_test parses."""
    out_dir.mkdir(parents=True, exist_ok=True)
    val = out_dir / "validation"
    if val.exists():
        shutil.rmtree(val)
    val.mkdir()
    for i, p in enumerate(validation):
        (val / f"sys{i:03d}").symlink_to(Path(p).resolve(), target_is_directory=True)
    log = out_dir / "dp_test.log"
    dp = str(Path(venv) / "bin" / "dp")
    frozen = out_dir / "frozen_model.pb"
    script = (f"{shlex.quote(dp)} freeze -c {shlex.quote(str(Path(checkpoint).parent))} -o {shlex.quote(str(frozen))} "
              f"&& {shlex.quote(dp)} test -m {shlex.quote(str(frozen))} -s {shlex.quote(str(val))} -n {int(frames)}")
    env = train.subprocess_env(device, {envvars.DPH_VARIANT: "baseline"}, out_dir)
    with open(log, "w") as f:
        proc = track(subprocess.Popen(["bash", "-c", script], cwd=out_dir, env=env, stdout=f,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return proc, log


def wait_tracked(proc: subprocess.Popen, timeout_s: float, what: str) -> int:
    """Wait for a gate process; kill it past its limit; it leaves the stop registry either way."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} timed out after {timeout_s} s") from None
    finally:
        _untrack(proc)


def format_dp_test(d: dict | None) -> str:
    """A dp-test result (parse_dp_test's) as one short phrase: "dp test E/atom ..., F ..."."""
    if not d:
        return "-"
    parts = [f"E/atom {d['rmse_e_per_atom']:.4g}" if d.get("rmse_e_per_atom") is not None else None,
             f"F {d['rmse_f']:.4g}" if d.get("rmse_f") is not None else None,
             f"V/atom {d['rmse_v']:.4g}" if d.get("rmse_v") is not None else None]
    return "dp test " + ", ".join(p for p in parts if p)


class UpstreamOutOfMemory(RuntimeError):
    """Upstream's own dp test ran out of memory: the frames are too large for upstream's code on
    this device (its neighbour list is all-pairs), which says nothing about the run judged."""


# torch's OutOfMemoryError / "CUDA out of memory", upstream's AutoBatchSize giving up at batch 1
_OOM = re.compile(r"OutOfMemoryError|out[ -]of[ -]memory", re.IGNORECASE)


def oom_line(text: str) -> str | None:
    """The last line of a log that reports running out of memory, or None."""
    hits = [ln.strip() for ln in text.splitlines() if _OOM.search(ln)]
    return hits[-1][:300] if hits else None


def finish_dp_test(proc: subprocess.Popen, log: Path, frames: int) -> dict[str, Any]:
    rc = wait_tracked(proc, DP_TEST_TIMEOUT_S, "dp test")
    if rc != 0:
        try:
            oom = oom_line(log.read_text(errors="replace"))
        except OSError:
            oom = None
        if oom:
            raise UpstreamOutOfMemory(f"upstream's dp test ran out of memory (exit {rc}): {oom}")
        raise RuntimeError(f"dp test exit {rc}: {log_tail(log)}")
    res: dict[str, Any] = dict(parse_dp_test(log.read_text(errors="replace")))
    res["numb_test"] = int(frames)
    return res


def run_dp_test(checkpoint: Path, validation: tuple[Path, ...], out_dir: Path, device: str,
                frames: int, tree: Path | None = None) -> dict[str, Any]:
    """`dp --pt test` of `checkpoint` with the baseline build; returns the RMSEs."""
    proc, log = start_dp_test(checkpoint, validation, out_dir, device, frames, tree or baseline_tree())
    return finish_dp_test(proc, log, frames)
