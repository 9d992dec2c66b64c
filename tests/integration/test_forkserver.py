"""The fork server (harness/child/forkserver.py): a served child is the plain child, as the harness
observes it -- same training to the last bit, same exit status, signals reach it, a SIGKILLed proxy
takes its child with it -- and what may not be served starts as before."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.child import forkserver
from harness.core import envvars
from harness.prepare import build, systems
from harness.run import train
from _procs import gone_within, kill_under, pids_under

STEPS = 6


@pytest.fixture(scope="module")
def tree() -> Path:
    return Path(build.build_variant("baseline").tree)


def _start(tree: Path, system: Path, wd: Path, steps: int, served: Path | None) -> subprocess.Popen:
    wd.mkdir(parents=True)
    inp = train.make_input(systems.load_system(str(system)), {}, steps, seed=7)
    inp["training"]["disp_freq"] = 1
    (wd / "input.json").write_text(json.dumps(inp))
    env = train.subprocess_env("cpu", {}, wd)
    env.pop(envvars.DPH_FORK_SERVER, None)
    if served is not None:
        env[envvars.DPH_FORK_SERVER] = str(served)
    cmd = train.launch_command(tree, (), ["--pt", "train", "input.json", "--skip-neighbor-stat"])
    return subprocess.Popen(cmd, cwd=wd, env=env, stdout=open(wd / "train.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rows(wd: Path) -> list[dict]:
    return [json.loads(x) for x in (wd / "lcurve_full.jsonl").read_text().splitlines()]


def _wait_for_step(p: subprocess.Popen, wd: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if int((wd / "progress").read_text() or 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {step} (exit {p.poll()}): {(wd / 'train.log').read_text()[-2000:]}")


@pytest.fixture
def folder(tmp_path: Path):
    """A server folder of the test's own; removing it ends its servers, and nothing outlives the test."""
    d = tmp_path / "srv"
    d.mkdir()
    yield d
    for wd in tmp_path.iterdir():
        kill_under(wd, exact=True)
    import shutil

    shutil.rmtree(d)


def test_a_served_training_is_the_plain_training(tree: Path, tiny_system: Path, tmp_path: Path, folder) -> None:
    runs = {}
    for name, served in (("plain", None), ("served", folder), ("served-again", folder)):
        p = _start(tree, tiny_system, tmp_path / name, STEPS, served)
        assert p.wait(timeout=600) == 0, (tmp_path / name / "train.log").read_text()[-3000:]
        runs[name] = tmp_path / name
    plain = _rows(runs["plain"])
    assert len(plain) == STEPS
    for name in ("served", "served-again"):  # bit for bit: same code, same inputs, same seed
        assert _rows(runs[name]) == plain
    steps = {n: json.loads((wd / "steps.json").read_text()) for n, wd in runs.items()}
    assert "launcher" not in steps["plain"] and steps["served"]["launcher"] == "fork server"
    assert len(steps["served"]["step_s"]) == len(steps["plain"]["step_s"])
    logs = list(folder.glob("*.log"))
    assert len(logs) == 1 and "serving" in logs[0].read_text()  # one server, both runs forked from it
    assert (runs["served"] / "model.ckpt.pt").exists() or list(runs["served"].glob("model.ckpt-*.pt"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_reaches_the_forked_child_and_its_exit_status_comes_back(tree, tiny_system, tmp_path, folder,
                                                                          sig) -> None:
    codes = {}
    for name, served in (("plain", None), ("served", folder)):
        wd = tmp_path / name
        p = _start(tree, tiny_system, wd, 100000, served)
        _wait_for_step(p, wd, 3)
        os.killpg(p.pid, sig)  # as train.run_training stops a child: its whole group
        codes[name] = p.wait(timeout=120)
        assert gone_within(wd, 30, exact=True), name
    assert codes["served"] == codes["plain"], (codes, (tmp_path / "served" / "train.log").read_text()[-2000:])


def test_a_sigkilled_proxy_takes_its_forked_child_with_it(tree, tiny_system, tmp_path, folder) -> None:
    wd = tmp_path / "killed"
    p = _start(tree, tiny_system, wd, 100000, folder)
    _wait_for_step(p, wd, 3)
    # the proxy stays the harness's child; the training runs in the fork, in a session of its own
    forked = [pid for pid in pids_under(wd, exact=True) if pid != p.pid and os.getsid(pid) == pid
              and b"harness.child.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(forked) == 1 and os.getsid(p.pid) == p.pid
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    assert gone_within(wd, 30, exact=True), "the forked training (or its data loaders) outlived its proxy"


def test_driver_code_runs_as_python_c_would_served_or_not(tree, tmp_path, folder) -> None:
    """harness.child.pycode (the tests' upstream drivers): the same argv, output and exit code as
    `python -c`; served, the code runs in a fork (another pid than the proxy's), not served, in the
    process itself."""
    # upstream found (not imported: a full import in the two unserved runs cost ~40 s of this test)
    code = ("import importlib.util, os, sys; print('argv', sys.argv, __name__, importlib.util.find_spec('deepmd') is not None, "
            "any(os.path.abspath(p) == os.getcwd() for p in sys.path)); "
            "print('pid', os.getpid(), flush=True); raise SystemExit(int(sys.argv[2]))")
    seen = {}
    for how, served in (("python -c", None), ("plain", None), ("served", folder)):
        env = dict(os.environ)
        env.pop(envvars.DPH_FORK_SERVER, None)
        if served is not None:
            env[envvars.DPH_FORK_SERVER] = str(served)
        if how == "python -c":  # how the drivers find upstream
            env["PYTHONPATH"] = str(tree)
        cmd = ([sys.executable, "-c", code] if how == "python -c" else
               [sys.executable, "-m", "harness.child.pycode", "--tree", str(tree), "--", code])
        p = subprocess.Popen([*cmd, "a", "3"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 3, (how, err[-2000:])
        assert "argv ['-c', 'a', '3'] __main__ True True" in out, (how, out)
        seen[how] = int(out.split("pid ")[1].split()[0]) == p.pid
    assert seen == {"python -c": True, "plain": True, "served": False}
    assert list(folder.glob("*.sock")), "no server was started"


def test_what_is_not_served_starts_as_before(tmp_path: Path) -> None:
    env = {envvars.DPH_FORK_SERVER: str(tmp_path)}
    launch = ["--tree", "/t", "--", "--pt", "train", "input.json"]
    assert forkserver.servable("harness.child.launch", launch, env) == "/t"
    assert forkserver.servable("harness.child.launch", launch, {}) is None  # not asked for
    assert forkserver.servable("harness.child.launch", launch, {envvars.DPH_FORK_SERVER: "0"}) is None
    assert forkserver.servable("harness.child.launch", launch, {**env, "RANK": "0"}) is None  # torchrun's rank
    assert forkserver.servable("harness.child.launch", ["--tree", "/t", "--", "--tf", "train", "x"], env) is None
    assert forkserver.servable("harness.child.md_nve", ["--tree", "/t"], env) is None
    parity = ["--tree", "/t", "--backend", "pt"]
    assert forkserver.servable("harness.child.parity_eval", parity, env) == "/t"
    assert forkserver.servable("harness.child.launch", ["--tree", "/t", "--", "--pt-expt", "train", "x"], env) == "/t"
    assert forkserver.servable("harness.child.launch", ["--tree", "/t", "--", "--jax", "train", "x"], env) is None
    assert forkserver.servable("harness.child.parity_eval", ["--tree", "/t", "--backend", "pt-expt"], env) == "/t"
    assert forkserver.servable("harness.child.parity_eval", ["--tree", "/t", "--backend", "jax"], env) is None
    # the key: the environment deepmd and torch read at import, not the harness's own variables
    assert forkserver.server_key("/t", {"DPH_RUN_DIR": "a", "PYTEST_CURRENT_TEST": "x", "DEVICE": "cpu"}) == \
        forkserver.server_key("/t", {"DPH_RUN_DIR": "b", "DEVICE": "cpu"})
    assert forkserver.server_key("/t", {"DEVICE": "cpu"}) != forkserver.server_key("/t", {"DEVICE": "cuda"})
    assert forkserver.server_key("/t", {"OMP_NUM_THREADS": "1"}) != forkserver.server_key("/t", {"OMP_NUM_THREADS": "2"})
    assert forkserver.server_key("/t", {}) != forkserver.server_key("/u", {})


def test_a_server_that_cannot_start_leaves_the_child_to_run_itself(tiny_system, tmp_path) -> None:
    """A tree without upstream in it: the server says why and exits; the proxy runs the child
    itself, which fails as a plain one would (no deepmd), and says the server was not used."""
    empty = tmp_path / "empty-tree"
    empty.mkdir()
    wd = tmp_path / "run"
    p = _start(empty, tiny_system, wd, 2, tmp_path)
    rc = p.wait(timeout=300)
    log = (wd / "train.log").read_text()
    assert rc != 0 and "dpharness fork server: not used (the server exited 3" in log, log[-2000:]
    assert "ModuleNotFoundError" in log


def test_a_server_that_closes_as_the_proxy_comes_leaves_the_child_to_run_itself(tiny_system, tmp_path) -> None:
    """A server at its idle timeout can accept a connection and close it without forking: the
    proxy, which started nothing, runs the child itself (here: no upstream in the tree, so it fails
    as a plain child would) instead of failing the run."""
    import socket
    import threading

    empty = tmp_path / "empty-tree"
    empty.mkdir()
    wd = tmp_path / "run"
    env = train.subprocess_env("cpu", {}, wd)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / f"{forkserver.server_key(str(empty), env)}.sock"))
    listener.listen(1)

    def close_at_once():
        conn, _ = listener.accept()
        conn.close()

    t = threading.Thread(target=close_at_once, daemon=True)
    t.start()
    p = _start(empty, tiny_system, wd, 2, tmp_path)
    rc = p.wait(timeout=300)
    t.join(timeout=10)
    listener.close()
    log = (wd / "train.log").read_text()
    # the send or the first read fails, which of the two depends on timing
    assert rc != 0 and "dpharness fork server: not used (" in log, log[-2000:]
    assert "starting the child directly" in log
    assert "ModuleNotFoundError" in log
