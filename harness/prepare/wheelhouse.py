"""Offline wheelhouse: the wheels a GPU node without internet needs beyond its CUDA+PyTorch
image, for Python 3.12 manylinux x86_64, pinned by hash in harness/pins/wheelhouse.txt."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from harness.core import paths

PINS = paths.PINS / "wheelhouse.txt"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")


def download(dest: Path, python_version: str = "3.12", log=print) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--python-version", python_version, "--implementation", "cp",
           "--abi", f"cp{python_version.replace('.', '')}", "-d", str(dest), "-r", str(PINS)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    log(f"downloading {sum(1 for l in PINS.read_text().splitlines() if l and not l.startswith('#'))} pinned wheels into {dest}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = [l for l in (r.stderr or r.stdout).splitlines() if l.strip()][-1:] or ["?"]
        log(f"dpharness: error: wheelhouse download failed: {tail[0]}")
        return 2
    size = sum(p.stat().st_size for p in dest.glob("*.whl"))
    log(f"wheelhouse ready: {len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}. "
        f"Carry this folder to the GPU node next to the checkout; `make bench` installs from it with --no-index.")
    return 0
