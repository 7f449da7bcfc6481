"""fileio: atomic writes (permissions, no half-written file, no silent overwrite), file hashes, JSON-safe values."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from mammo.core.fileio import (TEMPORARY_PREFIX, atomic_write_bytes, atomic_write_text, atomic_writer, file_sha256,
                               json_safe)


def test_atomic_write_gives_normal_permissions_and_leaves_no_temporary(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "report.json", "{}")
    finally:
        os.umask(umask)
    assert path.read_text() == "{}"
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_refuses_overwrite_when_asked(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(path) as stream:
            stream.write(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert not any(p.name.startswith(TEMPORARY_PREFIX) for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="a.bin"):
        atomic_write_bytes(path, b"new", overwrite=False)
    assert path.read_bytes() == b"old"


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk_bytes=1000) == hashlib.sha256(data).hexdigest()


def test_file_sha256_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100)
    old = 1_600_000_000
    os.utime(path, (old, old))  # settled long ago: remembered
    first = file_sha256(path)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: reads.append(a[0]) or real_open(*a, **k))
    assert file_sha256(path) == first and reads == []  # not read again
    path.write_bytes(b"b" * 100)  # same size, same inode, rewritten just now
    assert file_sha256(path) == hashlib.sha256(b"b" * 100).hexdigest() and reads


def test_json_safe_makes_strict_json():
    value = {1: (np.float32(0.5), float("nan"), float("inf"), np.int64(3), np.bool_(True)), "x": [np.array(2.0)]}
    safe = json_safe(value)
    assert safe == {"1": [0.5, None, None, 3, True], "x": [2.0]}
    json.dumps(safe, allow_nan=False)  # raises if anything non-standard were left
