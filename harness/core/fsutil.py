"""The one atomic write, the one sha256 and the one reader of a folder of schema records of the project.

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


def json_records(directory: Path | str, schema: str, warn: Callable[[str], None] = lambda m: None) -> list[dict]:
    """The JSON records of `schema` directly under `directory` (its *.json, by name); a file that
    is not one -- unreadable, not JSON, another schema -- is skipped with a warning naming it."""
    out = []
    for p in sorted(Path(directory).glob("*.json")) if Path(directory).is_dir() else []:
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            warn(f"{p}: not readable JSON ({e}); skipped")
            continue
        if not isinstance(rec, dict) or rec.get("schema") != schema:
            warn(f"{p}: not a {schema} record; skipped")
            continue
        out.append(rec)
    return out
