"""The second upstream family's environment: DeePMD-kit v2 (the competition's TensorFlow era) in a
Python 3.8 virtual environment of its own, from harness/pins/tf-era.toml (the deepmd-kit wheel,
sha256-verified) and harness/pins/tf-era-lock.txt (TensorFlow 2.6.0 and the rest at exact
versions). Built once per content hash of those two files under build/tf-era-<hash>/, verified by
importing deepmd's C++ ops library (the step that fails on a TensorFlow ABI mismatch), and cached:
a second build with the same pins is a stamp check. The build log keeps every command and its
outcome, like the 3.2.0 builds' logs.

Python 3.8 comes from $DPH_TF_ERA_PYTHON, else `pyenv prefix <version>`, else `python3.8` on
PATH; without one the family is unavailable, said in one line."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.core import envvars
from harness.core.errors import UserError
from harness.core.paths import BUILD, PINS
from harness.core.records import UpstreamPin
from harness.prepare import upstream

PIN_FILE = PINS / "tf-era.toml"
LOCK_FILE = PINS / "tf-era-lock.txt"
# what proves the environment works: TensorFlow imports and deepmd's ops library loads
VERIFY = ("import deepmd, tensorflow as tf; from deepmd.env import op_module; "
          "print('deepmd', deepmd.__version__, 'tensorflow', tf.__version__, 'ops', op_module.__name__)")


@dataclass(frozen=True)
class TfEraPin:
    python: str  # "3.8"
    package: str
    version: str
    file: str
    sha256: str


@dataclass(frozen=True)
class TfEraEnv:
    pin: TfEraPin
    root: Path  # build/tf-era-<hash>
    python: Path  # the venv's interpreter
    dp: Path  # its `dp` entry point (v2's CLI: `dp train input.json`, no --tf/--pt)
    versions: str  # what VERIFY printed
    cached: bool


def load_pin(path: Path = PIN_FILE) -> TfEraPin:
    d = upstream.load_pin(path)
    w = d["wheel"]
    return TfEraPin(str(d["python"]["version"]), w["package"], w["version"], w["file"], w["sha256"])


def content_hash(pin_file: Path = PIN_FILE, lock_file: Path = LOCK_FILE) -> str:
    h = hashlib.sha256()
    for p in (pin_file, lock_file):
        h.update(p.read_bytes())
    return h.hexdigest()


def find_python(version: str) -> Path | None:
    """A CPython `version` interpreter: $DPH_TF_ERA_PYTHON, pyenv's newest `version`.x, python<version>."""
    given = envvars.get(envvars.DPH_TF_ERA_PYTHON)
    if given:
        return Path(given)
    if shutil.which("pyenv"):
        r = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True)
        mine = sorted((v for v in r.stdout.split() if v == version or v.startswith(version + ".")),
                      key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")])
        if mine:
            prefix = subprocess.run(["pyenv", "prefix", mine[-1]], capture_output=True, text=True).stdout.strip()
            if prefix and (Path(prefix) / "bin" / "python").is_file():
                return Path(prefix) / "bin" / "python"
    found = shutil.which(f"python{version}")
    return Path(found) if found else None


def _run(cmd: list[str], log: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log.append(f"$ {' '.join(map(str, cmd))}\n-> exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return r


def build_env(pin: TfEraPin | None = None, build_dir: Path = BUILD) -> TfEraEnv:
    """The family's environment, built or found in the cache; UserError when it cannot be built here."""
    pin = pin or load_pin()
    root = Path(build_dir) / f"tf-era-{content_hash()[:16]}"
    venv = root / "venv"
    py, dp = venv / "bin" / "python", venv / "bin" / "dp"
    stamp = root / "verified.txt"
    if stamp.is_file() and py.is_file():
        return TfEraEnv(pin, root, py, dp, stamp.read_text().strip(), cached=True)
    base = find_python(pin.python)
    if base is None:
        raise UserError(f"the TF v2 family needs CPython {pin.python} (set DPH_TF_ERA_PYTHON, or `pyenv install "
                        f"{pin.python}`): none found")
    log: list[str] = []
    try:
        if root.exists():
            shutil.rmtree(root)  # a half-built environment from an interrupted build
        root.mkdir(parents=True)
        downloads = root / "downloads"
        for cmd, what in (([str(base), "-m", "venv", str(venv)], "create the venv"),
                          ([str(py), "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            f"{pin.package}=={pin.version}", "-d", str(downloads)], f"download {pin.file}")):
            if _run(cmd, log).returncode != 0:
                raise UserError(f"TF v2 environment: could not {what} (log: {root / 'build.log'})")
        wheel = downloads / pin.file
        if not wheel.is_file():
            raise UserError(f"TF v2 environment: pip downloaded no {pin.file} (log: {root / 'build.log'})")
        upstream.verified_wheel(wheel, UpstreamPin(pin.package, pin.version, pin.file, pin.sha256), log)
        if _run([str(py), "-m", "pip", "install", "-q", "-r", str(LOCK_FILE), str(wheel)], log).returncode != 0:
            raise UserError(f"TF v2 environment: pip install failed (log: {root / 'build.log'})")
        r = _run([str(py), "-c", VERIFY], log, timeout=300)
        if r.returncode != 0:
            raise UserError(f"TF v2 environment: deepmd's ops do not load (exit {r.returncode}; "
                            f"log: {root / 'build.log'})")
        versions = r.stdout.strip().splitlines()[-1]
        stamp.write_text(versions + "\n")
        return TfEraEnv(pin, root, py, dp, versions, cached=False)
    finally:
        if root.is_dir():
            (root / "build.log").write_text("\n\n".join(log) + "\n")
