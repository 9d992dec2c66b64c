"""What the generator makes: each system's spec (potential, lattice, MD schedule) and its
sub-systems (one MD run each)."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable

SEED = 2022


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
