"""kneeprep.files: the one atomic write, the hasher and the lock."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from kneeprep import files
from kneeprep.errors import StoreError


def test_atomic_write_lands_complete_and_leaves_no_temporary_file(tmp_path):
    p = files.write_json(tmp_path / "a" / "report.json", {"b": 1, "a": [1, 2]})
    assert p.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(x.name for x in p.parent.iterdir()) == ["report.json"]


def test_disk_full_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch):
    target = files.write_text(tmp_path / "manifest.json", "old\n")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match=r"manifest\.json: could not write: No space left on device"):
        files.write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_an_error_inside_the_block_removes_the_temporary_file(tmp_path, exc):
    with pytest.raises(exc), files.atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name.endswith(".partial.nii.gz") and tmp.name.startswith(".x.nii.gz.")
        tmp.write_bytes(b"half")
        raise exc()
    assert list(tmp_path.iterdir()) == []


def test_remove_partials_takes_only_temporary_files(tmp_path):
    (tmp_path / "d").mkdir()
    keep = [tmp_path / "report.json", tmp_path / "d" / "part-00000.parquet"]
    junk = [tmp_path / ".report.json.1a2b3c4d.partial.json", tmp_path / "d" / "part-00001.parquet.partial"]
    for p in keep + junk:
        p.write_bytes(b"x")
    assert files.remove_partials(tmp_path, "*") == [junk[0]]
    assert files.remove_partials(tmp_path, "*/*") == [junk[1]]
    assert all(p.exists() for p in keep)


def test_sha256_file(tmp_path):
    p = tmp_path / "b"
    p.write_bytes(os.urandom(5 << 20))  # more than one 4 MiB block
    assert files.sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_lock_refuses_a_second_writer_and_is_released(tmp_path):
    with files.lock(tmp_path, what="shards directory"):
        with pytest.raises(StoreError, match="another kneeprep run is writing to this shards directory"):
            with files.lock(tmp_path, what="shards directory"):
                pass
    with files.lock(tmp_path):
        pass
