"""Files on a local disk, written the one way kneeprep writes them: atomic, hashed, locked.

- :func:`atomic_path` / :func:`write_bytes` / :func:`write_text` / :func:`write_json` (and, for a writer that
  spans several calls, :func:`temp_path` + :func:`publish`): a file appears under its
  final name complete or not at all. The bytes go to a temporary name unique to this writer, in the same
  folder (``.<name>.<random>.partial``), are flushed to disk (``fsync``) and renamed over the final name; on any
  error, Ctrl-C included, the temporary file is removed and the error names the final file. A killed process
  can leave a ``*.partial`` behind: :func:`remove_partials` clears a folder of them (a stage does so under its
  lock, when no other writer can be active).
- :func:`sha256_file`: the hex SHA-256 of a file, read in 4 MiB blocks.
- :func:`lock`: an exclusive ``flock`` on an output folder for a whole run; a second run fails fast with a
  ``StoreError`` naming the folder.

Errors from the operating system (ENOSPC, EACCES, EIO, ...) come out as ``StoreError`` with the file's name and
the reason, which the CLI prints as one line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kneeprep.errors import StoreError

PARTIAL = ".partial"
LOCK_FILE = ".kneeprep-lock"


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name for ``path``, unique to this writer, in the same folder (hidden, so readers listing the
    folder skip it; the final suffix kept, so writers that go by the extension still work), the folder made."""
    final = Path(path)
    suffix = "".join(final.suffixes[-2:]) if final.name.endswith(".nii.gz") else final.suffix
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{final}: could not write: {e.strerror or e}") from e
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{PARTIAL}{suffix}")


def publish(tmp: Path, path: str | os.PathLike, *, fsync: bool = True) -> None:
    """Move the finished temporary file ``tmp`` over ``path`` (after an ``fsync`` unless ``fsync=False``);
    ``OSError`` becomes ``StoreError`` naming ``path`` and ``tmp`` is removed."""
    try:
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"{path}: could not write: {e.strerror or e}") from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (:func:`temp_path`); when the block ends normally, move it to
    ``path`` (:func:`publish`).

    Write the file (by any means: pyarrow, SimpleITK, ``open``) to the yielded path. It is fsynced and renamed
    over ``path`` (``fsync=False`` for scratch files where a power loss may lose them); on an error it is
    removed. ``OSError`` becomes ``StoreError`` naming ``path``.
    """
    tmp = temp_path(path)
    try:
        yield tmp
    except BaseException as e:  # Ctrl-C included: nothing half-written stays behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, StoreError):
            raise StoreError(f"{path}: could not write: {e.strerror or e}") from e
        raise
    publish(tmp, path, fsync=fsync)


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True, default=None) -> Path:
    """Write ``obj`` as indented JSON (a trailing newline) to ``path`` atomically; returns the path."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=default) + "\n"
    return write_text(path, text)


def remove_partials(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Remove temporary files of :func:`atomic_path` (and the older fixed ``<name>.partial`` names) matching
    ``pattern`` under ``folder`` (a glob relative to it, e.g. ``"*/*"``); returns what was removed."""
    found = sorted(p for p in Path(folder).glob(pattern) if PARTIAL in p.name and p.is_file())
    for p in found:
        p.unlink(missing_ok=True)
    return found


def sha256_file(path: str | os.PathLike, h=None) -> str:
    """Hex SHA-256 of a file's bytes (or feed them into ``h``, any hashlib object, and return its hex digest)."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def lock(folder: str | os.PathLike, what: str = "store", name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder (the store, a shards directory, an export: ``what``) for a
    whole run; a second run writing the same folder fails fast with a ``StoreError`` naming it. The lock is the
    kernel's (``flock``): it goes away with the process, whatever way the process ends."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    fh = open(p / name, "a+")  # noqa: SIM115 - held for the whole context
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{p}: another kneeprep run is writing to this {what} ({name} is locked)"
            ) from None
        yield p
    finally:
        fh.close()
