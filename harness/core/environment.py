"""The environment a run happened in: card, driver, library versions, harness git sha."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from typing import Any

from harness.core import envvars
from harness.core.paths import ROOT


def _git_sha() -> str | None:
    # A copy shipped to a GPU node is told its commit by the sender: DPH_GIT_SHA wins over the
    # copy's own .git, which can be stale (seen on the lent machines: their .git named the
    # session's first commit, "-dirty", while the tree was several commits newer).
    told = envvars.get(envvars.DPH_GIT_SHA)
    if told:
        return told
    if not shutil.which("git") or not (ROOT / ".git").exists():
        return None
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def capture() -> dict[str, Any]:
    from harness import __version__

    env: dict[str, Any] = {
        "harness_version": __version__,
        "harness_git": _git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": _version("torch"),
        "jax": _version("jax"),
        "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
        "gpu_name": None,
        "gpu_count": 0,
        "cuda": None,
        "driver": None,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu_count"] = torch.cuda.device_count()
            env["gpu_name"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except Exception:
        pass
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            env["driver"] = r.stdout.strip().splitlines()[0]
    return env
