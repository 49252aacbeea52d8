"""Where the bytes of each image lie in an uncompressed shard file, so readers can use them in place.

Reading a row group with Arrow copies each image value out of the file into an Arrow buffer (and the loader
then copied it again into the shared memory that carries it to the training process). A column chunk that
Parquet stores ``UNCOMPRESSED`` (the ``none`` and ``blosc-*`` layouts: docs/SHARDS.md, "Compression") holds the
value bytes verbatim, so with the file memory-mapped (:class:`MappedFile`) a raw volume *is* a slice of the
mapping -- the page cache is the shared memory, and a loader worker sends the training process only where
the volume lies (:mod:`kneeprep.loader.slabs`) -- and a Blosc frame decodes straight from the mapping.

:func:`image_extents` finds the bytes from the file itself, not from an assumption about the writer: it walks
the chunk's page headers (Thrift compact protocol, the ``PageHeader`` struct of ``parquet.thrift``), decodes
each data page's definition levels (v1: after their 4-byte length; v2: the byte lengths its header gives) to
know which rows hold a value, and walks the ``PLAIN`` values (a 4-byte little-endian length, then the bytes) to
the end of the page. Anything it does not expect -- a dictionary page, a compressed chunk, another encoding,
a value that does not end exactly at its page's end -- gives ``None``, and the caller reads through Arrow as
before. Tested against Arrow's reading of every page layout Arrow writes (``tests/test_raw_pages.py``).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pyarrow.parquet as pq

# PageHeader.type (parquet.thrift PageType)
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN = 0
#: bytes read for a page header: kneeprep's are a few dozen bytes (no statistics for the image); headers with
#: statistics (min / max values) are read again with more
_HEADER_PEEKS = (256, 1 << 16, 1 << 22)


class _Unexpected(Exception):
    """The bytes are not laid out the way :func:`image_extents` reads them (the caller falls back)."""


class _Short(_Unexpected):
    """The header goes on past the bytes read."""


class _Compact:
    """Just enough of Thrift's compact protocol to read a ``PageHeader`` and skip what it does not need."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise _Short("header longer than read")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self) -> dict[int, object]:
        """A struct's integer fields by id (nested structs as dicts; other values skipped)."""
        fields: dict[int, object] = {}
        fid = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            delta, ftype = head >> 4, head & 0x0F
            fid = fid + delta if delta else self.zigzag()
            fields[fid] = self.value(ftype)

    def value(self, ftype: int) -> object:
        if ftype in (1, 2):  # bool true / false, in the field header
            return ftype == 1
        if ftype == 3:
            return self.byte()
        if ftype in (4, 5, 6):  # i16 / i32 / i64
            return self.zigzag()
        if ftype == 7:  # double
            self.pos += 8
            return None
        if ftype == 8:  # binary
            n = (
                self.varint()
            )  # (not ``self.pos += self.varint()``: that adds to the position before the varint)
            self.pos += n
            return None
        if ftype in (9, 10):  # list / set
            head = self.byte()
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            for _ in range(size):
                self.byte() if etype in (1, 2) else self.value(etype)
            return None
        if ftype == 11:  # map
            size = self.varint()
            if size:
                kv = self.byte()
                for _ in range(size):
                    self.value(kv >> 4)
                    self.value(kv & 0x0F)
            return None
        if ftype == 12:
            return self.struct()
        raise _Unexpected(f"thrift type {ftype}")


def _page_header(buf, pos: int, end: int) -> tuple[dict[int, object], _Compact]:
    for peek in _HEADER_PEEKS:
        reader = _Compact(_read(buf, min(peek, end - pos), pos))
        try:
            return reader.struct(), reader
        except _Short:
            if peek >= end - pos:
                break
    raise _Unexpected("no page header")


def _read(buf, n: int, offset: int) -> bytes:
    data = buf[offset : offset + n]
    if len(data) < n:
        raise _Unexpected("file ends early")
    return data


def _levels(buf: bytes, bit_width: int, count: int) -> list[int]:
    """``count`` levels from Parquet's RLE / bit-packed hybrid encoding."""
    r = _Compact(buf)
    out: list[int] = []
    width = (bit_width + 7) // 8
    mask = (1 << bit_width) - 1
    while len(out) < count:
        head = r.varint()
        if head & 1:  # bit-packed: (head >> 1) groups of 8 values
            n = (head >> 1) * 8
            bits = int.from_bytes(bytes(r.byte() for _ in range((head >> 1) * bit_width)), "little")
            out.extend((bits >> (i * bit_width)) & mask for i in range(n))
        else:  # a run of one value
            value = int.from_bytes(bytes(r.byte() for _ in range(width)), "little")
            out.extend([value] * (head >> 1))
    return out[:count]


def image_extents(buf, metadata: pq.FileMetaData, row_group: int, column: str = "image"):
    """``{row: (offset, nbytes)}``: the file extent of each non-null value of ``column`` in ``row_group`` (rows
    numbered within the row group) -- or ``None`` when the chunk is not stored in a way this reads (then use
    Arrow). ``buf``: the file's bytes (an ``mmap`` of it: only the headers are read here)."""
    rg = metadata.row_group(row_group)
    names = [rg.column(i).path_in_schema for i in range(rg.num_columns)]
    if column not in names:
        return None
    chunk = rg.column(names.index(column))
    desc = metadata.schema.column(names.index(column))
    if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page or desc.max_repetition_level:
        return None
    max_def = desc.max_definition_level
    if max_def > 1:
        return None
    start = chunk.data_page_offset
    end = start + chunk.total_compressed_size
    extents: dict[int, tuple[int, int]] = {}
    row = 0
    try:
        pos = start
        while pos < end:
            header, reader = _page_header(buf, pos, end)
            data_start = pos + reader.pos
            size = header.get(3)
            if not isinstance(size, int) or size < 0 or header.get(2) != size:
                return None  # compressed_page_size == uncompressed_page_size for an UNCOMPRESSED page
            page_end = data_start + size
            kind, dph = header.get(1), header.get(5 if header.get(1) == _DATA_PAGE else 8)
            if kind not in (_DATA_PAGE, _DATA_PAGE_V2) or not isinstance(dph, dict):
                return None  # a dictionary or index page: not ours to read
            if dph.get(2 if kind == _DATA_PAGE else 4) != _PLAIN:
                return None
            n_values = dph.get(1, 0)
            if kind == _DATA_PAGE:  # definition levels: RLE, after their 4-byte length
                n_levels = struct.unpack("<I", _read(buf, 4, data_start))[0] if max_def else 0
                levels_at, v = data_start + 4, data_start + (4 + n_levels if max_def else 0)
            else:  # v2: repetition levels (none: a flat column), then definition levels, lengths in the header
                if dph.get(6, 0):
                    return None
                n_levels = dph.get(5, 0)
                levels_at, v = data_start, data_start + n_levels
            defined = _levels(_read(buf, n_levels, levels_at), 1, n_values) if max_def else [1] * n_values
            for i, d in enumerate(defined):
                if d:
                    (n,) = struct.unpack("<I", _read(buf, 4, v))
                    extents[row + i] = (v + 4, n)
                    v += 4 + n
            if v != page_end:
                return None
            row += n_values
            pos = page_end
    except _Unexpected:
        return None
    if pos != end or row != rg.num_rows:
        return None
    return extents


class MappedFile:
    """A shard file open and memory-mapped read-only; ``key`` = (device, inode) names this very file (a file
    published later under the same path is another one)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            self.key = (st.st_dev, st.st_ino)
            self.size = st.st_size
            self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # arrays still view it: the mapping goes with the last of them
            pass
