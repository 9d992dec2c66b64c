"""`dpharness md MODEL --system S`: a frozen model (`dpharness train --freeze`, `dp --pt freeze`)
drives NVE molecular dynamics through upstream's ASE calculator; prints the energy drift per atom
and its verdict (harness/judge/md_nve.py), writes OUT/nve.json (the trajectory's energies) and
OUT/nve_verdict.json atomically."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.core import fsutil
from harness.core.errors import UserError


def _cmd(a) -> int:
    from harness.judge import md_nve
    from harness.prepare import build, systems
    from harness.run.bench import resolve_device

    if a.data:
        data = Path(a.data)
    else:
        sysm = systems.load_system(a.system)
        if not sysm.validation:
            raise UserError(f"{a.system}: no validation system to take a frame from (give --data DIR)")
        data = Path(sysm.validation[0])
    out = Path(a.out) if a.out else Path(a.model).resolve().parent / "md_nve"
    device = resolve_device(a.device)
    md_nve.check_inputs(Path(a.model), data, a.ps, a.dt_fs)  # before the baseline build below
    res = md_nve.run(Path(a.model), data, out, build.build_variant("baseline").tree, ps=a.ps, dt_fs=a.dt_fs,
                     temperature=a.temperature, frame=a.frame, seed=a.seed, device=device)
    fsutil.atomic_write_json(out / "nve_verdict.json", {**dataclasses.asdict(res), "data": str(data),
                                                        "model": str(Path(a.model).resolve()),
                                                        "drift_limit": md_nve.DRIFT_LIMIT,
                                                        "max_deviation_limit": md_nve.MAX_DEVIATION})
    print(f"NVE {res.atoms} atoms, {res.time_ps:g} ps at {res.dt_fs:g} fs, <T> {res.mean_temperature_K:.0f} K: "
          f"drift {res.drift_ev_atom_ps:.3g} eV/atom/ps (limit {md_nve.DRIFT_LIMIT:g}), largest excursion "
          f"{res.max_deviation_ev_atom:.3g} eV/atom (limit {md_nve.MAX_DEVIATION:g}): {'PASS' if res.ok else 'FAIL'}"
          + "".join(f"\n  {r}" for r in res.reasons))
    print(f"wrote {out / 'nve_verdict.json'}")
    return 4 if a.strict and not res.ok else 0


def register_cli(sub) -> None:
    p = sub.add_parser("md", help="NVE molecular dynamics of a frozen model through upstream's ASE calculator: "
                       "energy drift per atom and its verdict")
    p.add_argument("model", help="frozen model (.pth), e.g. OUTPUT/frozen_model.pth of `dpharness train --freeze`")
    p.add_argument("--system", default="water", help="system whose first validation folder gives the frame")
    p.add_argument("--data", default=None, metavar="DIR", help="a DeePMD system folder instead of --system's")
    p.add_argument("--frame", type=int, default=0)
    p.add_argument("--ps", type=float, default=1.0, help="picoseconds of NVE (default 1)")
    p.add_argument("--dt-fs", type=float, default=0.5, help="time step in fs (default 0.5)")
    p.add_argument("--temperature", type=float, default=300.0, help="initial Maxwell-Boltzmann temperature, K")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (the calculator's device)")
    p.add_argument("--out", default=None, help="output folder (default: md_nve beside the model)")
    p.add_argument("--strict", action="store_true", help="exit 4 when the drift check fails")
    p.set_defaults(func=_cmd)
