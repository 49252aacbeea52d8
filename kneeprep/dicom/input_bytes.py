"""A DICOM file's bytes for decoding, read once and hashed as they are read (the series' content hash)."""

from __future__ import annotations

from pathlib import Path

from kneeprep.errors import InputNotFoundError


def read_input(path: Path, hasher=None) -> bytes:
    """A DICOM file's bytes for decoding; ``hasher`` (a ``hashlib`` object), if given, is fed the file's name,
    a NUL and the bytes (the series' content hash is computed as its files are read, once)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputNotFoundError(f"{path}: cannot read input ({e.strerror or e})") from None
    if hasher is not None:
        hasher.update(path.name.encode() + b"\0")
        hasher.update(data)
    return data
