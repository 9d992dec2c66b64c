"""The DeePMD npy files of a system: which they are, writing one sub-system's arrays, and
`generate` (MD then write, for every sub-system or one)."""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from harness.core.fsutil import sha256_file as sha256
from harness.prepare.systemgen.lammps_md import run_subsystem
from harness.prepare.systemgen.specs import SPECS, SubSystem, SystemSpec

# Files DeePMD reads for an energy model with virials; all float64.
SET_FILES = ("box.npy", "coord.npy", "energy.npy", "force.npy", "virial.npy")


def data_files(spec: SystemSpec, subs: tuple[SubSystem, ...] | None = None) -> list[str]:
    """Every data file of the system, relative to the system dir."""
    names = []
    for sub in subs if subs is not None else spec.subsystems:
        base = f"data/{sub.name}"
        names += [f"{base}/type.raw", f"{base}/type_map.raw"]
        names += [f"{base}/set.000/{f}" for f in SET_FILES]
    return names


def write_subsystem(spec: SystemSpec, sub: SubSystem, arrays: dict[str, np.ndarray], out_dir: pathlib.Path) -> None:
    d = out_dir / "data" / sub.name
    (d / "set.000").mkdir(parents=True, exist_ok=True)
    (d / "type.raw").write_text("".join(f"{int(t)}\n" for t in arrays["type"]))
    (d / "type_map.raw").write_text("".join(f"{el}\n" for el in spec.type_map))
    for key in ("box", "coord", "energy", "force", "virial"):
        np.save(d / "set.000" / f"{key}.npy", arrays[key], allow_pickle=False)


def _select(spec: SystemSpec, only: str | None) -> tuple[SubSystem, ...]:
    if only is None:
        return spec.subsystems
    subs = tuple(s for s in spec.subsystems if s.name == only)
    if not subs:
        raise KeyError(f"{spec.name} has no sub-system {only!r}; have {[s.name for s in spec.subsystems]}")
    return subs


def generate(name: str, out_dir: pathlib.Path, only: str | None = None) -> dict[str, str]:
    """(Re)generate system ``name`` into ``out_dir`` (the system dir, e.g. systems/copper).

    Writes ``data/<sub>/...`` for every sub-system (or just ``only``) and returns
    {path relative to out_dir: sha256} of the files written.
    """
    spec = SPECS[name]
    out_dir = pathlib.Path(out_dir)
    subs = _select(spec, only)
    for sub in subs:
        t0 = time.perf_counter()
        write_subsystem(spec, sub, run_subsystem(spec, sub), out_dir)
        print(f"[systemgen] {name}/{sub.name}: {sub.nframes} frames in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return {rel: sha256(out_dir / rel) for rel in data_files(spec, subs)}
