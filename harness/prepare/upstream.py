"""Stage 1: the upstream pin. Finds (or downloads) the pinned deepmd-kit wheel and verifies it.
The competition's asc-2022 branch is v2 code: the TF v2 family builds it (harness/prepare/tf_era.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from harness.core.errors import UserError
from harness.core.records import UpstreamPin

from harness.core.paths import PINS, ROOT
from harness.core.fsutil import sha256_file
PIN_FILE = PINS / "upstream.toml"
WHEELHOUSE = ROOT / "wheelhouse"
DOWNLOADS = ROOT / "build" / "downloads"


def load_pin(pin_file: Path = PIN_FILE) -> dict:
    with open(pin_file, "rb") as f:
        return tomllib.load(f)




def default_pin(version: str | None = None) -> UpstreamPin:
    w = load_pin()["wheel"]
    if version is not None and version != w["version"]:
        raise UserError(
            f"unknown upstream version {version!r}: this harness pins deepmd-kit {w['version']} "
            f"(edit {PIN_FILE.relative_to(ROOT)} to pin another, with its sha256)"
        )
    return UpstreamPin(w["package"], w["version"], w["file"], w["sha256"])


def fetch_wheel(pin: UpstreamPin, log: list[str]) -> Path:
    """The pinned wheel on disk, verified. Looks in wheelhouse/ and build/downloads/, then PyPI."""
    for d in (WHEELHOUSE, DOWNLOADS):
        p = d / pin.wheel
        if p.is_file():
            return verified_wheel(p, pin, log)
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    log.append(f"downloading {pin.package}=={pin.version} into {DOWNLOADS}")
    p = DOWNLOADS / pin.wheel
    why = ""
    for _attempt in range(2):  # one retry: a download is the one step here a network blip fails
        # into a folder of its own, then one rename: processes downloading at once (pytest-xdist's
        # workers collecting) never see each other's half-written file
        with tempfile.TemporaryDirectory(dir=DOWNLOADS, prefix=".tmp-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--platform", "manylinux_2_28_x86_64", "-d", tmp, f"{pin.package}=={pin.version}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / pin.wheel
            if r.returncode == 0 and got.is_file():
                os.replace(got, p)
                break
            why = (r.stderr.strip().splitlines() or [f"pip exit {r.returncode}"])[-1]
    if not p.is_file():
        raise UserError(
            f"cannot obtain {pin.wheel}: not in wheelhouse/ and the download failed ({why}; offline node? "
            f"run `make wheelhouse` on a machine with internet and copy wheelhouse/ here)"
        )
    return verified_wheel(p, pin, log)


def verified_wheel(path: Path, pin: UpstreamPin, log: list[str]) -> Path:
    """`path` when its sha256 is the pin's (logged), else UserError: every pinned wheel passes here."""
    got = sha256_file(path)
    if got != pin.sha256:
        raise UserError(f"{path} has sha256 {got}, the pin says {pin.sha256}: refusing to build from it")
    log.append(f"upstream wheel {path.name} sha256 {got[:12]}… verified against the pin")
    return path
