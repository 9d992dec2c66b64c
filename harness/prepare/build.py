"""Stage 2: the variant build. Unpacks the pinned upstream wheel, applies the deepmd 3.2.0
fix-ups and the variant chain's diffs, and caches the tree under build/<variant>-<hash>/ by a
content hash of everything that went into it."""
from __future__ import annotations

import hashlib
import json
import os
import py_compile
import secrets
import threading
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from harness import __version__
from harness.prepare import diffs
from harness.prepare import engine_options
from harness.prepare import upstream
from harness.prepare import variants
from harness.core.errors import UserError
from harness.core.records import BuiltVariant, UpstreamPin, Variant

from harness.core.paths import BUILD
RECIPE = 4  # bump when the build steps below change what a tree contains
# what of a variant's folder is code: a README or a notes file changes no build
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".diff", ".patch", ".json", ".so")
OP_PT = "deepmd/lib/libdeepmd_op_pt.so"
RUN_CONFIG = "deepmd/lib/run_config.ini"


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except Exception:
        return "none"


def _code_files(directory: Path) -> list[Path]:
    """The code of a variant folder or an engine package: patch modules may import siblings, so
    every code file counts; prose (README, notes) does not."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix in CODE_SUFFIXES)


def tree_hash(pin: UpstreamPin, chain: list[Variant]) -> str:
    """Key of the patched upstream tree: upstream + diffs (manifest-only variants share a tree)."""
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE} harness={__version__} torch={_torch_version()}\n".encode())
    h.update(f"upstream={pin.package}:{pin.version}:{pin.sha256}\n".encode())
    for v in chain:
        for p in v.diffs:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def content_hash(pin: UpstreamPin, chain: list[Variant]) -> str:
    """Key of the whole variant build: the tree plus every file of every variant in the chain."""
    h = hashlib.sha256(tree_hash(pin, chain).encode())
    for v in chain:
        h.update(f"variant={v.name}\n".encode())
        for p in _code_files(v.directory):
            h.update(str(p.relative_to(v.directory)).encode() + b"\0" + p.read_bytes())
    engine = variants.chain_engine(chain)
    if engine:
        h.update(f"engine={engine}\n".encode())
        for p in _code_files(variants.ENGINES / engine):
            h.update(str(p.relative_to(variants.ENGINES)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _atomic_dir(final: Path, fill) -> bool:
    """Create `final` by filling a private temp dir and renaming it; False if it already existed.
    Concurrent builders of the same key: the first rename wins, the others discard their copy."""
    if (final / "DONE").is_file():
        return False
    # unique per process AND thread: calibration builds from several threads of one process
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        (tmp / "DONE").write_text("")
        try:
            os.rename(tmp, final)
        except OSError:  # lost the race (or a stale partial dir without DONE): keep the winner's
            if not (final / "DONE").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def build_variant(name: str, pin: UpstreamPin | None = None, *, build_dir: Path = BUILD,
                  patches_dir: Path | None = None, tf_source: Path | None = None) -> BuiltVariant:
    """Build (or reuse) the tree and the frozen patch folders for `name`. tf_source: a checkout
    of the asc-2022 commit, which the TF v2 family (tf-v2 variants) is then built from."""
    pin = pin or upstream.default_pin()
    chain = variants.chain(name, patches_dir)
    leaf = chain[-1]
    if leaf.backend == "tf-v2":  # the TF v2 family: its own environment, not a 3.2.0 tree
        from harness.prepare import tf_era

        return tf_era.built_variant(chain, build_dir, tf_source)
    for v in chain:
        if pin.version not in v.upstream:
            raise UserError(f"variant {v.name} targets upstream {', '.join(v.upstream)}, not {pin.version}")
    tdir = build_dir / f"upstream-{tree_hash(pin, chain)[:16]}"

    def fill_tree(tmp: Path) -> None:
        log: list[str] = []
        _materialise(pin, chain, tmp / "site", log)
        (tmp / "build.log").write_text("\n".join(log) + "\n")

    _atomic_dir(tdir, fill_tree)
    digest = content_hash(pin, chain)
    vdir = build_dir / f"{name}-{digest[:16]}"

    engine = variants.chain_engine(chain)

    def fill_variant(tmp: Path) -> None:
        for v in chain:
            shutil.copytree(v.directory, tmp / "patches" / v.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if engine:  # the run imports this frozen copy, the one the hash covers
            shutil.copytree(variants.ENGINES / engine, tmp / "engines" / engine,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _compile_tree(tmp)  # the patch modules and the engine copy each run imports
        (tmp / "build.json").write_text(json.dumps(
            {"variant": name, "hash": digest, "chain": [v.name for v in chain], "tree": tdir.name}))

    cached = not _atomic_dir(vdir, fill_variant)
    env = variants.chain_env(chain)
    if engine:  # a bad engine option (the manifest's, or the user's environment) -> UserError now
        engine_options.check(vdir / "engines" / engine, name, env, os.environ)
    modules = tuple(vdir / "patches" / v.name / m.relative_to(v.directory) for v in chain for m in v.modules)
    return BuiltVariant(
        name=name, chain=tuple(v.name for v in chain), hash=digest, tree=tdir / "site",
        backend=leaf.backend, env=env, overrides=variants.chain_overrides(chain), modules=modules,
        accuracy_class=leaf.accuracy_class, description=leaf.description, cached=cached,
        log=tuple((tdir / "build.log").read_text().splitlines()), engine=engine,
        upstream_options=variants.chain_upstream_options(chain),
        upstream_only=variants.upstream_only(chain),
    )


def _materialise(pin: UpstreamPin, chain: list[Variant], site: Path, log: list[str]) -> None:
    wheel = upstream.fetch_wheel(pin, log)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    log.append(f"unpacked {wheel.name} into the build tree")
    _fixups(site, log)
    for v in chain:
        for d in v.diffs:
            diffs.apply(d, site, log)
    _compile_tree(site, log)


def _fixups(site: Path, log: list[str]) -> None:
    """deepmd 3.2.0 wheel fix-ups (visible in the build log)."""
    cfg = site / RUN_CONFIG
    if cfg.is_file():
        text = cfg.read_text()
        if "CIBUILDWHEEL = 1" in text:
            cfg.write_text(text.replace("CIBUILDWHEEL = 1", "CIBUILDWHEEL = 0"))
            log.append(f"fix-up: {RUN_CONFIG}: CIBUILDWHEEL = 1 -> 0 (else `import deepmd.pt` requires the mpich wheel)")
    op = site / OP_PT
    if op.is_file():
        ok, why = _op_loads(op)
        if ok:
            log.append(f"fix-up: kept {OP_PT} (it loads against torch {_torch_version()})")
        else:
            op.unlink()
            log.append(f"fix-up: removed {OP_PT}: built for another torch than {_torch_version()} ({why}); "
                       "se_e2_a training does not need it")


def _op_loads(so: Path) -> tuple[bool, str]:
    """Try loading the custom-op library in a throwaway process (a bad load can abort)."""
    code = f"import torch; torch.ops.load_library({str(so)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode == 0:
        return True, ""
    lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
    return False, (lines[-1][:160] if lines else f"exit {r.returncode}")


def _compile_tree(root: Path, log: list[str] | None = None) -> None:
    """Compile every module of a built tree to bytecode beside it (__pycache__), which also
    checks that patched Python compiles (a bad diff fails the build, not a run). Why write it:
    with PYTHONDONTWRITEBYTECODE set (CI's image sets it) nothing else ever caches it, and every
    training, dp test and parity child would recompile deepmd's ~900 modules from source
    (~3 s a child on the 2-core machine). Timestamp pycs: a source edited later is recompiled."""
    bad = []
    for p in sorted(root.rglob("*.py")):
        try:
            py_compile.compile(str(p), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        except py_compile.PyCompileError as e:
            line = getattr(e.exc_value, "lineno", "?")
            bad.append(f"{p.relative_to(root)}:{line}")
    if bad:
        raise UserError(f"patched tree has syntax errors: {', '.join(bad[:5])}")
    if log is not None:
        log.append(f"build tree compiles (bytecode written for {sys.implementation.cache_tag})")
