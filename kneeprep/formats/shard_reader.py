"""Reading shards: the manifest, one row group with its volumes decoded once, every row in order.

Needs pyarrow and numpy only (numcodecs for Blosc volumes); the loader (:mod:`kneeprep.loader`) builds on it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep.errors import InputNotFoundError, StoreError, ValidationError
from kneeprep.formats.raw_pages import MappedFile, image_extents
from kneeprep.formats.shard_schema import (
    MANIFEST,
    QUINTUPLE_COLUMNS,
    READABLE_VERSIONS,
    SCHEMA,
    SCHEMA_VERSION,
    decode_image,
)
from kneeprep.formats.urls import as_local_or_url, is_url, join, url_filesystem


def read_manifest(
    shards_dir: str | os.PathLike, storage_options: dict[str, Any] | None = None, *, fs=None
) -> dict[str, Any]:
    """The shards directory's manifest. ``shards_dir`` is a local path, a ``file://`` URL or any fsspec URL
    (``s3://bucket/prefix``; :mod:`kneeprep.formats.urls`, ``storage_options`` for its filesystem); with
    ``fs`` (an fsspec filesystem) it is a path inside that filesystem."""
    if fs is None and not is_url(shards_dir):
        p = Path(as_local_or_url(shards_dir)) / MANIFEST
        if not p.is_file():
            raise InputNotFoundError(
                f"{p}: no manifest (not a shards directory, or its writing did not finish)"
            )
        text = p.read_text(encoding="utf-8")
    else:
        root = str(shards_dir).rstrip("/")
        if fs is None:
            fs, root = url_filesystem(root, storage_options)
        p = join(str(shards_dir), MANIFEST)
        try:
            with fs.open(join(root, MANIFEST), "rb") as fh:
                text = fh.read().decode("utf-8")
        except FileNotFoundError:
            raise InputNotFoundError(
                f"{p}: no manifest (not a shards directory, or its writing did not finish)"
            ) from None
        except Exception as e:  # botocore/aiohttp errors are not all OSErrors
            raise StoreError(f"{p}: could not read: {e}") from e
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValidationError(f"{p}: not valid JSON: {e}") from e
    if m.get("schema_version") not in READABLE_VERSIONS:
        raise ValidationError(
            f"{p}: schema version {m.get('schema_version')!r}, this kneeprep reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}: re-run `kneeprep shards` to rewrite the shards"
        )
    return m


def is_legacy(manifest: dict[str, Any]) -> bool:
    """True for a manifest of the layout before schema version 3 (``<split>/part-NNNNN.parquet``, no volumes
    table): the loader still reads it (same rows, paths from the manifest); ``kneeprep shards`` rewrites it."""
    return manifest.get("schema_version") != SCHEMA_VERSION


#: ``alloc(volume_id, shape, dtype)`` -> a writable C-contiguous array to decode that volume into
VolumeAllocator = Callable[[str, tuple, np.dtype], np.ndarray]


#: ``view(volume_id, mapped, offset, shape, dtype)`` -> the array of a raw volume that lies in a mapped file
VolumeViewer = Callable[[str, MappedFile, int, tuple, np.dtype], np.ndarray]


def read_row_group(
    path: str | os.PathLike | pq.ParquetFile,
    index: int,
    columns=None,
    alloc: VolumeAllocator | None = None,
    mapped: MappedFile | None = None,
    view: VolumeViewer | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rows of one row group as dicts (without ``image``) and its volumes decoded once: ``{volume_id: array}``.

    ``columns`` limits the row columns (``volume_id`` is always read); images are read only when ``columns``
    is None or names ``image``. ``alloc`` gives the array each volume is decoded into (a shared-memory slab:
    :mod:`kneeprep.loader.slabs`); without it raw volumes are views of the Parquet buffers and Blosc ones new arrays.
    ``mapped``: the same file memory-mapped (:class:`~kneeprep.formats.raw_pages.MappedFile`); where its image
    chunk is stored uncompressed, images are then taken from the mapping instead of through Arrow: a raw volume
    is ``view(...)`` of it (default: a read-only zero-copy view; ``alloc``, if given, gets a copy), a Blosc one
    decodes from it. Volumes are read-only arrays in every case.
    """
    pf = path if isinstance(path, pq.ParquetFile) else pq.ParquetFile(path)
    want_image = columns is None or "image" in columns
    row_cols = list(
        dict.fromkeys(
            ["volume_id", *[c for c in (SCHEMA.names if columns is None else columns) if c != "image"]]
        )
    )
    extents = image_extents(mapped.map, pf.metadata, index) if want_image and mapped is not None else None
    extra = ["image_dtype", "image_shape", "image_codec"] if want_image else []
    if want_image and extents is None:
        extra.append("image")
    t = pf.read_row_group(index, columns=list(dict.fromkeys(row_cols + extra)))
    volumes: dict[str, np.ndarray] = {}
    if want_image:
        vids = t.column("volume_id").to_pylist()
        dts = t.column("image_dtype").to_pylist()
        shapes = t.column("image_shape").to_pylist()
        codecs = t.column("image_codec").to_pylist()
        if extents is None:
            images: list = _binary_values(t.column("image"))
        else:  # (offset, nbytes) in the mapping
            images = [extents.get(i) for i in range(len(vids))]
        for i, img in enumerate(images):
            if img is None:
                continue
            vid, shape, dt = vids[i], tuple(shapes[i]), np.dtype(dts[i])
            if isinstance(img, tuple):
                offset, nbytes = img
                if codecs[i] == "raw":
                    volumes[vid] = _mapped_raw(vid, mapped, offset, nbytes, shape, dt, alloc, view)
                    continue
                img = np.frombuffer(mapped.map, np.uint8, count=nbytes, offset=offset)
            out = None if alloc is None else alloc(vid, shape, dt)
            volumes[vid] = decode_image(img, dts[i], shapes[i], codecs[i], out=out)
    rows = t.select(row_cols).to_pylist()
    return rows, volumes


def _mapped_raw(vid, mapped, offset, nbytes, shape, dt, alloc, view) -> np.ndarray:
    need = math.prod(shape) * dt.itemsize
    if nbytes != need:
        raise ValidationError(
            f"{mapped.path}: {nbytes} image bytes, shape {list(shape)} x {dt.str} needs {need}"
        )
    if view is not None:
        return view(vid, mapped, offset, shape, dt)
    a = np.frombuffer(mapped.map, dt, count=math.prod(shape), offset=offset).reshape(shape)  # read-only map
    if alloc is not None:
        out = alloc(vid, shape, dt)
        if out.shape != shape or out.dtype != dt or not out.flags.c_contiguous:
            raise ValueError(f"out is {out.shape} {out.dtype}, the volume {shape} {dt}")
        np.copyto(out, a)
        out.flags.writeable = False  # shared by the samples of one volume (as decode_image's arrays)
        a = out
    return a


def _binary_values(col: pa.ChunkedArray) -> list[pa.Buffer | None]:
    """The values of a (large_)binary column as zero-copy buffer slices (``col[i]`` would copy each value)."""
    out: list[pa.Buffer | None] = []
    for chunk in col.chunks:
        validity, offsets, data = chunk.buffers()
        n, o = len(chunk), chunk.offset
        offs = np.frombuffer(offsets, np.int64 if pa.types.is_large_binary(chunk.type) else np.int32)[
            o : o + n + 1
        ]
        valid = (
            np.ones(n, bool)
            if validity is None or chunk.null_count == 0
            else np.unpackbits(np.frombuffer(validity, np.uint8), bitorder="little")[o : o + n].astype(bool)
        )
        for i in range(n):
            out.append(data.slice(int(offs[i]), int(offs[i + 1] - offs[i])) if valid[i] else None)
    return out


def iter_quintuples(
    shards_dir: str | os.PathLike, split: str | None = None, columns=None
) -> Iterator[dict[str, Any]]:
    """Every row of the shards as a dict, in manifest order (split, then shard, then row).

    ``columns`` defaults to the quintuple columns (no volume); include ``"image"`` to get the decoded volume
    (a read-only numpy array shared by the rows of the same volume) under ``image``.
    """
    m = read_manifest(shards_dir)
    cols = list(columns) if columns is not None else list(QUINTUPLE_COLUMNS)
    for e in m["shards"]:
        if split is not None and e["split"] != split:
            continue
        pf = pq.ParquetFile(Path(shards_dir) / e["path"], memory_map=True)
        for g in range(pf.num_row_groups):
            rows, volumes = read_row_group(pf, g, columns=cols)
            for r in rows:
                if "image" in cols:
                    r["image"] = volumes[r["volume_id"]]
                yield {k: r[k] for k in cols}
