"""A sweep's cells and its state file: cell identity (content hashes), and the locked, atomic
read-modify-write of ``<results-dir>/sweeps/<name>.json`` that the sweep (harness/cli/sweep.py)
and its jobs share.

Every read-modify-write holds an ``fcntl.flock`` on ``<name>.json.lock`` and the file is replaced
atomically (temp, fsync, rename): two sweeps (or the jobs of one) updating the same results
directory never lose each other's updates."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.core import fsutil
from harness.core.errors import UserError

STATE_SCHEMA = "dpharness.sweep/1"
FINAL_SKIP = {"ok"}  # statuses a rerun does not redo


# ---------------------------------------------------------------- identity

def system_content_hash(directory: Path, paths: list[Path] | None = None) -> str:
    """sha256 over every file of a system: system.yaml, input.json and the data directories
    (relative names and contents, sorted)."""
    directory = Path(directory).resolve()
    h = hashlib.sha256()
    roots = [directory / "system.yaml", directory / "input.json", *(paths or [directory / "data"])]
    files: list[Path] = []
    for r in roots:
        r = Path(r)
        if r.is_file():
            files.append(r)
        elif r.is_dir():
            files.extend(p for p in r.rglob("*") if p.is_file())
    for f in sorted(set(files)):
        try:
            rel = str(f.resolve().relative_to(directory))
        except ValueError:
            rel = str(f.resolve())
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def cell_key(system_hash: str, variant_hash: str, steps: int, gpus: int, seed: int, device: str) -> str:
    """The cell's identity: a rerun with the same key is the same measurement."""
    blob = json.dumps({"system": system_hash, "variant": variant_hash, "steps": int(steps), "gpus": int(gpus),
                       "seed": int(seed), "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Cell:
    key: str
    system: str  # as given (name or path); resolved again in the job
    system_name: str
    variant: str
    gpus: int
    steps: int
    seed: int
    device: str
    sweep_id: str
    run_id: str


# ---------------------------------------------------------------- state file (locked, atomic)

def state_path(results_dir: Path, name: str) -> Path:
    return Path(results_dir) / "sweeps" / f"{name}.json"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive flock on <path>.lock (a separate file: the state file itself is replaced by rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: sweep state is not valid JSON ({e}); move it away to start over") from None
    if not isinstance(d, dict) or d.get("schema") != STATE_SCHEMA:
        raise UserError(f"{path}: not a {STATE_SCHEMA} state file")
    return d


def update_state(path: Path, fn: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
    """Read-modify-write under the lock; the new state is written atomically. Returns it."""
    path = Path(path)
    with locked(path):
        new = fn(read_state(path))
        fsutil.atomic_write_json(path, new)
        return new


def update_cell(path: Path, key: str, **fields: Any) -> dict[str, Any]:
    def fn(st: dict[str, Any] | None) -> dict[str, Any]:
        if st is None:
            raise UserError(f"{path}: sweep state vanished")
        c = st["cells"].setdefault(key, {})
        c.update(fields)
        c["updated"] = now()
        return st

    return update_state(path, fn)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None) -> bool:
    """Only a process on this host can be checked; anything else counts as gone."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def needs_run(entry: dict[str, Any] | None, runs_dir: Path) -> bool:
    """A cell is done when its state is ok and its results JSON is still there; everything else
    (new, failed, unavailable, interrupted, or submitted/running by a process that is gone) reruns."""
    if not entry:
        return True
    if entry.get("status") in FINAL_SKIP:
        return not (Path(runs_dir) / f"{entry.get('run_id')}.json").is_file()
    if entry.get("status") in ("pending", "submitted", "running") and _owner_alive(entry.get("owner")) \
            and entry.get("owner") != this_owner():
        return False  # another live sweep on this host is running it right now
    return True
