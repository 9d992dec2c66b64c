"""The one atomic write and the one sha256 of the project.

A result file is either the old one or the complete new one: readers (the report, a second sweep,
an NFS client) never see half a JSON. The temporary name carries the pid and a random token so
threads and processes writing the same target do not collide."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path | str, fill: Callable[[Path], None]) -> Path:
    """`fill(tmp)` writes the content to a temporary file beside `path`; it then replaces `path`
    in one rename (after an fsync), or is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path | str, data: Any, indent: int | None = 1) -> Path:
    def fill(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")

    return atomic_write(path, fill)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (wheels are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
