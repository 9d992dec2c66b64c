"""Reliability: bad data and config give one clear error naming the cause; killed runs and killed
writers never leave a half-written or corrupt result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from harness.results import runs as results
from harness.prepare import systems
from harness.core.errors import UserError
from _procs import kill_under

REPO = Path(__file__).resolve().parents[2]
TYPE_MAP = ("O", "H")


def _dataset(d: Path, nf: int = 3, nat: int = 6, **override) -> Path:
    """A valid small DeePMD data set; `override` replaces arrays or files to break it."""
    s = d / "set.000"
    s.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "coord": rng.random((nf, nat * 3)) * 5, "box": np.tile(np.eye(3).ravel() * 10, (nf, 1)),
        "energy": rng.random(nf), "force": rng.random((nf, nat * 3)), "virial": rng.random((nf, 9)),
    }
    types = "\n".join(str(i % 2) for i in range(nat)) + "\n"
    for key, val in override.items():
        if key == "types":
            types = val
        else:
            arrays[key] = val
    (d / "type.raw").write_text(types)
    (d / "type_map.raw").write_text("O\nH\n")
    for key, a in arrays.items():
        if a is None:
            continue
        if isinstance(a, bytes):
            (s / f"{key}.npy").write_bytes(a)
        else:
            np.save(s / f"{key}.npy", a)
    return d


def test_valid_dataset_passes(tmp_path):
    assert systems.validate_dataset(_dataset(tmp_path / "d"), TYPE_MAP, 6) == {"frames": 3, "natoms": 6}


def test_energy_as_column_is_accepted_like_upstream(tmp_path):
    d = _dataset(tmp_path / "d", energy=np.ones((3, 1)))
    assert systems.validate_dataset(d, TYPE_MAP, 6)["frames"] == 3


def _truncated_npy() -> bytes:
    import io

    b = io.BytesIO()
    np.save(b, np.ones((3, 18)))
    return b.getvalue()[:100]


BAD = {
    "truncated_npy": ({"coord": _truncated_npy()}, "coord.npy: unreadable"),
    "garbage_npy": ({"force": b"not a numpy file at all"}, "force.npy: unreadable"),
    "int_dtype": ({"energy": np.arange(3)}, "energy.npy: dtype"),
    "frames_mismatch": ({"force": np.ones((2, 18))}, "force.npy: 2 frames"),
    "wrong_width": ({"coord": np.ones((3, 17))}, "coord.npy: shape"),
    "virial_width": ({"virial": np.ones((3, 6))}, "virial.npy: shape"),
    "nan": ({"force": np.full((3, 18), np.nan)}, "NaN or inf"),
    "inf": ({"energy": np.array([1.0, np.inf, 2.0])}, "NaN or inf"),
    "type_count": ({"types": "0\n1\n0\n"}, "3 atoms, system.yaml says 6"),
    "type_index": ({"types": "0\n1\n2\n0\n1\n0\n"}, "type index outside"),
    "type_text": ({"types": "O\nH\nO\nH\nO\nH\n"}, "not a list of integers"),
    "degenerate_box": ({"box": np.zeros((3, 9))}, "degenerate or left-handed"),
    "left_handed_box": ({"box": np.tile(np.diag([10.0, 10.0, -10.0]).ravel(), (3, 1))}, "left-handed"),
    "missing_box": ({"box": None}, "box.npy: missing"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_rejected_naming_file_and_cause(tmp_path, case):
    override, needle = BAD[case]
    d = _dataset(tmp_path / "d", **override)
    with pytest.raises(UserError, match=None) as e:
        systems.validate_dataset(d, TYPE_MAP, 6)
    assert needle in str(e.value) and str(d) in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_set_dir_and_missing_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "type.raw").write_text("0\n")
    with pytest.raises(UserError, match="no set"):
        systems.validate_dataset(tmp_path / "empty", TYPE_MAP, 1)
    with pytest.raises(UserError, match="not found"):
        systems.validate_dataset(tmp_path / "nope", TYPE_MAP, 1)


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_bad_system_dir_via_cli_is_exit_2_one_line(tiny_system, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_system, bad)
    np.save(bad / "data" / "train_0" / "set.000" / "force.npy", np.full((8, 576), np.nan))
    r = _cli("bench", "--system", str(bad), "--results-dir", str(tmp_path / "res"), "--device", "cpu")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dpharness")]
    assert len(lines) == 1 and "force.npy: contains NaN or inf" in lines[0]
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda t: "{ not json", "invalid JSON"),
    (lambda t: t.replace('"se_e2_a"', '"no_such_descriptor"'), "no_such_descriptor"),
])
def test_invalid_input_json_is_rejected_before_launch(tiny_system, tmp_path, edit, needle):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_system, bad)
    p = bad / "input.json"
    p.write_text(edit(p.read_text()))
    r = _cli("bench", "--system", str(bad), "--results-dir", str(tmp_path / "res"), "--device", "cpu",
             "--steps", "3", "--no-accuracy")
    assert r.returncode == 2, r.stderr  # caught before launch, by upstream's own schema for the key
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dpharness")]
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "res").exists()


def test_unknown_upstream_version_is_exit_2(tmp_path):
    r = _cli("bench", "--upstream-version", "9.9.9", "--results-dir", str(tmp_path / "res"))
    assert r.returncode == 2 and "unknown upstream version '9.9.9'" in r.stderr


# ---------------------------------------------------------------- interruption

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from harness.results import runs as results
    payload = {"schema": "dpharness.run/1", "run_id": "r", "sweep_id": "s", "system": "water", "variant": "baseline",
               "blob": ["x" * 1000] * 4000}
    i = 0
    while True:
        results.atomic_write_json(Path(sys.argv[1]) / f"r{i % 3}.json", {**payload, "i": i})
        i += 1
""")


def test_killed_writers_never_leave_a_corrupt_record(tmp_path):
    """20 writers killed with SIGKILL at random moments mid-write: every record left is whole."""
    rng = np.random.default_rng(1)
    kills = 0
    for _ in range(20):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO)
        time.sleep(float(rng.uniform(0.3, 0.9)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
    assert kills == 20
    finals = sorted(tmp_path.glob("r*.json"))
    assert finals, "the writers never completed a record"
    for f in finals:
        d = json.loads(f.read_text())  # raises if half-written
        assert d["schema"] == "dpharness.run/1" and len(d["blob"]) == 4000
    assert len(results.load_runs(tmp_path)) == len(finals)  # temp leftovers are never read as runs


KILLER = """
import os, signal
import torch
from harness.child import runtime

def _die(i):
    if i == int(os.environ.get("DPH_TEST_KILL_AT", "3")):
        if os.environ.get("DPH_TEST_SIGNAL") == "OOM":  # what torch raises when the card is full
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        os.kill(os.getpid(), getattr(signal, os.environ.get("DPH_TEST_SIGNAL", "SIGKILL")))

runtime.clock.on_tick.append(_die)
"""


@pytest.fixture
def killer_patches(tmp_path):
    p = tmp_path / "patches"
    shutil.copytree(REPO / "patches" / "baseline", p / "baseline")
    (p / "killer").mkdir()
    (p / "killer" / "die.py").write_text(KILLER)
    (p / "killer" / "manifest.yaml").write_text(
        "name: killer\ndescription: test-only, kills its own training process mid-run\nbase: baseline\n"
        "upstream: ['3.2.0']\nbackend: pt\nmodules: [die.py]\n")
    return p


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_training_killed_mid_run_is_recorded_failed_with_reason(tiny_system, tmp_path, killer_patches, sig):
    r = _cli("bench", "--system", str(tiny_system), "--variant", "killer", "--no-baseline", "--steps", "6",
             "--device", "cpu", "--no-accuracy", "--results-dir", str(tmp_path / "res"),
             env={"DPH_PATCHES": str(killer_patches), "DPH_TEST_SIGNAL": sig})
    assert r.returncode == 3, r.stderr
    recs = results.load_runs(tmp_path / "res" / "runs")
    assert len(recs) == 1
    rec = recs[0]
    assert rec.status == "failed" and f"killed by signal {int(getattr(signal, sig))}" in rec.error
    assert rec.timing.step_s_median is None or rec.timing.steps_measured < 6


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_to_the_harness_records_an_interrupted_run(tiny_system, tmp_path, sig):
    """Ctrl-C, or a time limit's SIGTERM (timeout, Slurm, the GPU lanes' budget): the run that was
    training is written as interrupted, not lost."""
    # far more steps than the test waits for: the run can only end by the signal (a 400-step run
    # once finished on a fast CI machine before the progress poll saw it stepping)
    p = subprocess.Popen([sys.executable, "-m", "harness", "bench", "--system", str(tiny_system), "--steps", "20000",
                          "--device", "cpu", "--no-accuracy", "--results-dir", str(tmp_path / "res")],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # as from a terminal: a test suite started as a background job inherits
                         # SIGINT ignored (POSIX shells do that to `cmd &`), and so would the harness
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    work = tmp_path / "res" / "work"
    try:
        deadline = time.time() + 240
        seen = ""
        while time.time() < deadline and p.poll() is None:  # wait until training is really stepping
            prog = list(work.glob("*/progress")) if work.exists() else []
            seen = prog[0].read_text().strip() if prog else ""
            if seen not in ("", "0", "1"):
                break
            time.sleep(0.5)
        assert p.poll() is None, f"the run ended before it was interrupted (last progress {seen!r})"
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:  # a failed test must not leave a 20000-step training behind (it runs in its own session)
        kill_under(tmp_path)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 3, err
    recs = results.load_runs(tmp_path / "res" / "runs")
    assert len(recs) == 1 and recs[0].status == "interrupted" and signal.Signals(sig).name in recs[0].error


@pytest.mark.slow
def test_out_of_memory_is_reported_as_such_with_what_caused_it(tiny_system, tmp_path, killer_patches):
    r = _cli("bench", "--system", str(tiny_system), "--variant", "killer", "--no-baseline", "--steps", "6",
             "--device", "cpu", "--no-accuracy", "--results-dir", str(tmp_path / "res"),
             env={"DPH_PATCHES": str(killer_patches), "DPH_TEST_SIGNAL": "OOM"})
    assert r.returncode == 3, r.stderr
    rec = results.load_runs(tmp_path / "res" / "runs")[0]
    assert rec.status == "failed"
    assert rec.error.startswith("GPU out of memory training tinywater (192 atoms/frame, batch_size 1")
    assert "Tried to allocate 20.00 GiB" in rec.error


def test_missing_wheelhouse_offline_says_what_to_do(tmp_path):
    """An offline node without wheelhouse/: the bootstrap's pip failure names the remedy."""
    from harness.prepare import upstream

    pin = upstream.default_pin()
    fake = upstream.UpstreamPin(pin.package, pin.version, "deepmd_kit-0.0.0-none.whl", pin.sha256)
    old = (upstream.WHEELHOUSE, upstream.DOWNLOADS)
    try:
        upstream.WHEELHOUSE, upstream.DOWNLOADS = tmp_path / "wh", tmp_path / "dl"
        with pytest.raises(UserError, match="make wheelhouse"):
            upstream.fetch_wheel(fake, [])
    finally:
        upstream.WHEELHOUSE, upstream.DOWNLOADS = old
