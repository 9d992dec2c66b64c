"""Does a frozen model drive molecular dynamics? NVE of one frame through upstream's ASE
calculator (deepmd.calculator.DP, unpatched baseline build, harness/child/md_nve.py), judged by
its energy conservation: the drift of the total energy per atom (least-squares slope over the run,
scipy.stats.linregress) and its largest excursion from the start.

Why that judges the model and not only the integrator: velocity Verlet conserves the energy of
forces that are the exact negative gradient of the potential, with an O(dt^2) bounded wobble and
no systematic drift. A model whose forces are not its energy's gradient (a broken force path, a
force precision far below the energy's) drifts. The limits are fixed here, before any run:
DRIFT_LIMIT is 1e-4 eV/atom/ps (well below the 1 meV/atom of a DP model's energy error, so a
nanosecond of MD would not walk off by the model's own accuracy), MAX_DEVIATION 1e-3 eV/atom."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.errors import UserError

DRIFT_LIMIT = 1e-4  # eV/atom/ps, |slope| of the total energy per atom
MAX_DEVIATION = 1e-3  # eV/atom, max |E(t) - E(0)|


@dataclass
class NveResult:
    atoms: int
    dt_fs: float
    steps: int
    time_ps: float
    drift_ev_atom_ps: float  # least-squares slope of E_tot / atoms
    max_deviation_ev_atom: float
    mean_temperature_K: float
    ok: bool
    reasons: list[str] = field(default_factory=list)


def judge(rows: dict) -> NveResult:
    """The verdict of one NVE trajectory (rows as md_nve writes them)."""
    import numpy as np
    from scipy import stats

    n = int(rows["atoms"])
    t = np.asarray(rows["time_ps"], float)
    e = np.asarray(rows["etot"], float) / n
    if t.size < 3 or not np.all(np.isfinite(e)):
        return NveResult(n, rows["dt_fs"], rows["steps"], float(t[-1]) if t.size else 0.0, float("nan"),
                         float("nan"), float("nan"), False, ["the trajectory has no finite energies"])
    slope = float(stats.linregress(t, e).slope)
    dev = float(np.max(np.abs(e - e[0])))
    kb = 8.617333262e-5  # eV/K
    temp = float(np.mean(np.asarray(rows["ekin"], float)) / (1.5 * n * kb))
    reasons = []
    if not abs(slope) <= DRIFT_LIMIT:
        reasons.append(f"energy drift {slope:.3g} eV/atom/ps beyond +-{DRIFT_LIMIT:g}")
    if not dev <= MAX_DEVIATION:
        reasons.append(f"largest excursion {dev:.3g} eV/atom beyond {MAX_DEVIATION:g}")
    return NveResult(n, float(rows["dt_fs"]), int(rows["steps"]), float(t[-1]), slope, dev, temp,
                     not reasons, reasons)


def check_inputs(model: Path, system_dir: Path, ps: float, dt_fs: float) -> None:
    """UserError naming the first bad input (before anything is built or written)."""
    import importlib.util

    if importlib.util.find_spec("ase") is None:
        raise UserError("dpharness md needs ASE, upstream's calculator's client: pip install ase (dev pins: ase==3.29.0)")
    if not Path(model).is_file():
        raise UserError(f"{model}: frozen model not found")
    if not (Path(system_dir) / "type.raw").is_file():
        raise UserError(f"{system_dir}: not a DeePMD system (no type.raw)")
    if not (ps > 0 and dt_fs > 0):
        raise UserError(f"--ps and --dt-fs must be positive, not {ps} and {dt_fs}")


def run(model: Path, system_dir: Path, out_dir: Path, tree: Path, ps: float = 1.0, dt_fs: float = 0.5,
        temperature: float = 300.0, frame: int = 0, seed: int = 1, force_scale: float = 1.0,
        timeout_s: float = 1800.0, device: str = "cpu") -> NveResult:
    """NVE of `frame` of `system_dir` for `ps` picoseconds with `model`; the trajectory's energies
    land in out_dir/nve.json, the child's log in out_dir/nve.log."""
    check_inputs(model, system_dir, ps, dt_fs)
    model, system_dir = Path(model), Path(system_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = max(1, round(ps * 1000.0 / dt_fs))
    cmd = [sys.executable, "-m", "harness.child.md_nve", "--tree", str(tree), "--model", str(model.resolve()),
           "--system", str(system_dir.resolve()), "--out", str(out_dir / "nve.json"), "--frame", str(frame),
           "--dt-fs", str(dt_fs), "--steps", str(steps), "--every", str(max(1, steps // 200)),
           "--temperature", str(temperature), "--seed", str(seed), "--force-scale", str(force_scale)]
    from harness.run import train

    env = train.subprocess_env(device, {}, out_dir)
    with open(out_dir / "nve.log", "w") as log:
        rc = subprocess.run(cmd, cwd=out_dir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    if rc != 0:
        from harness.judge.processes import log_tail

        raise RuntimeError(f"NVE run failed (exit {rc}): {log_tail(out_dir / 'nve.log')}")
    return judge(json.loads((out_dir / "nve.json").read_text()))
