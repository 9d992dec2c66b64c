"""Work-size knobs for benchmarks: periodic supercells (`bench --replicate AxBxC`) and a batch
size applied to every variant of a sweep alike (`bench --batch-size N`).

Both derive a new system from a given one, written once under build/systems/ (keyed by the
source data's content and the knobs) and loaded like any other: the sweep, the gate and the
records then need nothing new, and the derived name (`water-2x2x2`, `water-b4`) keeps runs of
different work sizes apart. A supercell is exact for periodic labels: coordinates are tiled by
lattice translations, the box grows by A, B and C along its three vectors, forces are tiled, and
energy and virial (extensive) scale by A*B*C. The input's `sel` stays right: every atom of the
supercell has the same neighbours as its image in the original cell.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from harness.core.errors import UserError, whole_number
from harness.core.fsutil import sha256_file
from harness.core.paths import BUILD
from harness.core.records import System

DERIVED = BUILD / "systems"
# the per-frame files a supercell knows how to build; anything else (atom_ener, fparam, ...)
# would be silently wrong if copied, so it is refused by name
_EXTENSIVE = ("energy", "virial")
_TILED_PER_ATOM = ("force",)
_KNOWN = {"coord", "box", *_EXTENSIVE, *_TILED_PER_ATOM}


def parse_replicate(text: str | None) -> tuple[int, int, int] | None:
    """'2x2x2' -> (2, 2, 2); None or '1x1x1' -> None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or min(int(g) for g in m.groups()) < 1:
        raise UserError(f"--replicate must look like AxBxC with positive integers (e.g. 2x2x2), not {text!r}")
    reps = tuple(int(g) for g in m.groups())
    return None if reps == (1, 1, 1) else reps


def parse_batch_size(value: str | int | None) -> int | None:
    if value is None:
        return None
    msg = f"--batch-size must be a positive integer, not {value!r}"
    return whole_number(value, 1, msg, msg)


def parse_replicates(text: str | None) -> list[tuple[int, int, int] | None]:
    """'1x1x1,2x2x2' -> [None, (2, 2, 2)] (None: the system as given); duplicates dropped."""
    if text is None:
        return [None]
    return list(dict.fromkeys(parse_replicate(t) for t in str(text).split(",")))


def parse_batch_sizes(value: str | int | None) -> list[int | None]:
    if value is None:
        return [None]
    return list(dict.fromkeys(parse_batch_size(t) for t in str(value).split(",")))


def replicate_frames(coord: np.ndarray, box: np.ndarray, reps: tuple[int, int, int]):
    """coord (nf x N*3), box (nf x 9) -> supercell coord (nf x n*N*3) and box (nf x 9), images
    in C order over (a, b, c), each image's atoms in the original order."""
    nf = coord.shape[0]
    x = coord.reshape(nf, -1, 3)
    cell = box.reshape(nf, 3, 3)
    grid = np.array([(a, b, c) for a in range(reps[0]) for b in range(reps[1]) for c in range(reps[2])],
                    dtype=np.float64)
    shifts = np.einsum("sk,fkc->fsc", grid, cell)  # nf x images x 3
    big = (x[:, None, :, :] + shifts[:, :, None, :]).reshape(nf, -1)
    return big, (cell * np.array(reps, dtype=np.float64)[None, :, None]).reshape(nf, 9)


def replicate_dataset(src: Path, dst: Path, reps: tuple[int, int, int]) -> None:
    """Write the supercell of one DeePMD npy data set (type.raw, type_map.raw, set.*/)."""
    n = reps[0] * reps[1] * reps[2]
    if (src / "nopbc").exists():
        raise UserError(f"{src}: --replicate needs periodic data (this set has a nopbc file)")
    dst.mkdir(parents=True)
    types = np.loadtxt(src / "type.raw", dtype=int, ndmin=1)
    np.savetxt(dst / "type.raw", np.tile(types, n), fmt="%d")
    if (src / "type_map.raw").is_file():
        shutil.copy(src / "type_map.raw", dst / "type_map.raw")
    for s in sorted(p for p in src.glob("set.*") if p.is_dir()):
        unknown = sorted(p.name for p in s.glob("*.npy") if p.stem not in _KNOWN)
        if unknown:
            raise UserError(f"{s / unknown[0]}: --replicate does not know how to tile this label "
                            f"(it handles {', '.join(sorted(_KNOWN))})")
        out = dst / s.name
        out.mkdir()
        coord, box = np.load(s / "coord.npy"), np.load(s / "box.npy")
        nf = coord.shape[0]
        big, bigbox = replicate_frames(coord.astype(np.float64), box.astype(np.float64), reps)
        np.save(out / "coord.npy", big.astype(coord.dtype))
        np.save(out / "box.npy", bigbox.astype(box.dtype))
        for key in _EXTENSIVE:
            if (s / f"{key}.npy").is_file():
                a = np.load(s / f"{key}.npy")
                np.save(out / f"{key}.npy", (a * n).astype(a.dtype))
        for key in _TILED_PER_ATOM:
            if (s / f"{key}.npy").is_file():
                a = np.load(s / f"{key}.npy")
                np.save(out / f"{key}.npy", np.tile(a.reshape(nf, -1), (1, n)).astype(a.dtype))


def derived_name(name: str, reps: tuple[int, int, int] | None, batch_size: int | None) -> str:
    parts = [name]
    if reps:
        parts.append("x".join(map(str, reps)))
    if batch_size:
        parts.append(f"b{batch_size}")
    return "-".join(parts)


def _source_key(system: System, reps, batch_size) -> str:
    h = hashlib.sha256(json.dumps([list(reps or ()), batch_size, system.input], sort_keys=True).encode())
    for d in (*system.train, *system.validation):
        for p in sorted(d.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(d)).encode() + sha256_file(p).encode())
    return h.hexdigest()[:12]


def derive(system: System, replicate: tuple[int, int, int] | None = None, batch_size: int | None = None,
           root: Path = DERIVED, log=print) -> System:
    """The system with the knobs applied (the system itself when none is given)."""
    from harness.prepare.systems import load_system

    if not replicate and not batch_size:
        return system
    name = derived_name(system.name, replicate, batch_size)
    target = root / f"{name}-{_source_key(system, replicate, batch_size)}"
    if (target / "system.yaml").is_file():
        return load_system(str(target))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        parts = {"train": [], "validation": []}
        for part in parts:
            for i, d in enumerate(getattr(system, part)):
                rel = f"data/{part}_{i}_{d.name}"
                if replicate:
                    replicate_dataset(d, tmp / rel, replicate)
                else:
                    shutil.copytree(d, tmp / rel)
                parts[part].append(rel)
        n = replicate[0] * replicate[1] * replicate[2] if replicate else 1
        inp = copy.deepcopy(system.input)
        if batch_size:
            inp["training"]["training_data"]["batch_size"] = batch_size
        spec = {k: v for k, v in system.spec.items() if k not in ("files", "train", "validation")}
        mixed = system.spec.get("atoms_per_frame") is None  # mixed sizes stay unstated
        spec.update(name=name, atoms_per_frame=None if mixed else system.atoms_per_frame * n, train=parts["train"],
                    validation=parts["validation"],
                    workload={"base_system": system.name, "replicate": list(replicate) if replicate else None,
                              "batch_size": batch_size, "base_atoms_per_frame": system.atoms_per_frame})
        (tmp / "system.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        (tmp / "input.json").write_text(json.dumps(inp, indent=2) + "\n")
        try:
            os.replace(tmp, target)  # all or nothing: a half-written system is never loaded
        except OSError:
            if not (target / "system.yaml").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process derived it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"system {name}: derived from {system.name} ({system.atoms_per_frame * n} atoms per frame"
        f"{f', batch size {batch_size}' if batch_size else ''}) in {target}")
    return load_system(str(target))
