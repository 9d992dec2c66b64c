"""Stage 1: the upstream pin. Finds (or downloads) the pinned deepmd-kit wheel and verifies it,
or builds a wheel from a local source checkout at a pinned ref."""
from __future__ import annotations

import shutil
import subprocess
import sys
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
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", "manylinux_2_28_x86_64", "-d", str(DOWNLOADS),
           f"{pin.package}=={pin.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    p = DOWNLOADS / pin.wheel
    if r.returncode != 0 or not p.is_file():
        raise UserError(
            f"cannot obtain {pin.wheel}: not in wheelhouse/ and the download failed "
            f"(offline node? run `make wheelhouse` on a machine with internet and copy wheelhouse/ here)"
        )
    return verified_wheel(p, pin, log)


def verified_wheel(path: Path, pin: UpstreamPin, log: list[str]) -> Path:
    """`path` when its sha256 is the pin's (logged), else UserError: every pinned wheel passes here."""
    got = sha256_file(path)
    if got != pin.sha256:
        raise UserError(f"{path} has sha256 {got}, the pin says {pin.sha256}: refusing to build from it")
    log.append(f"upstream wheel {path.name} sha256 {got[:12]}… verified against the pin")
    return path


def source_pin(path: Path, ref_name: str = "asc-2022") -> UpstreamPin:
    """Pin for a local upstream source checkout; checks the commit and the build prerequisites."""
    spec = load_pin().get("source", {}).get(ref_name)
    if spec is None:
        raise UserError(f"no pinned source ref {ref_name!r} in {PIN_FILE.name}")
    path = path.resolve()
    if not (path / ".git").exists() and not (path / "setup.py").exists() and not (path / "pyproject.toml").exists():
        raise UserError(f"{path} is not a deepmd-kit source checkout")
    if shutil.which("git") and (path / ".git").exists():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if head != spec["commit"]:
            raise UserError(f"{path} is at {head[:12] or '?'}, the pin {ref_name} wants {spec['commit'][:12]}: "
                            f"run `git -C {path} checkout {spec['commit']}`")
    for mod in spec.get("build_requires", []):
        if subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True).returncode != 0:
            raise UserError(f"building {ref_name} from source needs {mod}, which is not installed here "
                            f"(pip install {mod}{'-cpu' if mod == 'tensorflow' else ''})")
    return UpstreamPin("deepmd-kit", ref_name, "", spec["commit"], source_path=path, source_ref=ref_name)


def build_source_wheel(pin: UpstreamPin, log: list[str]) -> Path:
    """pip-builds a wheel from the pinned source checkout (cached by commit)."""
    assert pin.source_path is not None
    out = DOWNLOADS / f"src-{pin.sha256[:12]}"
    wheels = sorted(out.glob("deepmd_kit-*.whl")) if out.exists() else []
    if wheels:
        log.append(f"reusing source-built wheel {wheels[0].name}")
        return wheels[0]
    out.mkdir(parents=True, exist_ok=True)
    log.append(f"building wheel from {pin.source_path} at {pin.sha256[:12]} (pip wheel --no-deps)")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(pin.source_path)],
                       capture_output=True, text=True)
    wheels = sorted(out.glob("deepmd_kit-*.whl"))
    if r.returncode != 0 or not wheels:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"building deepmd-kit from {pin.source_path} failed: {tail[0]}")
    return wheels[0]
