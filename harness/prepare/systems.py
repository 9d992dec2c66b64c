"""Stage 3: systems. Loads systems/<name>/ (system.yaml + input.json + data), obtains upstream's
water data when it is missing, validates every data set before a run, and computes neighbour
statistics to check that `sel` covers the data."""
from __future__ import annotations

import math
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from harness.core import envvars
from harness.core.errors import UserError
from harness.core.records import System

from harness.core.paths import ROOT
from harness.core.fsutil import sha256_file as _sha
SYSTEMS = ROOT / "systems"
SHARED_WATER = ROOT.parent / "shared" / "systems" / "water"
UPSTREAM_GIT = "https://github.com/deepmodeling/deepmd-kit"
UPSTREAM_TAG = "v3.2.0"


def list_system_names(systems_dir: Path = SYSTEMS) -> list[str]:
    return sorted(p.parent.name for p in systems_dir.glob("*/system.yaml"))


def load_system(name_or_path: str, systems_dir: Path = SYSTEMS) -> System:
    """A system by name (systems/<name>), by path to a directory of the same shape, or by path to a
    bare directory of DeePMD systems with an input.json (no system.yaml: see system_from_input)."""
    d = Path(name_or_path)
    if not (d / "system.yaml").is_file() and (d / "input.json").is_file() and d.is_dir():
        return system_from_input(d / "input.json")
    if not (d / "system.yaml").is_file():
        d = systems_dir / name_or_path
    if not (d / "system.yaml").is_file():
        known = ", ".join(list_system_names(systems_dir)) or "none"
        raise UserError(f"unknown system {name_or_path!r}: not a directory with system.yaml or input.json "
                        f"(known: {known})")
    d = d.resolve()
    try:
        spec = yaml.safe_load((d / "system.yaml").read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{d / 'system.yaml'}: invalid YAML: {str(e).splitlines()[0]}") from None
    for key in ("name", "type_map", "train", "validation"):  # atoms_per_frame: optional (mixed sizes)
        if not isinstance(spec, dict) or key not in spec:
            raise UserError(f"{d / 'system.yaml'}: missing key {key!r}")
    g = spec.get("gate_steps")  # the training-equivalence test's length (docs/accuracy.md); null: not calibrated
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 2):
        raise UserError(f"{d / 'system.yaml'}: gate_steps must be an integer >= 2 or null, not {g!r}")
    inp = _read_input(d / "input.json")
    train = tuple(d / p for p in spec["train"])
    validation = tuple(d / p for p in spec["validation"])
    return System(
        name=str(spec["name"]), directory=d, type_map=tuple(spec["type_map"]),
        atoms_per_frame=int(spec["atoms_per_frame"]) if spec.get("atoms_per_frame") is not None
        else largest_frame((*train, *validation)),
        train=train, validation=validation, input=inp, spec=spec,
    )


def _read_input(path: Path) -> dict[str, Any]:
    try:
        inp = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: missing input.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(inp, dict):
        raise UserError(f"{path}: not a JSON object")
    return inp


def largest_frame(datasets: tuple[Path, ...]) -> int:
    """Atoms per frame of the largest data set (a system of mixed sizes has no one count)."""
    n = 0
    for d in datasets:
        try:
            n = max(n, len(np.loadtxt(d / "type.raw", dtype=int, ndmin=1)))
        except (OSError, ValueError):
            continue  # validate_dataset names the bad file
    return n


def expand_systems(systems: Any, base: Path, where: str) -> tuple[Path, ...]:
    """A training/validation `systems` entry as upstream reads it (deepmd.utils.data_system
    process_systems): a list of system directories, or one directory searched for every folder
    holding a type.raw. Relative paths are taken from `base` (the input file's folder)."""
    items = [systems] if isinstance(systems, str) else systems
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise UserError(f"{where}: systems must be a directory or a non-empty list of directories")
    out: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if isinstance(systems, str) and p.is_dir() and not (p / "type.raw").is_file():
            found = sorted(t.parent for t in p.rglob("type.raw"))
            if not found:
                raise UserError(f"{where}: {p}: no DeePMD system (no type.raw) under it")
            out += found
        else:
            out.append(p)
    return tuple(out)


def system_from_input(input_path: Path) -> System:
    """A system described by an upstream input.json alone: its training_data/validation_data
    systems (relative to the file's folder, as upstream resolves them from there), its
    model.type_map; atom counts and compositions may differ between systems."""
    input_path = Path(input_path).resolve()
    inp = _read_input(input_path)
    base = input_path.parent
    tr = inp.get("training") if isinstance(inp.get("training"), dict) else {}
    type_map = (inp.get("model") or {}).get("type_map") if isinstance(inp.get("model"), dict) else None
    if not isinstance(type_map, list) or not type_map:
        raise UserError(f"{input_path}: model.type_map must be a non-empty list of element names")
    if not isinstance(tr.get("training_data"), dict):
        raise UserError(f"{input_path}: missing training.training_data")
    train = expand_systems(tr["training_data"].get("systems"), base, f"{input_path}: training.training_data")
    validation = (expand_systems(tr["validation_data"].get("systems"), base,
                                 f"{input_path}: training.validation_data")
                  if isinstance(tr.get("validation_data"), dict) else ())
    spec = {"name": base.name, "type_map": type_map, "provenance": {"source": "input.json"},
            "train": [str(p) for p in train], "validation": [str(p) for p in validation]}
    return System(name=base.name, directory=base, type_map=tuple(type_map),
                  atoms_per_frame=largest_frame((*train, *validation)), train=train, validation=validation,
                  input=inp, spec=spec)


# ---------------------------------------------------------------- obtaining upstream data



def checksum_problems(system: System) -> list[str]:
    files = system.spec.get("files") or {}
    bad = []
    for rel, want in files.items():
        p = system.directory / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif _sha(p) != want:
            bad.append(f"{rel}: sha256 mismatch")
    return bad


def ensure_data(system: System, log=print) -> None:
    """Make the system's data present and verified. Water's data ships in the repository; the
    other sources only repair a checkout whose data went missing or was changed."""
    if not checksum_problems(system):
        return
    if system.spec.get("provenance", {}).get("source") != "upstream":
        problems = checksum_problems(system)
        raise UserError(f"system {system.name}: data does not match system.yaml ({problems[0]}); "
                        f"regenerate with `make systems REGENERATE=1`")
    rel_data = "examples/water/data"
    candidates: list[tuple[str, Path]] = []
    if os.environ.get("DEEPMD_SOURCE_DIR"):
        candidates.append(("$DEEPMD_SOURCE_DIR", Path(os.environ["DEEPMD_SOURCE_DIR"]) / rel_data))
    if not envvars.get(envvars.DPH_IGNORE_SHARED):  # CI sets it: nothing may need ../shared
        candidates.append(("../shared/systems/water", SHARED_WATER))
    for label, src in candidates:
        if (src / "data_0").is_dir():
            _install(system, src, label, log)
            if not checksum_problems(system):
                return
            log(f"  data from {label} does not match the pinned checksums; trying the next source")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["git", "clone", "--depth", "1", "--branch", UPSTREAM_TAG, "--filter=blob:none",
                            "--sparse", UPSTREAM_GIT, tmp + "/dp"], capture_output=True, text=True, timeout=600) \
            if shutil.which("git") else None
        if r is not None and r.returncode == 0:
            subprocess.run(["git", "-C", tmp + "/dp", "sparse-checkout", "set", rel_data], capture_output=True)
            src = Path(tmp) / "dp" / rel_data
            if (src / "data_0").is_dir():
                _install(system, src, f"a clone of deepmd-kit {UPSTREAM_TAG}", log)
                if not checksum_problems(system):
                    return
    raise UserError(
        f"system {system.name}: upstream data not found. Provide it by ONE of: "
        f"export DEEPMD_SOURCE_DIR=/path/to/deepmd-kit (a checkout containing {rel_data}); "
        f"or place it at {SHARED_WATER}; or copy data_0..data_3 into {system.directory / 'data'}; "
        f"then run `make systems`"
    )


def _install(system: System, src: Path, label: str, log) -> None:
    dst = system.directory / "data"
    tmp = system.directory / f".data-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.md"))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    log(f"  {system.name}: copied upstream data from {label}")


# ---------------------------------------------------------------- validation

def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: unreadable .npy ({type(e).__name__}: {e})") from None


def validate_dataset(d: Path, type_map: tuple[str, ...], natoms: int | None = None) -> dict[str, Any]:
    """Checks one DeePMD npy data set; returns {frames, natoms}. Raises UserError naming the file."""
    if not d.is_dir():
        raise UserError(f"{d}: data set directory not found")
    tr = d / "type.raw"
    if not tr.is_file():
        raise UserError(f"{tr}: missing")
    try:
        types = np.loadtxt(tr, dtype=int, ndmin=1)
    except ValueError:
        raise UserError(f"{tr}: not a list of integers") from None
    if natoms is not None and len(types) != natoms:
        raise UserError(f"{tr}: {len(types)} atoms, system.yaml says {natoms} (drop atoms_per_frame from system.yaml for systems of mixed sizes)")
    if types.size == 0 or types.min() < 0 or types.max() >= len(type_map):
        raise UserError(f"{tr}: type index outside type_map {list(type_map)}")
    tm = d / "type_map.raw"
    if tm.is_file():
        names = tm.read_text().split()
        used = [names[t] if t < len(names) else "?" for t in sorted(set(types.tolist()))]
        if any(u not in type_map for u in used):
            raise UserError(f"{tm}: element(s) {used} not all in the system's type_map {list(type_map)}")
    n = len(types)
    sets = sorted(p for p in d.glob("set.*") if p.is_dir())
    if not sets:
        raise UserError(f"{d}: no set.* directories")
    frames = 0
    for s in sets:
        arr: dict[str, np.ndarray] = {}
        for key in ("coord", "box", "energy", "force", "virial"):
            p = s / f"{key}.npy"
            if p.is_file():
                arr[key] = _load_npy(p)
            elif key in ("coord", "box", "energy"):
                raise UserError(f"{p}: missing")
        nf = arr["coord"].shape[0] if arr["coord"].ndim >= 1 else 0
        if nf == 0:
            raise UserError(f"{s / 'coord.npy'}: no frames")
        want = {"coord": n * 3, "box": 9, "energy": 1, "force": n * 3, "virial": 9}
        for key, a in arr.items():
            p = s / f"{key}.npy"
            if not np.issubdtype(a.dtype, np.floating):
                raise UserError(f"{p}: dtype {a.dtype}, expected floating point")
            if a.shape[0] != nf:
                raise UserError(f"{p}: {a.shape[0]} frames, coord.npy has {nf}")
            # energy may be [nf] or [nf,1] (upstream reads both); everything else [nf, k]
            if a.reshape(nf, -1).shape[1] != want[key]:
                raise UserError(f"{p}: shape {a.shape}, expected [{nf}, {want[key]}]")
            if not np.all(np.isfinite(a)):
                raise UserError(f"{p}: contains NaN or inf")
        vol = np.linalg.det(arr["box"].reshape(nf, 3, 3))
        if np.any(vol <= 1e-6):
            raise UserError(f"{s / 'box.npy'}: degenerate or left-handed box (volume {vol.min():.3g})")
        frames += nf
    return {"frames": frames, "natoms": n}


def validate_system(system: System) -> dict[str, int]:
    """Every data set on its own: each has its own atom count and composition; only a
    system.yaml that states atoms_per_frame fixes one count for all."""
    natoms = system.spec.get("atoms_per_frame")
    out = {"train": 0, "validation": 0}
    for part in ("train", "validation"):
        for d in getattr(system, part):
            out[part] += validate_dataset(d, system.type_map, None if natoms is None else int(natoms))["frames"]
    return out


# ---------------------------------------------------------------- neighbour statistics

def neighbour_counts(coord: np.ndarray, box: np.ndarray, types: np.ndarray, ntypes: int,
                     rcut: float) -> tuple[np.ndarray, int, float]:
    """For one frame: max over atoms of the number of neighbours of each type within rcut
    (periodic images included, self excluded), max over atoms of all neighbours, and the
    shortest pair distance. Cell lists (vesin): linear in atoms, so supercells of 10^4 atoms
    are checked in well under a second (an all-pairs search needs O(N^2 * images) memory)."""
    from vesin import NeighborList

    x = np.ascontiguousarray(coord.reshape(-1, 3), dtype=np.float64)
    cell = np.ascontiguousarray(box.reshape(3, 3), dtype=np.float64)
    i, j, d = NeighborList(cutoff=float(rcut), full_list=True).compute(x, cell, periodic=True, quantities="ijd")
    types = np.asarray(types, dtype=np.int64)
    counts = np.zeros((len(x), ntypes), dtype=np.int64)
    np.add.at(counts, (i, types[j]), 1)
    return counts.max(axis=0), int(counts.sum(axis=1).max()), float(d.min()) if d.size else math.inf


def neighbour_stats(system: System, max_frames: int = 200) -> dict[str, Any]:
    """Max neighbours per type within the input's rcut over (up to max_frames of) every data set."""
    desc = system.input["model"]["descriptor"]
    rcut = float(desc["rcut"])
    ntypes = len(system.type_map)
    best = np.zeros(ntypes, dtype=int)
    for d in (*system.train, *system.validation):
        types = np.loadtxt(d / "type.raw", dtype=int, ndmin=1)
        for s in sorted(p for p in d.glob("set.*") if p.is_dir()):
            coords = np.load(s / "coord.npy").reshape(-1, len(types), 3)
            boxes = np.load(s / "box.npy").reshape(-1, 3, 3)
            step = max(1, len(coords) // max(1, max_frames // 4))
            for c, b in zip(coords[::step], boxes[::step]):
                best = np.maximum(best, neighbour_counts(c, b, types, ntypes, rcut)[0])
    sel = desc.get("sel")
    sel_list = list(sel) if isinstance(sel, list) else None
    covers = None if sel_list is None else all(int(s) >= int(m) for s, m in zip(sel_list, best))
    return {"rcut": rcut, "max_neighbours": best.tolist(), "sel": sel_list, "sel_covers": covers}
