"""Work-size knobs and the linear-memory neighbour search they need.

1. `--replicate AxBxC` / `--batch-size N` parse, refuse bad values (exit 2, one line, nothing
   written) and derive a system whose labels are exact for a periodic supercell;
2. the host-side neighbour statistics (vesin cell lists) equal an all-pairs oracle, and a
   supercell has the same neighbour counts as its cell;
3. the engine's cell-list neighbour search gives the dense search's lists bit for bit (water,
   a water supercell, a small triclinic cell with many images, no periodicity), a crippled
   cell grid is caught, and the graph engine's training step with cell lists still equals
   upstream's step.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.core.errors import UserError
from harness.prepare import systems, workload

from _upstream_fixtures import data  # noqa: E402,F401  (a fixture)

REPO = Path(__file__).resolve().parents[2]
WATER = REPO / "systems" / "water" / "data" / "data_0"


# ------------------------------------------------------------------ 1. the knobs
@pytest.mark.parametrize("text,want", [("2x2x2", (2, 2, 2)), ("4X4x1", (4, 4, 1)), (" 1x2x3 ", (1, 2, 3)),
                                       ("1x1x1", None), (None, None)])
def test_parse_replicate(text, want):
    assert workload.parse_replicate(text) == want


@pytest.mark.parametrize("text", ["2x2", "0x1x1", "2x2x-1", "two", "2*2*2"])
def test_parse_replicate_refuses(text):
    with pytest.raises(UserError, match="--replicate"):
        workload.parse_replicate(text)


@pytest.mark.parametrize("value", ["0", "-3", "auto", "1.5"])
def test_parse_batch_size_refuses(value):
    with pytest.raises(UserError, match="--batch-size"):
        workload.parse_batch_size(value)


@pytest.mark.parametrize("args,needle", [(["--replicate", "2x0x1"], "--replicate"),
                                         (["--batch-size", "0"], "--batch-size")])
def test_bad_knob_is_one_line_exit_2_and_writes_nothing(tmp_path, args, needle):
    r = subprocess.run([sys.executable, "-m", "harness", "bench", "--results-dir", str(tmp_path / "res"), *args],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "res").exists()


def test_replicated_labels_are_exact(tmp_path):
    src = tmp_path / "src"
    (src / "set.000").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n, nf = 5, 3
    cell = np.array([[4.0, 0.0, 0.0], [0.5, 5.0, 0.0], [0.3, 0.2, 6.0]])
    coord = rng.random((nf, n, 3)) @ cell
    np.savetxt(src / "type.raw", [0, 1, 1, 0, 1], fmt="%d")
    np.save(src / "set.000" / "coord.npy", coord.reshape(nf, -1))
    np.save(src / "set.000" / "box.npy", np.tile(cell.reshape(1, 9), (nf, 1)))
    np.save(src / "set.000" / "energy.npy", rng.random(nf))
    np.save(src / "set.000" / "force.npy", rng.random((nf, n * 3)))
    np.save(src / "set.000" / "virial.npy", rng.random((nf, 9)))
    reps = (2, 1, 3)
    workload.replicate_dataset(src, tmp_path / "big", reps)
    out = tmp_path / "big" / "set.000"
    big = np.load(out / "coord.npy").reshape(nf, -1, 3)
    assert big.shape == (nf, 6 * n, 3)
    assert np.loadtxt(tmp_path / "big" / "type.raw", dtype=int).tolist() == [0, 1, 1, 0, 1] * 6
    # image (a, b, c) = (1, 0, 2) is image number 1*3 + 2 = 5 in C order
    np.testing.assert_allclose(big[:, 5 * n:6 * n], coord + (1 * cell[0] + 2 * cell[2]), rtol=1e-15, atol=0)
    np.testing.assert_array_equal(big[:, :n], coord)
    np.testing.assert_allclose(np.load(out / "box.npy").reshape(nf, 3, 3)[0],
                               cell * np.array([2, 1, 3])[:, None])
    np.testing.assert_array_equal(np.load(out / "energy.npy"), 6 * np.load(src / "set.000" / "energy.npy"))
    np.testing.assert_array_equal(np.load(out / "virial.npy"), 6 * np.load(src / "set.000" / "virial.npy"))
    f = np.load(out / "force.npy").reshape(nf, 6, n * 3)
    for k in range(6):
        np.testing.assert_array_equal(f[:, k], np.load(src / "set.000" / "force.npy"))
    # a label the tiler does not understand is refused by name, not copied
    np.save(src / "set.000" / "fparam.npy", rng.random((nf, 1)))
    with pytest.raises(UserError, match="fparam.npy"):
        workload.replicate_dataset(src, tmp_path / "big2", reps)


def test_derived_system_loads_validates_and_is_cached(tiny_system, tmp_path):
    base = systems.load_system(str(tiny_system))
    root = tmp_path / "derived"
    got = workload.derive(base, (2, 1, 1), 3, root=root, log=lambda m: None)
    assert got.name == f"{base.name}-2x1x1-b3"
    assert got.atoms_per_frame == 2 * base.atoms_per_frame
    assert got.input["training"]["training_data"]["batch_size"] == 3
    assert got.spec["workload"] == {"base_system": base.name, "replicate": [2, 1, 1], "batch_size": 3,
                                    "base_atoms_per_frame": base.atoms_per_frame}
    frames = systems.validate_system(got)
    assert frames == systems.validate_system(base)
    assert len(list(root.iterdir())) == 1
    again = workload.derive(base, (2, 1, 1), 3, root=root, log=lambda m: pytest.fail("re-derived"))
    assert again.directory == got.directory
    assert workload.derive(base, None, None, root=root) is base
    # batch size alone: same data, new input
    b = workload.derive(base, None, 2, root=root, log=lambda m: None)
    assert b.name == f"{base.name}-b2" and b.atoms_per_frame == base.atoms_per_frame


# ------------------------------------------------------------------ 2. host neighbour statistics
def _all_pairs_counts(coord, box, types, ntypes, rcut):
    """Oracle: every (i, j, image) distance (fine for a few hundred atoms)."""
    cell = box.reshape(3, 3).astype(np.float64)
    x = coord.reshape(-1, 3).astype(np.float64)
    frac = np.linalg.solve(cell.T, x.T).T
    x = (frac - np.floor(frac)) @ cell  # wrapped, so one shell of images is enough
    vol = abs(np.linalg.det(cell))
    widths = [vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    n = [int(math.ceil(rcut / w)) for w in widths]
    shifts = np.array([(i, j, k) for i in range(-n[0], n[0] + 1) for j in range(-n[1], n[1] + 1)
                       for k in range(-n[2], n[2] + 1)], dtype=float) @ cell
    d = x[None, :, None, :] + shifts[None, None, :, :] - x[:, None, None, :]
    r = np.sqrt((d * d).sum(-1))
    r[np.arange(len(x)), np.arange(len(x)), len(shifts) // 2] = np.inf
    inside = r < rcut
    counts = np.stack([inside[:, types == t].sum(axis=(1, 2)) for t in range(ntypes)], axis=1)
    return counts.max(axis=0), int(counts.sum(axis=1).max()), float(r.min())


def _water_frames(k=2):
    c = np.load(WATER / "set.000" / "coord.npy")[:k]
    b = np.load(WATER / "set.000" / "box.npy")[:k]
    t = np.loadtxt(WATER / "type.raw", dtype=int)
    return c, b, t


def test_neighbour_counts_match_all_pairs():
    c, b, t = _water_frames()
    for f in range(len(c)):
        got = systems.neighbour_counts(c[f], b[f], t, 2, 6.0)
        want = _all_pairs_counts(c[f], b[f], t, 2, 6.0)
        assert got[0].tolist() == want[0].tolist() and got[1] == want[1]
        assert got[2] == pytest.approx(want[2], rel=1e-12)
    # a small triclinic cell, rcut larger than the cell: many images of every atom
    rng = np.random.default_rng(3)
    cell = np.array([[3.0, 0.0, 0.0], [1.0, 3.2, 0.0], [0.4, 0.7, 3.5]])
    x = rng.random((7, 3)) @ cell
    tt = np.array([0, 1, 0, 1, 1, 0, 0])
    got = systems.neighbour_counts(x, cell, tt, 2, 6.5)
    want = _all_pairs_counts(x, cell, tt, 2, 6.5)
    assert got[0].tolist() == want[0].tolist() and got[1] == want[1]


def test_supercell_has_the_same_neighbour_counts():
    c, b, t = _water_frames(1)
    big, bigbox = workload.replicate_frames(c, b, (2, 2, 1))
    one = systems.neighbour_counts(c[0], b[0], t, 2, 6.0)
    four = systems.neighbour_counts(big[0], bigbox[0], np.tile(t, 4), 2, 6.0)
    assert one[0].tolist() == four[0].tolist() and one[1] == four[1]


# ------------------------------------------------------------------ 3. the engine's cell lists
def _frames(reps=(1, 1, 1), k=2):
    c, b, t = _water_frames(k)
    big, bigbox = workload.replicate_frames(c, b, reps)
    n = reps[0] * reps[1] * reps[2]
    return torch.tensor(big), torch.tensor(np.tile(t, n)), torch.tensor(bigbox)


def _both(coord, atype, box, rcut, sel, monkeypatch):
    from dpfast import geometry as geo

    out = {}
    for mode, limit in (("dense", 10**15), ("cells", 0)):
        monkeypatch.setattr(geo, "DENSE_MAX_PAIRS", limit)
        out[mode] = geo.batch_neighbors(coord, atype, box, rcut, sel, images=True)
    return out["dense"], out["cells"]


def _assert_same(a, b):
    for x, y, name in ((a[0], b[0], "jloc"), (a[1], b[1], "diff"), (a[2], b[2], "mask"),
                       (a[3]["pidx"], b[3]["pidx"], "pidx")):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("reps", [(1, 1, 1), (2, 1, 1)])
def test_cell_search_equals_dense_bitwise(reps, monkeypatch):
    coord, atype, box = _frames(reps)
    a, b = _both(coord, atype, box, 6.0, [46, 92], monkeypatch)
    assert int(a[2].sum()) > 0
    _assert_same(a, b)


def _assert_same_up_to_ties(a, b):
    """The same neighbours and displacements per row, the same distance sequence bit for bit (so
    only exactly equal distances may trade places, as topk leaves their order open)."""
    n = a[2].shape[-1]
    da, db = torch.linalg.norm(a[1], dim=-1).reshape(-1, n), torch.linalg.norm(b[1], dim=-1).reshape(-1, n)
    assert torch.equal(a[2], b[2]) and torch.equal(torch.where(a[2].reshape(-1, n), da, 0), torch.where(b[2].reshape(-1, n), db, 0))

    def canonical(r):
        p = r[3]["pidx"].reshape(-1, n)
        order = torch.argsort(torch.where(r[2].reshape(-1, n), p, p.max() + 1), dim=1, stable=True)
        take = lambda t: torch.gather(t.reshape(-1, n), 1, order)  # noqa: E731
        d3 = r[1].reshape(-1, n, 3)
        return take(r[0]), take(p), torch.gather(d3, 1, order[..., None].expand(-1, -1, 3))

    for x, y, name in zip(canonical(a), canonical(b), ("jloc", "pidx", "diff")):
        assert torch.equal(x, y), name


def test_cell_search_equals_dense_many_images_and_no_pbc(monkeypatch):
    rng = np.random.default_rng(5)
    cell = np.array([[3.6, 0.0, 0.0], [1.1, 3.9, 0.0], [0.5, 0.9, 4.2]])
    x = torch.tensor(rng.random((2, 6, 3)) @ cell)
    at = torch.tensor([0, 1, 0, 0, 1, 1])
    box = torch.tensor(np.tile(cell.reshape(1, 9), (2, 1)))
    a, b = _both(x, at, box, 8.0, [180, 120], monkeypatch)  # rcut > twice the cell: 5x5x5+ images
    _assert_same_up_to_ties(a, b)  # an atom's images at +-a are exact ties here
    cloud = torch.tensor(rng.random((1, 40, 3)) * 9.0)
    a, b = _both(cloud, torch.tensor([0, 1] * 20), None, 4.0, [20, 20], monkeypatch)
    _assert_same(a, b)


def test_crippled_cell_grid_is_caught(monkeypatch):
    """Only the atom's own cell searched: neighbours in the 26 others go missing (the
    comparison above can fail)."""
    from dpfast import cells

    coord, atype, box = _frames((2, 1, 1), k=1)
    monkeypatch.setattr(cells, "_OFFSETS", torch.zeros(1, 3, dtype=torch.long))
    a, b = _both(coord, atype, box, 6.0, [46, 92], monkeypatch)
    assert int(b[2].sum()) < int(a[2].sum())


def test_cell_search_memory_is_linear():
    """Candidates per atom stay bounded as the cell grows (the dense search's grow with N)."""
    from dpfast import cells, geometry as geo

    widths = []
    for reps in ((1, 1, 1), (2, 2, 2)):
        coord, atype, box = _frames(reps, k=1)
        x = coord[0].reshape(-1, 3)
        b = box[0].reshape(3, 3)
        frac = torch.linalg.solve(b.T, x.T).T
        x = (frac - torch.floor(frac)) @ b
        shifts = geo._image_shifts(b, 6.0) @ b
        ext = (shifts[:, None, :] + x[None]).reshape(-1, 3)
        widths.append(cells.CellGrid(x, ext, 6.0).candidates(x).shape[1])
    assert widths[1] <= 1.2 * widths[0], widths


def test_engine_step_with_cell_lists_matches_upstream(data, tmp_path, monkeypatch):
    from _upstream_fixtures import assert_engine_step_matches, build_trainer, upstream_reference_step, water_config
    from dpfast import geometry as geo, graph as graph_engine

    if "water_train" not in data:
        pytest.skip("water data not present")
    monkeypatch.setattr(geo, "DENSE_MAX_PAIRS", 0)
    tr = build_trainer(water_config(data["water_train"], data["water_valid"], tos=False), tmp_path)
    lr = tr.lr_schedule.value(3)
    ref = upstream_reference_step(tr, lr)
    assert_engine_step_matches(graph_engine.GraphEngine(tr), ref, lr, "water/cells", 1e-10)


# ------------------------------------------------------------------ 4. the report's work-size view
def test_growth_exponent_recovers_the_slope():
    from harness.report.worksize import Point, growth_exponent

    pts = [Point("v", a, f, 1e-3 * (a * f) ** 0.8) for a, f in ((192, 1), (1536, 1), (192, 4), (12288, 1))]
    assert growth_exponent(pts) == pytest.approx(0.8, abs=1e-12)
    assert growth_exponent(pts[:1]) is None
    assert growth_exponent([Point("v", 192, 1, 1e-3), Point("v", 192, 1, 2e-3)]) is None


def test_report_has_a_work_size_section(tmp_path):
    from _fixtures_report import run_record, typed
    from harness.report import render, worksize

    recs = []
    for reps, atoms, ms_b, ms_f in ((None, 192, 30e-3, 1e-3), ([2, 2, 2], 1536, 40e-3, 4e-3)):
        name = "water" if reps is None else "water-2x2x2"
        for v, t in (("baseline", ms_b), ("fused", ms_f)):
            r = run_record("S1", name, v, t)
            # peak memory: baseline's all-pairs list ~ atoms^2, fused's ~ atoms
            peak = int(1e3 * atoms ** 2) if v == "baseline" else int(2e5 * atoms)
            r.update(atoms_per_frame=atoms, throughput={"batch_size_per_rank": 1}, memory={"gpu_peak_bytes": peak},
                     workload=None if reps is None else {"base_system": "water", "replicate": reps,
                                                         "batch_size": None, "base_atoms_per_frame": 192})
            recs.append(r)
    # a sweep of one size has no growth to show; another sweep's runs never mix in
    recs.append(run_record("S0", "water", "fused", 1e-3))
    failed = run_record("S1", "water-4x4x4", "baseline", 1e-3)
    failed.update(status="failed", atoms_per_frame=12288, error="torch.OutOfMemoryError: CUDA out of memory. "
                  "Tried to allocate 911.25 GiB", workload={"base_system": "water", "replicate": [4, 4, 4]})
    recs.append(failed)
    recs = typed(recs)
    secs = worksize.sections(recs)
    assert [(s["system"], s["sweep"]) for s in secs] == [("water", "S1")]
    got = {r["variant"]: float(r["exponent"]) for r in secs[0]["rows"]}
    assert got["fused"] == pytest.approx(math.log(4) / math.log(8), abs=0.01)
    assert got["baseline"] == pytest.approx(math.log(40 / 30) / math.log(8), abs=0.01)
    mem = {r["variant"]: r for r in secs[0]["rows"]}
    assert float(mem["fused"]["memory_exponent"]) == pytest.approx(1.0, abs=0.01)
    assert float(mem["baseline"]["memory_exponent"]) == pytest.approx(2.0, abs=0.01)
    assert mem["fused"]["memory"] == "192×1: 0.04 GB (200 kB/atom), 1536×1: 0.31 GB (200 kB/atom)"
    assert secs[0]["failed"] == ["baseline at 12288 atoms (torch.OutOfMemoryError: CUDA out of memory. "
                                 "Tried to allocate 911.25 GiB)"]
    html = render.render(recs)
    assert 'id="work-size"' in html and "growth exponent" in html and "peak GPU memory" in html
