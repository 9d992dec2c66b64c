"""Shared pytest fixtures.

``tiny_system`` is a small water-based training system (systems/<name>/ shape: system.yaml,
input.json, data/) for tests that really train upstream: a handful of frames of upstream's water
example and a reduced-size se_e2_a model (embedding [4, 8, 16], axis_neuron 4, fitting [16, 16]),
so a training step and a process start-up are as cheap as upstream allows on CPU. The science
settings that matter for neighbour lists (rcut, sel) are the water system's own.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

# the fast-path variant tests' shared helpers assert too: pytest's messages for them as well
pytest.register_assert_rewrite("_upstream_fixtures")

REPO = Path(__file__).resolve().parent.parent
# the committed copy only: no test may depend on ../shared (CI hides it)
WATER_SOURCES = (REPO / "systems" / "water" / "data",)
SMALL_MODEL = {"neuron": [4, 8, 16], "axis_neuron": 4, "fitting": [16, 16]}

# Triton kernels (engines/dpfast/embed_kernels.py) run in Triton's interpreter on a machine with no
# GPU: the choice is made when a kernel is defined, so it is set before any test imports one.
if "TRITON_INTERPRET" not in os.environ and not Path("/dev/nvidia0").exists():
    os.environ["TRITON_INTERPRET"] = "1"


def water_source() -> Path | None:
    """The first directory holding upstream's water data (data_0 .. data_3), or None."""
    for d in WATER_SOURCES:
        if (d / "data_0" / "set.000" / "coord.npy").is_file() and (d / "data_3" / "set.000").is_dir():
            return d
    return None


def _copy_frames(src: Path, dst: Path, frames: int) -> int:
    """Copy the first `frames` frames of one DeePMD npy data set (set.000 only)."""
    (dst / "set.000").mkdir(parents=True)
    for f in ("type.raw", "type_map.raw"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    n = 0
    for p in sorted((src / "set.000").glob("*.npy")):
        a = np.load(p)[:frames]
        n = a.shape[0]
        np.save(dst / "set.000" / p.name, a)
    return n


def make_tiny_system(dest: Path, name: str = "tinywater", train_frames: int = 8,
                     validation_frames: int = 4) -> Path:
    """Write a tiny water system directory at `dest` and return it (raises if no water data)."""
    src = water_source()
    if src is None:
        raise FileNotFoundError("upstream water data not found (run `make systems`)")
    water = REPO / "systems" / "water"
    spec = yaml.safe_load((water / "system.yaml").read_text())
    inp = json.loads((water / "input.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    ntr = _copy_frames(src / "data_0", dest / "data" / "train_0", train_frames)
    nva = _copy_frames(src / "data_3", dest / "data" / "valid_0", validation_frames)
    m = copy.deepcopy(inp)
    m["model"]["descriptor"].update(neuron=SMALL_MODEL["neuron"], axis_neuron=SMALL_MODEL["axis_neuron"])
    m["model"]["fitting_net"]["neuron"] = SMALL_MODEL["fitting"]
    m["training"]["validation_data"]["numb_btch"] = 1
    (dest / "input.json").write_text(json.dumps(m, indent=2))
    sysyaml = {
        "name": name,
        "description": f"test-only: {ntr}+{nva} frames of upstream water, reduced-size model",
        "provenance": {"source": "test", "from": str(src)},
        "type_map": spec["type_map"],
        "atoms_per_frame": spec["atoms_per_frame"],
        "train": ["data/train_0"],
        "validation": ["data/valid_0"],
        "frames": {"train": ntr, "validation": nva},
    }
    (dest / "system.yaml").write_text(yaml.safe_dump(sysyaml, sort_keys=False))
    return dest


@pytest.fixture(scope="session")
def tiny_system(tmp_path_factory) -> Path:
    """Path of a tiny water-based system dir (session-wide, read-only by convention)."""
    if water_source() is None:  # it is committed: a missing copy is a broken checkout, not a skip
        raise FileNotFoundError(f"{REPO / 'systems' / 'water' / 'data'} is missing (restore it with git checkout)")
    return make_tiny_system(tmp_path_factory.mktemp("systems") / "tinywater")


def pytest_configure(config):
    """Under pytest-xdist, one OpenMP thread per worker's core share (unless OMP_NUM_THREADS is
    set): every training child defaults to all cores (harness/run/train.py), and two workers'
    children at 2 threads each on 2 cores spin against each other -- two tiny-water benches side
    by side took 160 s at 2 threads each, 85 s at 1 (2-core machine, 2026-12-06). Set here, in
    the controller before the workers start, so the workers, their in-process torch and every
    child they launch inherit it."""
    n = getattr(config.option, "numprocesses", None)
    if hasattr(config, "workerinput") or not n or "OMP_NUM_THREADS" in os.environ:
        return
    cores = os.cpu_count() or 1
    workers = cores if n in ("auto", "logical") else int(n)
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // max(1, workers)))


@pytest.fixture(scope="session", autouse=True)
def _fork_server():
    """PyTorch children (trainings, dp test/freeze, parity evaluations) are forked from a server
    per worker and environment that imported upstream once (harness/child/forkserver.py): each
    saves the ~5-9 s import of torch and deepmd, several hundred times a run. DPH_FORK_SERVER=0
    runs every child plain. The folder is short (a UNIX socket path has 108 bytes); removing it
    ends its servers."""
    import shutil
    import tempfile

    from harness.core import envvars

    if os.environ.get(envvars.DPH_FORK_SERVER) is not None:
        yield
        return
    folder = tempfile.mkdtemp(prefix="dph-fork-")
    os.environ[envvars.DPH_FORK_SERVER] = folder
    try:
        yield
    finally:
        os.environ.pop(envvars.DPH_FORK_SERVER, None)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _upstream_code_put_back():
    """What a test replaces of upstream's code through harness.core.rebind (engines, patch
    modules, the child's hooks loaded in-process) is put back when it ends; what a wider-scoped
    fixture replaced before it stays for its module."""
    from harness.core import rebind

    with rebind.scope():
        yield


# The modules that take longest on the 2-core CI machine, longest first (docs/testing.md's table):
# collected first, so `make test`'s workers (pytest-xdist, --dist loadfile: a module per worker)
# start them at once instead of one worker finishing on them alone while the other idles.
LONGEST_FIRST = (
    "integration/test_upstream_native.py", "integration/test_tf_era.py", "engines/test_graph_variant.py",
    "integration/test_convergence.py", "integration/test_sweep.py", "engines/test_compile_variant.py",
    "integration/test_backends.py", "engines/test_fused_variant.py", "engines/test_fused_step.py",
    "integration/test_accuracy.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {m: i for i, m in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        rel = Path(str(item.fspath)).resolve().relative_to(REPO / "tests").as_posix()
        return rank.get(rel, len(LONGEST_FIRST))

    items.sort(key=key)  # stable: collection order within a module and among the rest
