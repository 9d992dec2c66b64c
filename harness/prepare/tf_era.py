"""The second upstream family's environment: DeePMD-kit v2 (the competition's TensorFlow era) in a
Python 3.8 virtual environment of its own, **built from source**: the asc-2022 commit from a
local checkout (`--upstream-source PATH`, commit verified), else v2.0.3's sdist from the package
registry (sha256-verified), both from harness/pins/tf-era.toml; TensorFlow 2.6.0 and the rest at
exact versions from harness/pins/tf-era-lock.txt. Upstream's CMake (through scikit-build)
compiles the C++ ops against that TensorFlow's headers (`pip wheel --no-build-isolation`), the
wheel is installed, and the environment is verified by importing deepmd's ops library (the step
that fails on a TensorFlow ABI mismatch). Built once per content hash of the pins and the source
under build/tf-era-<hash>/ and cached: a second build is a stamp check. The build log keeps every
command and its outcome, like the 3.2.0 builds' logs.

Python 3.8 comes from $DPH_TF_ERA_PYTHON, else `pyenv prefix <version>`, else `python3.8` on
PATH; without one the family is unavailable, said in one line."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.core import envvars
from harness.core.errors import UserError
from harness.core.paths import BUILD, PINS
from harness.core.records import BuiltVariant, UpstreamPin, Variant
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
    version: str  # the sdist's release
    file: str
    sha256: str
    source_ref: str  # "asc-2022"
    source_commit: str
    source_version: str  # the version string setuptools_scm would give that commit
    build_requires: tuple[str, ...]


@dataclass(frozen=True)
class TfEraEnv:
    pin: TfEraPin
    root: Path  # build/tf-era-<hash>
    python: Path  # the venv's interpreter
    dp: Path  # its `dp` entry point (v2's CLI: `dp train input.json`, no --tf/--pt)
    versions: str  # what VERIFY printed, and what it was built from
    cached: bool


def load_pin(path: Path = PIN_FILE) -> TfEraPin:
    d = upstream.load_pin(path)
    s, src = d["sdist"], d["source"]
    return TfEraPin(str(d["python"]["version"]), s["package"], s["version"], s["file"], s["sha256"],
                    src["ref"], src["commit"], src["version"], tuple(d["build"]["requires"]))


def content_hash(pin_file: Path = PIN_FILE, lock_file: Path = LOCK_FILE, source: Path | None = None) -> str:
    """The environment's cache key: the pins, and whether it is built from the asc-2022 checkout
    (a pinned commit: its bytes are fixed by the hash) or from the sdist."""
    h = hashlib.sha256()
    for p in (pin_file, lock_file):
        h.update(p.read_bytes())
    h.update(b"source" if source is not None else b"sdist")
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


SOURCE_DIR_VAR = "DEEPMD_SOURCE_DIR"  # upstream's own name for a source checkout (not a DPH_* variable)


def resolve_source(given: Path | str | None) -> Path | None:
    """The asc-2022 checkout to build from: `--upstream-source`, else $DEEPMD_SOURCE_DIR, else None
    (the sdist)."""
    given = given or os.environ.get(SOURCE_DIR_VAR) or None
    return Path(given) if given else None


def check_checkout(path: Path, pin: TfEraPin) -> Path:
    """`path` resolved when it is a git checkout that holds the pinned asc-2022 commit; UserError
    otherwise (before anything is built)."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise UserError(f"--upstream-source {path}: no such folder")
    r = subprocess.run(["git", "-C", str(path), "cat-file", "-t", pin.source_commit], capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() != "commit":
        raise UserError(f"--upstream-source {path}: not a git checkout holding {pin.source_ref} commit "
                        f"{pin.source_commit[:12]} (git clone https://github.com/deepmodeling/deepmd-kit; "
                        f"git checkout {pin.source_ref})")
    return path


def _run(cmd: list[str], log: list[str], timeout: float = 1800, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    log.append(f"$ {' '.join(map(str, cmd))}\n-> exit {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return r


def _source_tree(pin: TfEraPin, py: Path, root: Path, source: Path | None, log: list[str]) -> tuple[Path, dict, str]:
    """(tree to build, extra environment, what it is): the pinned commit exported from the
    checkout, or the verified sdist unpacked."""
    tree = root / "src"
    if source is not None:
        tree.mkdir()
        arch = subprocess.run(["git", "-C", str(source), "archive", "--format=tar", pin.source_commit],
                              capture_output=True, timeout=600)
        log.append(f"$ git -C {source} archive {pin.source_commit} | tar -x -C {tree}\n-> exit {arch.returncode}")
        if arch.returncode != 0 or subprocess.run(["tar", "-x", "-C", str(tree)], input=arch.stdout).returncode != 0:
            raise UserError(f"TF v2 environment: could not export {pin.source_commit[:12]} from {source}")
        return tree, {"SETUPTOOLS_SCM_PRETEND_VERSION": pin.source_version}, \
            f"{pin.source_ref} {pin.source_commit[:12]} (from {source})"
    downloads = root / "downloads"
    r = _run([str(py), "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
              f"{pin.package}=={pin.version}", "-d", str(downloads)], log)
    sdist = downloads / pin.file
    if r.returncode != 0 or not sdist.is_file():
        raise UserError(f"TF v2 environment: could not download {pin.file} (log: {root / 'build.log'})")
    upstream.verified_wheel(sdist, UpstreamPin(pin.package, pin.version, pin.file, pin.sha256), log)
    if _run(["tar", "-xzf", str(sdist), "-C", str(root)], log).returncode != 0:
        raise UserError(f"TF v2 environment: could not unpack {pin.file}")
    (root / pin.file[:-len(".tar.gz")]).rename(tree)
    return tree, {}, f"{pin.package} {pin.version} sdist (sha256 {pin.sha256[:12]})"


def build_env(pin: TfEraPin | None = None, build_dir: Path = BUILD, source: Path | None = None) -> TfEraEnv:
    """The family's environment, built from source or found in the cache; UserError when it
    cannot be built here. `source`: a checkout holding the asc-2022 commit (else the sdist)."""
    pin = pin or load_pin()
    if source is not None:
        source = check_checkout(source, pin)
    root = Path(build_dir) / f"tf-era-{content_hash(source=source)[:16]}"
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
    t0 = time.monotonic()
    try:
        if root.exists():
            shutil.rmtree(root)  # a half-built environment from an interrupted build
        root.mkdir(parents=True)
        if _run([str(base), "-m", "venv", str(venv)], log).returncode != 0:
            raise UserError(f"TF v2 environment: could not create the venv (log: {root / 'build.log'})")
        if _run([str(py), "-m", "pip", "install", "-q", "-r", str(LOCK_FILE), *pin.build_requires], log).returncode != 0:
            raise UserError(f"TF v2 environment: pip install of the lock and the build tools failed "
                            f"(log: {root / 'build.log'})")
        tree, extra, what = _source_tree(pin, py, root, source, log)
        wheels = root / "wheel"
        t1 = time.monotonic()
        r = _run([str(py), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree), "-w", str(wheels)],
                 log, timeout=3600, env={**os.environ, **extra})
        built = sorted(wheels.glob("deepmd_kit-*.whl"))
        if r.returncode != 0 or not built:
            raise UserError(f"TF v2 environment: building {what} failed (exit {r.returncode}; log: {root / 'build.log'})")
        log.append(f"built {built[0].name} from {what} in {time.monotonic() - t1:.0f} s (C++ ops: upstream's CMake)")
        if _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(built[0])], log).returncode != 0:
            raise UserError(f"TF v2 environment: installing {built[0].name} failed (log: {root / 'build.log'})")
        r = _run([str(py), "-c", VERIFY], log, timeout=300)
        if r.returncode != 0:
            raise UserError(f"TF v2 environment: deepmd's ops do not load (exit {r.returncode}; "
                            f"log: {root / 'build.log'})")
        versions = f"{r.stdout.strip().splitlines()[-1]}; built from {what}"
        log.append(f"environment built and verified in {time.monotonic() - t0:.0f} s")
        shutil.rmtree(tree, ignore_errors=True)  # the wheel is kept; the tree is reproducible
        stamp.write_text(versions + "\n")
        return TfEraEnv(pin, root, py, dp, versions, cached=False)
    finally:
        if root.is_dir():
            (root / "build.log").write_text("\n\n".join(log) + "\n")


# ---------------------------------------------------------------- Horovod (data parallelism of v2)

HOROVOD_PIN = PINS / "tf-era-horovod.toml"


@dataclass(frozen=True)
class Horovod:
    horovodrun: Path
    check_build: str  # `horovodrun --check-build`'s frameworks / controllers / tensor operations
    cached: bool


def check_build_summary(text: str) -> str:
    """`horovodrun --check-build`'s ticked boxes by section: "frameworks: TensorFlow, PyTorch;
    controllers: Gloo; tensor operations: Gloo"."""
    parts, section, ticked = [], None, []
    for ln in text.splitlines() + ["Available end:"]:
        ln = ln.strip()
        if ln.startswith("Available ") and ln.endswith(":"):
            if section and ticked:
                parts.append(f"{section}: {', '.join(ticked)}")
            section, ticked = ln[len("Available "):-1].lower(), []
        elif ln.startswith("[X]"):
            ticked.append(ln[3:].strip())
    return "; ".join(parts)


def build_horovod(env: TfEraEnv, pin_file: Path = HOROVOD_PIN) -> Horovod:
    """Horovod built from its pinned sdist into the family's environment (TensorFlow + Gloo), or
    found there: a stamp keyed by the pin file's hash. Verified by `horovodrun --check-build`
    naming TensorFlow and Gloo, since v2 falls back to serial training silently when horovod is
    missing; UserError when it cannot be built."""
    d = upstream.load_pin(pin_file)
    s, b = d["sdist"], d["build"]
    key = hashlib.sha256(Path(pin_file).read_bytes()).hexdigest()[:16]
    venv = env.root / "venv"
    run = venv / "bin" / "horovodrun"
    stamp = env.root / "horovod.txt"
    if stamp.is_file() and run.is_file() and stamp.read_text().split("\n", 1)[0] == key:
        return Horovod(run, stamp.read_text().split("\n", 1)[1].strip(), cached=True)
    log: list[str] = []
    t0 = time.monotonic()
    where = env.root / "horovod-build.log"
    try:
        stamp.unlink(missing_ok=True)
        downloads = env.root / "downloads"
        r = _run([str(env.python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:",
                  f"{s['package']}=={s['version']}", "-d", str(downloads)], log)
        sdist = downloads / s["file"]
        if r.returncode != 0 or not sdist.is_file():
            raise UserError(f"Horovod: could not download {s['file']} (log: {where})")
        upstream.verified_wheel(sdist, UpstreamPin(s["package"], s["version"], s["file"], s["sha256"]), log)
        if _run([str(env.python), "-m", "pip", "install", "-q", *b["requires"]], log).returncode != 0:
            raise UserError(f"Horovod: its requirements did not install (log: {where})")
        build_env = {**os.environ, **{k: str(v) for k, v in b["env"].items()}}
        log.append("build environment: " + " ".join(f"{k}={v}" for k, v in b["env"].items()))
        r = _run([str(env.python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(sdist)],
                 log, timeout=3600, env=build_env)
        if r.returncode != 0:
            raise UserError(f"Horovod: the build failed (exit {r.returncode}; log: {where})")
        r = _run([str(run), "--check-build"], log, timeout=300)
        checked = r.stdout
        missing = [f for f in ("[X] TensorFlow", "[X] Gloo") if f not in checked]
        if r.returncode != 0 or missing:
            raise UserError(f"Horovod: `horovodrun --check-build` does not list {', '.join(missing) or 'anything'} "
                            f"(log: {where})")
        summary = check_build_summary(checked)
        log.append(f"horovod built and checked in {time.monotonic() - t0:.0f} s: {summary}")
        stamp.write_text(f"{key}\n{summary}\n")
        return Horovod(run, summary, cached=False)
    finally:
        if log:
            where.write_text("\n\n".join(log) + "\n")


# ---------------------------------------------------------------- the family's variants (asc-*)

def built_variant(chain: list[Variant], build_dir: Path = BUILD, source: Path | None = None) -> BuiltVariant:
    """A TF v2 variant (backend tf-v2; patches/asc-*) resolved on the family's environment. Its
    chain below the root `baseline` targets this family's pin and carries no diffs or patch
    modules (v2's code runs as released; env and the three legal overrides configure it). Where
    the environment cannot be built here (no CPython 3.8, offline, no TensorFlow wheel for this
    machine) the variant is returned with `unavailable` set, and its runs are recorded so."""
    from harness import __version__
    from harness.prepare import variants

    pin = load_pin()
    source = resolve_source(source)
    if source is not None:
        source = check_checkout(source, pin)  # a wrong checkout is bad input, not an unavailable family
    want = pin.version if source is None else pin.source_ref
    for v in chain[1:]:
        if want not in v.upstream:
            raise UserError(f"variant {v.name} targets upstream {', '.join(v.upstream)}, not {want} "
                            f"(the TF v2 family's pin, {PIN_FILE.name})")
        if v.diffs or v.modules:
            raise UserError(f"variant {v.name}: a tf-v2 variant carries no diffs or patch modules "
                            "(the family runs deepmd-kit v2 as released)")
    leaf = chain[-1]
    h = hashlib.sha256(content_hash(source=source).encode())
    for v in chain:
        h.update((v.directory / "manifest.yaml").read_bytes())
    h.update(__version__.encode())
    try:
        env = build_env(pin, build_dir, source)
        tree, runtime, why, cached = env.root / "venv", env.versions, None, env.cached
        log = tuple((env.root / "build.log").read_text().splitlines()) if (env.root / "build.log").is_file() else ()
    except UserError as e:
        tree, runtime, why, cached = Path(build_dir) / f"tf-era-{content_hash(source=source)[:16]}" / "venv", None, str(e), False
        log = (str(e),)
    return BuiltVariant(
        name=leaf.name, chain=tuple(v.name for v in chain), hash=h.hexdigest(), tree=tree, backend="tf-v2",
        env=variants.chain_env(chain), overrides=variants.chain_overrides(chain), modules=(), accuracy_class=leaf.accuracy_class,
        description=leaf.description, cached=cached, log=log, engine=None, upstream_options={},
        upstream_only=True, runtime=runtime, unavailable=why)
