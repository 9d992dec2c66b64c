"""The one atomic write: all or nothing, and no temporary file left behind on failure."""
from __future__ import annotations

import hashlib
import json

import pytest

from harness.core import fsutil


def test_atomic_write_json_replaces_the_whole_file(tmp_path):
    p = tmp_path / "a" / "r.json"
    fsutil.atomic_write_json(p, {"x": 1})
    fsutil.atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "r.json"
    fsutil.atomic_write_json(p, {"x": 1})

    def fail(tmp):
        tmp.write_text('{"x": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fsutil.atomic_write(p, fail)
    assert json.loads(p.read_text()) == {"x": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "b"
    p.write_bytes(b"x" * (3 << 20))
    assert fsutil.sha256_file(p) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
