"""Variant manifests: patches/<name>/manifest.yaml, validated against a small schema.

A manifest names its base variant; a build applies the whole chain from `baseline` down.
Input overrides are limited to ALLOWED_OVERRIDES (the competition rule). Upstream's own
acceleration switches (UPSTREAM_OPTIONS: `training.enable_compile`, `training.enable_tf32`) are a
separate field, `upstream_options`: upstream-native settings outside the three-parameter rule,
recorded as such, never mixed with the legal overrides."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.core.errors import UserError
from harness.core.records import ALLOWED_OVERRIDES, Variant

# DPH_PATCHES adds nothing but a different folder: a team can keep its own variants outside the repo.
from harness.core.paths import ENGINES, PATCHES
# tf-v2: the TF v2 family (DeePMD-kit 2.0.3's own `dp train`, in its Python 3.8 environment)
BACKENDS = ("pt", "jax", "tf", "pt-expt", "tf2", "tf-v2")
# upstream-native options a manifest may set under `upstream_options`: key -> (type, backends
# that read it). Upstream's schema accepts them for every backend and the others ignore them
# silently, so a variant that sets one for a backend that does not read it would measure nothing:
# refused. (pt_expt also reads `training.compile_options`, but upstream's own strict schema
# rejects that key, so no run could use it.)
UPSTREAM_OPTIONS = {
    "training/enable_compile": (bool, ("pt-expt", "tf2")),
    "training/enable_tf32": (bool, ("pt-expt",)),
}
ACCURACY_CLASSES = ("float64", "float32", "mixed")
_KEYS = {  # key: (type, required)
    "name": (str, True),
    "description": (str, True),
    "base": ((str, type(None)), False),
    "upstream": (list, True),
    "backend": (str, True),
    "env": (dict, False),
    "overrides": (dict, False),
    "diffs": (list, False),
    "modules": (list, False),
    "accuracy_class": (str, False),
    "engine": (str, False),
    "upstream_options": (dict, False),
}
_OVERRIDE_VALUES = {
    "model/descriptor/precision": ("float64", "float32", "float16", "bfloat16", "default"),
    "model/fitting_net/precision": ("float64", "float32", "float16", "bfloat16", "default"),
    "model/descriptor/type_one_side": (True, False),
}


def validate_overrides(overrides: dict[str, Any], where: str) -> dict[str, Any]:
    for key, value in overrides.items():
        if key not in ALLOWED_OVERRIDES:
            raise UserError(
                f"{where}: override {key!r} is not allowed; a variant may only change "
                + ", ".join(ALLOWED_OVERRIDES)
            )
        if value not in _OVERRIDE_VALUES[key]:
            raise UserError(f"{where}: override {key} = {value!r} is not one of {_OVERRIDE_VALUES[key]}")
    return dict(overrides)


def validate_upstream_options(options: dict[str, Any], backend: str, where: str) -> dict[str, Any]:
    for key, value in options.items():
        if key not in UPSTREAM_OPTIONS:
            raise UserError(f"{where}: upstream option {key!r} is not allowed; upstream_options may only set "
                            + ", ".join(UPSTREAM_OPTIONS))
        typ, backends = UPSTREAM_OPTIONS[key]
        if type(value) is not typ:
            raise UserError(f"{where}: upstream option {key} = {value!r} is not a {typ.__name__}")
        if backend not in backends:
            raise UserError(f"{where}: upstream option {key} is read only by backend(s) {', '.join(backends)}, "
                            f"not {backend}")
    return dict(options)


def load_variant(name: str, patches_dir: Path | None = None) -> Variant:
    patches_dir = patches_dir or PATCHES
    directory = patches_dir / name
    path = directory / "manifest.yaml"
    if not path.is_file():
        known = ", ".join(list_variant_names(patches_dir)) or "none"
        raise UserError(f"unknown variant {name!r} (known: {known})")
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a manifest is a mapping")
    for key in raw:
        if key not in _KEYS:
            raise UserError(f"{where}: unknown key {key!r} (allowed: {', '.join(_KEYS)})")
    for key, (typ, required) in _KEYS.items():
        if key not in raw:
            if required:
                raise UserError(f"{where}: missing required key {key!r}")
            continue
        if not isinstance(raw[key], typ):
            raise UserError(f"{where}: {key!r} has the wrong type ({type(raw[key]).__name__})")
    if raw["name"] != name:
        raise UserError(f"{where}: name {raw['name']!r} does not match its folder {name!r}")
    if raw["backend"] not in BACKENDS:
        raise UserError(f"{where}: backend {raw['backend']!r} is not one of {BACKENDS}")
    acc = raw.get("accuracy_class", "float64")
    if acc not in ACCURACY_CLASSES:
        raise UserError(f"{where}: accuracy_class {acc!r} is not one of {ACCURACY_CLASSES}")
    engine = raw.get("engine")
    if engine is not None and not (ENGINES / engine / "__init__.py").is_file():
        known = ", ".join(sorted(p.parent.name for p in ENGINES.glob("*/__init__.py"))) or "none"
        raise UserError(f"{where}: engine {engine!r} is not a package under {ENGINES} (known: {known})")
    base = raw.get("base")
    if name == "baseline":
        if base is not None:
            raise UserError(f"{where}: baseline has no base")
    elif not base:
        raise UserError(f"{where}: missing required key 'base' (use `base: baseline` for a first-level variant)")

    def files(key: str) -> tuple[Path, ...]:
        out = []
        for entry in raw.get(key) or []:
            p = directory / str(entry)
            if not p.is_file():
                raise UserError(f"{where}: {key} entry {entry!r} does not exist in {directory}")
            out.append(p)
        return tuple(out)

    return Variant(
        name=name,
        description=" ".join(raw["description"].split()),
        base=base,
        upstream=tuple(str(v) for v in raw["upstream"]),
        backend=raw["backend"],
        env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        overrides=validate_overrides(raw.get("overrides") or {}, where),
        diffs=files("diffs"),
        modules=files("modules"),
        directory=directory,
        accuracy_class=acc,
        engine=engine,
        upstream_options=validate_upstream_options(raw.get("upstream_options") or {}, raw["backend"], where),
    )


def chain(name: str, patches_dir: Path | None = None) -> list[Variant]:
    """The variant and its bases, root (`baseline`) first."""
    out: list[Variant] = []
    seen: set[str] = set()
    cur: str | None = name
    while cur is not None:
        if cur in seen:
            raise UserError(f"variant {name!r}: base chain has a cycle at {cur!r}")
        seen.add(cur)
        v = load_variant(cur, patches_dir)
        out.append(v)
        cur = v.base
    return out[::-1]


def chain_upstream_options(variants: list[Variant]) -> dict[str, Any]:
    """The upstream-native options a chain sets (each variant's over its base's), for the leaf's
    backend: a base's option its leaf's backend does not read is refused."""
    opts: dict[str, Any] = {}
    for v in variants:
        opts.update(v.upstream_options)
    leaf = variants[-1]
    return validate_upstream_options(opts, leaf.backend, f"variant {leaf.name} (with its bases)")


def upstream_only(variants: list[Variant]) -> bool:
    """True when the chain runs upstream's code alone: no diffs and no patch modules anywhere."""
    return not any(v.diffs or v.modules for v in variants)


def chain_env(variants: list[Variant]) -> dict[str, str]:
    """The process environment a chain sets: each variant's env over its base's."""
    env: dict[str, str] = {}
    for v in variants:
        env.update(v.env)
    return env


def chain_overrides(variants: list[Variant]) -> dict[str, Any]:
    """The legal input overrides a chain sets: each variant's over its base's."""
    out: dict[str, Any] = {}
    for v in variants:
        out.update(v.overrides)
    return out


def chain_engine(variants: list[Variant]) -> str | None:
    """The engine a chain's patch modules import: the nearest one named, leaf first."""
    for v in reversed(variants):
        if v.engine:
            return v.engine
    return None


def list_variant_names(patches_dir: Path | None = None) -> list[str]:
    patches_dir = patches_dir or PATCHES
    if not patches_dir.is_dir():
        return []
    return sorted(p.parent.name for p in patches_dir.glob("*/manifest.yaml"))
