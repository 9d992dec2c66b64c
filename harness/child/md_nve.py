"""A real client of a frozen model: `python -m harness.child.md_nve --tree T --model M --system DIR
--out result.json [...]` runs NVE molecular dynamics of one frame of a DeePMD system with
upstream's ASE calculator (`deepmd.calculator.DP`) from the unpatched build T, and writes the
total, potential and kinetic energy every --every steps as JSON (atomically: a temp file, then
rename). Run by harness/judge/md_nve.py, which judges the drift.

`--force-scale` (a negative control for the tests only) multiplies the calculator's forces, so
the dynamics no longer conserve the model's energy: the drift check must then fail."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def frame_atoms(system: Path, frame: int):
    """ASE Atoms of one frame of a DeePMD npy system (set.000), periodic in its box."""
    import numpy as np
    from ase import Atoms

    types = np.loadtxt(system / "type.raw", dtype=int, ndmin=1)
    names = (system / "type_map.raw").read_text().split()
    s = system / "set.000"
    coord = np.load(s / "coord.npy")[frame].reshape(-1, 3)
    box = np.load(s / "box.npy")[frame].reshape(3, 3)
    return Atoms(symbols=[names[t] for t in types], positions=coord, cell=box, pbc=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--system", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--frame", type=int, default=0)
    p.add_argument("--dt-fs", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--force-scale", type=float, default=1.0)
    a = p.parse_args(argv)
    from harness.child.patch_loader import put_on_path

    put_on_path(a.tree, [])  # upstream's unpatched build first, as every judge uses

    import numpy as np
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet
    from deepmd.calculator import DP

    atoms = frame_atoms(Path(a.system), a.frame)
    calc = DP(model=a.model)
    if a.force_scale != 1.0:
        get = calc.get_property

        def scaled(name, atoms=None, allow_calculation=True):
            v = get(name, atoms, allow_calculation)
            return v * a.force_scale if name == "forces" and v is not None else v

        calc.get_property = scaled
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=a.temperature, rng=np.random.default_rng(a.seed))
    Stationary(atoms)
    rows = {"step": [], "time_ps": [], "etot": [], "epot": [], "ekin": []}

    def sample(step: int) -> None:
        epot, ekin = float(atoms.get_potential_energy()), float(atoms.get_kinetic_energy())
        for k, v in (("step", step), ("time_ps", step * a.dt_fs / 1000.0), ("etot", epot + ekin),
                     ("epot", epot), ("ekin", ekin)):
            rows[k].append(v)

    md = VelocityVerlet(atoms, timestep=a.dt_fs * units.fs)
    sample(0)
    for done in range(a.every, a.steps + 1, a.every):
        md.run(a.every)
        sample(done)
    out = {"atoms": len(atoms), "dt_fs": a.dt_fs, "steps": a.steps, "temperature_K": a.temperature,
           "force_scale": a.force_scale, "model": a.model, "system": a.system, "frame": a.frame, **rows}
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
