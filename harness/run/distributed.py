"""Beyond one GPU: how a training run is launched on N GPUs of one node, and what it measured.

* PyTorch backend: upstream's PT trainer is DDP-aware (it calls ``init_process_group`` when
  ``LOCAL_RANK`` is set and wraps the model in ``DistributedDataParallel``), so N GPUs are N
  processes started by torchrun (``python -m torch.distributed.run --standalone
  --nproc_per_node N -m harness.child.launch ...``). Only rank 0 writes steps.json / progress
  (harness.child.launch checks ``RANK``).
* TensorFlow backend: upstream's TF trainer is data-parallel through Horovod:
  ``horovodrun -np N dp --tf train input.json`` (or ``mpirun -np N ...``). We generate that command
  where horovod and a launcher are installed, else say in one line why not.
* JAX backend: upstream's JAX trainer has no multi-process data parallelism.

Global batch: every rank takes ``batch_size`` frames per step (upstream DDP semantics; a
DistributedSampler per system), so one step consumes ``world_size x batch_size`` frames, and
frames (samples) per second is the throughput that is comparable across N. See
docs/distributed.md.

Nothing here imports torch at module import: GPU counting happens in a child-free call that
only imports torch when asked.
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
from typing import Any, Callable, Iterable

from harness.core.errors import UserError, whole_number

# NVLink multicast (NVLS / symmetric-memory multicast) can take shared GPUs out of service on the
# lent machines: always off, for every multi-GPU launch (and harmless for a single process).
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "HOROVOD_RANK")


def parse_gpus(text: str | int | Iterable[int]) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (order kept, duplicates dropped); each at least 1."""
    if isinstance(text, int):
        items: list[Any] = [text]
    elif isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(text)
    if not items:
        raise UserError("--gpus: give at least one GPU count (e.g. --gpus 1,2)")
    out: list[int] = []
    for t in items:
        n = whole_number(t, 1, f"--gpus must be a comma list of integers, not {text!r}",
                         "--gpus: a GPU count must be at least 1, not {n}")
        if n not in out:
            out.append(n)
    return out


def visible_gpus() -> int:
    """GPUs torch sees in this process (honours CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def check_gpus(gpus: Iterable[int], device: str, visible: int | None = None) -> None:
    """Reject a request for more GPUs than are visible (before anything is written)."""
    want = max(gpus)
    if want <= 1:
        return
    if device != "cuda":
        raise UserError(f"--gpus {want}: multi-GPU runs need --device cuda (device here: {device}, "
                        f"{visible_gpus() if visible is None else visible} GPU(s) visible)")
    n = visible_gpus() if visible is None else visible
    if want > n:
        raise UserError(f"--gpus {want}: only {n} GPU(s) visible on this machine"
                        + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})"
                           if os.environ.get("CUDA_VISIBLE_DEVICES") is not None else ""))


def launch_prefix(gpus: int, python: str | None = None) -> list[str]:
    """The command that replaces `python` in front of `-m harness.child.launch ...` for N PT processes:
    torchrun, standalone (one node; it picks a free rendezvous port, so runs can coexist)."""
    py = python or sys.executable
    if gpus <= 1:
        return [py]
    return [py, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(int(gpus))]


def cores_share_env(share: int, cpu_count: int | None = None, environ=None) -> dict[str, str]:
    """OMP_NUM_THREADS for one of `share` processes that run at once (ranks, side-by-side
    trainings): the cores split between them -- unless it is set already (the user's choice; the
    test suite's one thread per worker, which the fork server needs: above one, upstream's import
    starts OpenMP threads and a fork of it is not safe)."""
    if "OMP_NUM_THREADS" in (os.environ if environ is None else environ):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (cpu_count or os.cpu_count() or 1) // max(1, int(share))))}


def distributed_env(gpus: int, cpu_count: int | None = None) -> dict[str, str]:
    """Environment for a (possibly) multi-process training run. Multicast is ALWAYS disabled."""
    env = dict(NO_MULTICAST_ENV)
    if gpus > 1:  # torchrun would set 1 and warn; split the cores between the ranks instead
        env.update(cores_share_env(gpus, cpu_count))
    return env


def is_rank0(environ: dict[str, str] | None = None) -> bool:
    """True in the process that owns the run's files (torchrun/mpirun/horovod rank 0, or no launcher)."""
    e = os.environ if environ is None else environ
    for var in RANK_VARS:
        v = e.get(var)
        if v not in (None, ""):
            return str(v).strip() == "0"
    return True


# ---------------------------------------------------------------- TensorFlow (Horovod)

def _horovod_tf_importable() -> bool:
    return importlib.util.find_spec("horovod") is not None and importlib.util.find_spec("tensorflow") is not None


def tf_launch_command(gpus: int, dp_command: list[str] | None = None,
                      which: Callable[[str], str | None] = shutil.which,
                      horovod: Callable[[], bool] = _horovod_tf_importable) -> tuple[list[str] | None, str | None]:
    """(command, None) for upstream's TF backend on N GPUs through Horovod, or (None, why-not).

    ``dp_command`` is what runs per rank (default: upstream's ``dp --tf train input.json``; the
    harness passes its own launcher). horovodrun is preferred, mpirun is the fallback."""
    dp = dp_command or ["dp", "--tf", "train", "input.json", "--mpi-log", "master"]
    n = str(int(gpus))
    if not horovod():
        return None, (f"TF backend on {gpus} GPUs needs Horovod with TensorFlow "
                      "(pip install horovod[tensorflow] built with NCCL) and horovodrun or mpirun; "
                      "horovod/tensorflow is not installed here")
    if which("horovodrun"):
        return ["horovodrun", "-np", n, *dp], None
    if which("mpirun"):
        # Open MPI spelling; -x forwards the environment a rank needs
        return ["mpirun", "-np", n, "-bind-to", "none", "-map-by", "slot",
                "-x", "NCCL_NVLS_ENABLE", "-x", "LD_LIBRARY_PATH", "-x", "PATH", "-x", "PYTHONPATH", *dp], None
    return None, f"TF backend on {gpus} GPUs: horovod is installed but neither horovodrun nor mpirun is on PATH"


LAUNCHERS = {"torchrun": ("pt",), "horovod": ("tf-v2",)}  # who starts N processes of which backend


def check_launcher(launcher: str, backends: dict[str, str]) -> None:
    """Refuse a launcher that cannot start a variant of the sweep (before anything is written)."""
    if launcher == "auto":
        return
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be auto, {' or '.join(LAUNCHERS)}, not {launcher!r}")
    for name, backend in backends.items():
        if launcher == "horovod" and name == "baseline":
            continue  # the sweep's reference: one process, no launcher (plan_counts)
        if backend not in LAUNCHERS[launcher]:
            other = next((k for k, b in LAUNCHERS.items() if backend in b), None)
            raise UserError(f"--launcher {launcher}: variant {name} (backend {backend}) is started by "
                            + (other or "no multi-process launcher") + f"; {launcher} starts backend(s) "
                            + ", ".join(LAUNCHERS[launcher]))


def plan_counts(launcher: str, variant: str, gpus: list[int]) -> list[int]:
    """The process counts a variant of the sweep runs at: every one asked for, except that a
    horovod sweep's PyTorch baseline runs once, on one process (the cross-family reference)."""
    if launcher == "horovod" and variant == "baseline":
        return [1]
    return list(gpus)


def tf_v2_command(venv, procs: int, rank_cmd: list[str]) -> tuple[list[str] | None, str | None]:
    """The TF v2 family (DeePMD-kit 2.0.3) on N processes: its own environment's horovodrun,
    Gloo controller, all on this host (`-H localhost:N`); processes on CPU, one GPU each where
    TensorFlow sees GPUs. (command, None) or (None, why it cannot run)."""
    if procs <= 1:
        return rank_cmd, None
    run = venv / "bin" / "horovodrun"
    if not run.is_file():
        return None, (f"TF v2 on {procs} processes needs Horovod in the family's environment "
                      "(`dpharness tf-era --horovod` builds it); not built")
    return [str(run), "--gloo", "-np", str(int(procs)), "-H", f"localhost:{int(procs)}", *rank_cmd], None


def training_command(backend: str, gpus: int, launch_cmd: list[str]) -> tuple[list[str] | None, str | None]:
    """Wrap the harness launch command (``[python, -m, harness.child.launch, ...]``) for N processes.
    Returns (command, None) or (None, a one-line reason it cannot run here)."""
    if gpus <= 1:
        return launch_cmd, None
    if backend == "pt":
        return launch_prefix(gpus, launch_cmd[0]) + launch_cmd[1:], None
    if backend == "tf":
        return tf_launch_command(gpus, launch_cmd)
    if backend in ("pt-expt", "tf2"):  # upstream's trainers have their own DDP/MPI paths, not wired here
        return None, f"backend {backend} on {gpus} GPUs: the harness launches it on one process only"
    return None, f"backend {backend} on {gpus} GPUs: upstream's {backend.upper()} trainer has no multi-process data parallelism"


# ---------------------------------------------------------------- throughput

def frames_per_step(batch_size: Any, atoms_per_frame: int | None) -> float | None:
    """Frames one rank takes per step, from training_data.batch_size (upstream's rules:
    int; list per system -> mean; 'auto[:N]' -> ceil(N / atoms); 'max:N'/'filter:N' -> max(1, N // atoms))."""
    if isinstance(batch_size, bool):
        return None
    if isinstance(batch_size, (int, float)):
        return float(batch_size)
    if isinstance(batch_size, (list, tuple)) and batch_size:
        try:
            return float(sum(batch_size)) / len(batch_size)
        except TypeError:
            return None
    if isinstance(batch_size, str) and atoms_per_frame:
        rule, _, val = batch_size.partition(":")
        try:
            n = int(val) if val else 32
        except ValueError:
            return None
        if rule == "auto":
            return float(math.ceil(n / atoms_per_frame))
        if rule in ("max", "filter"):
            return float(max(1, n // atoms_per_frame))
    return None


def samples_per_s(world_size: int, frames: float | None, step_s_median: float | None) -> float | None:
    """Global throughput: world_size x per-rank frames / median step time."""
    if not frames or not step_s_median:
        return None
    return world_size * frames / step_s_median


def scaling_efficiency(samples_n: float | None, n: int, samples_1: float | None) -> float | None:
    """(samples/s at N) / (N x samples/s at 1): 1.0 is perfect linear scaling."""
    if not samples_n or not samples_1 or n < 1:
        return None
    return samples_n / (n * samples_1)
