"""Variant manifests: patches/<name>/manifest.yaml, validated against a small schema.

A manifest names its base variant; a build applies the whole chain from `baseline` down.
Input overrides are limited to ALLOWED_OVERRIDES (the competition rule)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .records import ALLOWED_OVERRIDES, Variant

# DPH_PATCHES adds nothing but a different folder: a team can keep its own variants outside the repo.
PATCHES = Path(os.environ.get("DPH_PATCHES") or Path(__file__).resolve().parent.parent / "patches")
ENGINES = Path(__file__).resolve().parent.parent / "engines"
BACKENDS = ("pt", "jax", "tf")
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


def chain_env(variants: list[Variant]) -> dict[str, str]:
    """The process environment a chain sets: each variant's env over its base's."""
    env: dict[str, str] = {}
    for v in variants:
        env.update(v.env)
    return env


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
