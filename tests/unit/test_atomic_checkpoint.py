"""The training child's checkpoint writes (harness/child/launch.py atomic_saver, hooked around
upstream's Trainer._write_checkpoint): a full disk mid-write leaves the previous checkpoint as it
was and no half file under the final name or beside it."""
from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from harness.child.launch import atomic_saver


def _save(obj: bytes, f) -> None:
    Path(f).write_bytes(obj) if not hasattr(f, "write") else f.write(obj)


def test_a_full_disk_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt-10.pt"
    save = atomic_saver(_save)
    save(b"step 10 weights", ckpt)
    assert ckpt.read_bytes() == b"step 10 weights"

    def disk_full(obj, f):
        Path(f).write_bytes(obj[:4])  # part of it reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_saver(disk_full)(b"step 20 weights", ckpt)
    assert ckpt.read_bytes() == b"step 10 weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt-10.pt"]  # no partial file left
    save(b"step 20 weights", ckpt)  # a later write that fits replaces it whole
    assert ckpt.read_bytes() == b"step 20 weights"


def test_file_objects_pass_through(tmp_path: Path) -> None:
    buf = io.BytesIO()
    atomic_saver(_save)(b"abc", buf)
    assert buf.getvalue() == b"abc"
