"""Processes found by working directory (Linux /proc): how the tests that stop, kill or hand over
children see which of them are still alive, without knowing their pids (a proxy's fork, a
side-by-side pool's seeds, data-loader workers)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def pids_under(root: Path, *, exact: bool = False) -> list[int]:
    """Pids of live processes whose working directory is `root` or (unless `exact`) below it."""
    root = Path(os.path.realpath(root))
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(d / "cwd"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if cwd == root or (not exact and root in cwd.parents):
            found.append(int(d.name))
    return found


def gone_within(root: Path, seconds: float, *, exact: bool = False) -> bool:
    """True once no process works in (or under) `root`; False if some still do after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and pids_under(root, exact=exact):
        time.sleep(0.05)
    return not pids_under(root, exact=exact)


def kill_under(root: Path, *, exact: bool = False) -> None:
    """SIGKILL every process working in (or under) `root`: a test's cleanup, so nothing outlives it."""
    for pid in pids_under(root, exact=exact):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
