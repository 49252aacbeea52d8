"""Parquet shards of quintuples: the Arrow schema, writing, the manifest, reading and validation.

Layout (``docs/SHARDS.md`` is the user-facing description)::

    SHARDS/
      train/part-00000.parquet ...     rows = quintuples of one split, sorted by (volume id, question id)
      val/…  test/…
      manifest.json                    written last: schema version, recipe hash, per shard path/rows/sha256
      report.json                      the last `kneeprep shards` run's summary and rejections

**Each volume's voxels are stored once per shard.** Rows are sorted by volume; the volume's bytes sit in the
``image`` column of its *first* row only (null on its other rows, which Parquet stores in a few bits), and a
row group holds whole volumes only -- so reading one row group decodes each of its volumes exactly once, and a
shard is self-contained. Decode a volume with nothing but pyarrow, numpy (and numcodecs for Blosc)::

    if row["image_codec"] == "raw":      # codec "none", "lz4", "zstd": Parquet (de)compresses the page
        buf = row["image"]
    elif row["image_codec"] == "blosc":  # codec "blosc-lz4", "blosc-zstd": one Blosc frame, compressed by kneeprep
        buf = numcodecs.Blosc().decode(row["image"])
    np.frombuffer(buf, dtype=row["image_dtype"]).reshape(row["image_shape"])   # C order, (z, y, x)

Determinism: same quintuples, volumes and recipe give byte-identical files (stable sort orders, no
timestamps, fixed writer options). Writes are atomic (``.partial`` then rename); the manifest comes last, so
a directory without ``manifest.json`` is not a complete set of shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputNotFoundError, StoreError, ValidationError
from .quintuples import QBox, Quintuple
from .severity import Grade
from .splits import SPLITS

#: Version of the shard schema and layout; bump on any change a reader could notice.
SCHEMA_VERSION = 2  # 2: the image_codec column (Blosc-compressed volumes)
#: A row group holds whole volumes up to this many uncompressed image bytes (at least one volume). A full DESS
#: volume (160x384x384 uint16, 45 MiB) gets a row group of its own: reading is as fast as with bigger groups
#: (the cost is decoding the voxel bytes; bench/bench_loader.py), and the loader's unit of shuffling and of
#: memory stays one volume. Small fixed-shape volumes (32x256x256 float32, 8 MiB) go 8 to a group.
ROW_GROUP_IMAGE_BYTES = 64 * 1024 * 1024
MANIFEST = "manifest.json"
REPORT = "report.json"

_GRADE = pa.struct(
    [
        pa.field("finding", pa.string()),
        pa.field("region", pa.string()),
        pa.field("component", pa.string()),
        pa.field("grade", pa.int16()),
    ]
)

#: The Arrow schema of every shard. Every batch is cast to it before writing.
SCHEMA = pa.schema(
    [
        # ids
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("volume_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        # question
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("question_type", pa.string(), nullable=False),
        pa.field("question_region", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        # box (null when box_empty; box_reason says why)
        pa.field("box_region", pa.string()),
        pa.field("box_voxels", pa.list_(pa.int32(), 6)),
        pa.field("box_list_form", pa.list_(pa.int32(), 6)),
        pa.field("box_normalized", pa.list_(pa.float64(), 6)),
        pa.field("box_size_mm", pa.list_(pa.float64(), 3)),
        pa.field("box_center_lps", pa.list_(pa.float64(), 3)),
        pa.field("box_empty", pa.bool_(), nullable=False),
        pa.field("box_reason", pa.string()),
        # reasoning and severity
        pa.field("reasoning", pa.list_(pa.string()), nullable=False),
        pa.field("severity", pa.list_(_GRADE), nullable=False),
        pa.field("answer_json", pa.string(), nullable=False),
        # the volume: bytes on the volume's first row in the shard only
        pa.field("image", pa.large_binary()),
        pa.field("image_shape", pa.list_(pa.int32(), 3), nullable=False),
        pa.field("image_dtype", pa.string(), nullable=False),
        pa.field("image_codec", pa.string(), nullable=False),
        pa.field("image_spacing", pa.list_(pa.float64(), 3), nullable=False),
        pa.field("image_affine_lps", pa.list_(pa.float64(), 16), nullable=False),
    ],
    metadata={
        "kneeprep.schema_version": str(SCHEMA_VERSION),
        "kneeprep.layout": "rows sorted by volume; image bytes on each volume's first row; whole volumes per row group",
        "kneeprep.image_decoding": (
            "image_codec 'raw': np.frombuffer(image, image_dtype).reshape(image_shape), C order (z, y, x); "
            "'blosc': the same on numcodecs.Blosc().decode(image)"
        ),
    },
)
IMAGE_COLUMNS = ("image", "image_shape", "image_dtype", "image_codec", "image_spacing", "image_affine_lps")
QUINTUPLE_COLUMNS = tuple(n for n in SCHEMA.names if n not in IMAGE_COLUMNS)
#: recipe ``shards.codec`` -> Parquet compression of the ``image`` column (Blosc codecs compress the bytes first).
_CODECS = {"none": "NONE", "lz4": "LZ4", "zstd": "ZSTD", "blosc-lz4": "NONE", "blosc-zstd": "NONE"}
#: ``image_codec`` values: "raw" = the C-order voxel bytes; "blosc" = one Blosc (c-blosc 1.x) frame of them.
IMAGE_CODECS = ("raw", "blosc")
#: recipe codec -> (Blosc compressor, block size in bytes). Always bit-shuffle with typesize = itemsize, level =
#: recipe ``level``. zstd needs big blocks to decode fast (1 MiB: 4x faster than Blosc's automatic 64-256 KiB,
#: and 5 % smaller); lz4 is fastest at 256 KiB (Blosc's own choice at level 5). Fixed here so the bytes do not
#: depend on Blosc's heuristics (bench/bench_loader.py, docs/SHARDS.md "Compression").
_BLOSC = {"blosc-lz4": ("lz4", 256 * 1024), "blosc-zstd": ("zstd", 1024 * 1024)}

#: ``read_volume(volume_id) -> (image, geometry)``; ``geometry`` a ``Geometry`` or its ``to_json()`` dict.
VolumeReader = Callable[[str], tuple[np.ndarray, Any]]


# ----------------------------------------------------------------------------------------------------------
# writing


def write_shards(
    quintuples: Iterable[Quintuple],
    read_volume: VolumeReader,
    out_dir: str | os.PathLike,
    recipe,
    *,
    inputs_hash: str = "",
    row_group_bytes: int = ROW_GROUP_IMAGE_BYTES,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write quintuples (with their volumes) as Parquet shards under ``out_dir`` and return the manifest.

    Quintuples are grouped by split and volume in a stable order (split, volume id, question id, sample id);
    each volume is read once with ``read_volume``. Shards are cut once a file reaches
    ``recipe.shards.target_bytes`` (always after a whole row group); row groups after
    ``min(row_group_bytes, target_bytes)`` uncompressed image bytes (whole volumes, at least one). Old shards not in the new manifest are
    removed after the manifest is written. ``progress(done, total)`` is called after each volume read.
    """
    from . import __version__
    from .quintuples import quintuple_order

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    qs = sorted(quintuples, key=quintuple_order)
    entries: list[dict[str, Any]] = []
    total = len({(q.split, q.volume_id) for q in qs})
    done = [0]

    def volume_done() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    try:
        for split, split_rows in groupby(qs, key=lambda q: q.split):
            if split not in SPLITS:
                raise ValidationError(f"quintuple split {split!r} is not one of {', '.join(SPLITS)}")
            rg_bytes = min(row_group_bytes, recipe.shards.target_bytes)
            entries += _write_split(
                out, split, list(split_rows), read_volume, recipe.shards, rg_bytes, volume_done
            )
    except BaseException:
        _remove_partials(out)  # a failed or interrupted run leaves no half-written shard (and no manifest)
        raise
    manifest = {
        "format": "kneeprep-shards",
        "schema_version": SCHEMA_VERSION,
        "kneeprep_version": __version__,
        "recipe_name": recipe.name,
        "recipe_hash": recipe.stage_hash("shards"),
        "inputs_hash": inputs_hash,
        "codec": recipe.shards.codec,
        "level": recipe.shards.level,
        "splits": {
            s: {
                "rows": sum(e["rows"] for e in entries if e["split"] == s),
                "volumes": sum(e["volumes"] for e in entries if e["split"] == s),
                "shards": sum(1 for e in entries if e["split"] == s),
            }
            for s in SPLITS
        },
        "shards": entries,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    keep = {e["path"] for e in entries}
    for p in sorted(out.glob("*/part-*.parquet")):
        if p.relative_to(out).as_posix() not in keep:
            p.unlink()
    _remove_partials(out)  # left by a run that was killed (SIGKILL, power loss) before it could clean up
    return manifest


def _remove_partials(out: Path) -> None:
    for p in out.glob("*/part-*.parquet.partial"):
        p.unlink(missing_ok=True)


def _write_split(
    out: Path,
    split: str,
    rows: list[Quintuple],
    read_volume: VolumeReader,
    spec,
    row_group_bytes: int,
    volume_done: Callable[[], None] = lambda: None,
) -> list[dict]:
    (out / split).mkdir(exist_ok=True)
    volumes = [(vid, list(g)) for vid, g in groupby(rows, key=lambda q: q.volume_id)]
    entries: list[dict] = []
    writer: _ShardWriter | None = None
    group: list[tuple[list[Quintuple], np.ndarray, dict]] = []
    group_bytes = 0

    def flush():
        nonlocal writer, group, group_bytes
        if not group:
            return
        if writer is None:
            writer = _ShardWriter(out, f"{split}/part-{len(entries):05d}.parquet", split, spec)
        writer.write_group(group)
        group, group_bytes = [], 0
        if writer.tell() >= spec.target_bytes:
            entries.append(writer.close())
            writer = None

    for vid, qs in volumes:
        image, geometry = read_volume(vid)
        geom = geometry.to_json() if hasattr(geometry, "to_json") else dict(geometry)
        if tuple(geom["shape"]) != image.shape:
            raise StoreError(
                f"volume {vid}: image shape {image.shape} differs from its geometry {geom['shape']}"
            )
        if group and group_bytes + image.nbytes > row_group_bytes:
            flush()  # a row group holds whole volumes up to row_group_bytes, at least one
        group.append((qs, image, geom))
        group_bytes += image.nbytes
        volume_done()
    flush()
    if writer is not None:
        entries.append(writer.close())
    return entries


class _ShardWriter:
    """One shard file being written under ``<name>.partial``; ``close`` renames it and returns its entry."""

    def __init__(self, out: Path, rel: str, split: str, spec):
        self.out, self.rel, self.split, self.spec = out, rel, split, spec
        self.final = out / rel
        self.tmp = self.final.with_name(self.final.name + ".partial")
        self.sink = pa.OSFile(str(self.tmp), "wb")
        codec = _CODECS[spec.codec]
        compression = {n: "ZSTD" for n in SCHEMA.names} | {"image": codec}
        levels = {n: 3 for n in SCHEMA.names}
        if codec == "ZSTD":
            levels["image"] = spec.level
        self.writer = pq.ParquetWriter(
            self.sink,
            SCHEMA,
            compression=compression,
            compression_level={n: levels[n] for n in SCHEMA.names if compression[n] == "ZSTD"},
            use_dictionary=[n for n in QUINTUPLE_COLUMNS if n not in ("reasoning", "answer_json", "severity")]
            + ["image_dtype", "image_codec"],
            write_statistics=[n for n in ("sample_id", "volume_id", "patient_id", "split", "question_id")],
            write_page_checksum=True,
            store_schema=True,
        )
        self.rows = self.volumes = 0
        self.row_group_rows: list[int] = []

    def write_group(self, group: list[tuple[list[Quintuple], np.ndarray, dict]]) -> None:
        table = rows_to_table(group, codec=self.spec.codec, level=self.spec.level)
        try:
            self.writer.write_table(table, row_group_size=table.num_rows)
        except (OSError, pa.ArrowException) as e:  # ENOSPC, EFBIG, EIO ...: name the file
            raise StoreError(f"{self.final}: could not write the shard: {e}") from e
        self.rows += table.num_rows
        self.volumes += len(group)
        self.row_group_rows.append(table.num_rows)

    def tell(self) -> int:
        return self.sink.tell()

    def close(self) -> dict[str, Any]:
        try:
            self.writer.close()
            self.sink.close()
            os.replace(self.tmp, self.final)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{self.final}: could not finish the shard: {e}") from e
        return {
            "path": self.rel,
            "split": self.split,
            "rows": self.rows,
            "volumes": self.volumes,
            "row_group_rows": self.row_group_rows,
            "bytes": self.final.stat().st_size,
            "sha256": sha256_file(self.final),
        }


def rows_to_table(
    group: list[tuple[list[Quintuple], np.ndarray, dict]], codec: str = "none", level: int = 3
) -> pa.Table:
    """A row group: each volume's quintuples, with the volume's bytes on its first row, cast to :data:`SCHEMA`.

    ``codec`` is the recipe's ``shards.codec``: Blosc codecs compress the bytes here (:func:`encode_image`),
    the others leave them raw for Parquet to compress.
    """
    cols: dict[str, list] = {n: [] for n in SCHEMA.names}
    for qs, image, geom in group:
        img = np.ascontiguousarray(image)
        if img.dtype.byteorder == ">" or (img.dtype.byteorder == "=" and not np.little_endian):
            img = img.astype(img.dtype.newbyteorder("<"))
        dtype = img.dtype.newbyteorder("<").str if img.dtype.itemsize > 1 else img.dtype.str
        for i, q in enumerate(qs):
            row = quintuple_to_row(q)
            for k, v in row.items():
                cols[k].append(v)
            if i == 0:
                data, image_codec = encode_image(img, codec, level)
            cols["image"].append(data if i == 0 else None)
            cols["image_shape"].append(list(img.shape))
            cols["image_dtype"].append(dtype)
            cols["image_codec"].append(image_codec)
            cols["image_spacing"].append([float(v) for v in geom["spacing"]])
            cols["image_affine_lps"].append([float(v) for row_ in geom["affine_lps"] for v in row_])
    return pa.Table.from_pydict(cols, schema=SCHEMA).cast(SCHEMA)


def encode_image(img: np.ndarray, codec: str, level: int = 3) -> tuple[bytes, str]:
    """The ``image`` bytes and ``image_codec`` of a C-contiguous little-endian volume for recipe ``codec``.

    Blosc codecs: one Blosc frame, bit-shuffled with typesize = itemsize, compressed on one thread (c-blosc's
    threads write blocks in completion order, so multithreaded output is not byte-identical run to run).
    """
    if codec not in _BLOSC:
        return img.tobytes(), "raw"
    from numcodecs import Blosc, blosc

    cname, blocksize = _BLOSC[codec]
    if img.nbytes > 2**31 - 2**10:
        raise ValidationError(
            f"a {img.nbytes}-byte volume is too big for one Blosc frame (2 GiB); use codec zstd"
        )
    previous, blosc.use_threads = blosc.use_threads, False
    try:
        return Blosc(cname, clevel=level, shuffle=Blosc.BITSHUFFLE, blocksize=blocksize).encode(img), "blosc"
    finally:
        blosc.use_threads = previous


def quintuple_to_row(q: Quintuple) -> dict[str, Any]:
    """The quintuple columns of a row (everything but the ``image_*`` columns)."""
    b = q.box
    return {
        "sample_id": q.sample_id,
        "volume_id": q.volume_id,
        "patient_id": q.patient_id,
        "split": q.split,
        "question_id": q.question_id,
        "question_type": q.question_type,
        "question_region": q.question_region,
        "question": q.question,
        "box_region": b.region if b else None,
        "box_voxels": list(b.voxels) if b else None,
        "box_list_form": list(b.list_form) if b else None,
        "box_normalized": list(b.normalized) if b else None,
        "box_size_mm": list(b.size_mm) if b else None,
        "box_center_lps": list(b.center_lps) if b else None,
        "box_empty": q.box_empty,
        "box_reason": q.box_reason,
        "reasoning": list(q.reasoning),
        "severity": [g.to_json() for g in q.severity],
        "answer_json": q.answer_json,
    }


def quintuple_from_row(row: dict[str, Any]) -> Quintuple:
    """Inverse of :func:`quintuple_to_row` (extra keys such as ``image`` are ignored)."""
    box = None
    if row["box_voxels"] is not None:
        box = QBox(
            region=row["box_region"],
            voxels=tuple(row["box_voxels"]),
            list_form=tuple(row["box_list_form"]),
            normalized=tuple(row["box_normalized"]),
            size_mm=tuple(row["box_size_mm"]),
            center_lps=tuple(row["box_center_lps"]),
        )
    return Quintuple(
        sample_id=row["sample_id"],
        volume_id=row["volume_id"],
        patient_id=row["patient_id"],
        split=row["split"],
        question_id=row["question_id"],
        question_type=row["question_type"],
        question_region=row["question_region"],
        question=row["question"],
        box=box,
        box_empty=row["box_empty"],
        box_reason=row["box_reason"],
        reasoning=tuple(row["reasoning"]),
        severity=tuple(Grade(**g) for g in row["severity"]),
        answer_json=row["answer_json"],
    )


# ----------------------------------------------------------------------------------------------------------
# reading


def read_manifest(shards_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(shards_dir) / MANIFEST
    if not p.is_file():
        raise InputNotFoundError(f"{p}: no manifest (not a shards directory, or its writing did not finish)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValidationError(f"{p}: not valid JSON: {e}") from e
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValidationError(
            f"{p}: schema version {m.get('schema_version')!r}, this kneeprep reads {SCHEMA_VERSION}"
        )
    return m


def decode_image(
    image: bytes | pa.Buffer | pa.Scalar, dtype: str, shape, codec: str = "raw", out: np.ndarray | None = None
) -> np.ndarray:
    """A volume from its ``image`` bytes and ``image_codec``, read-only (shared by the samples of one volume).

    ``"raw"``: a view of the bytes, no copy. ``"blosc"``: decompressed into a new array by numcodecs (its
    threads: ``numcodecs.blosc.set_nthreads`` / ``use_threads``). With ``out`` (a writable C-contiguous array
    of ``shape`` x ``dtype``, e.g. a shared-memory slab) the volume is decoded or copied into it and ``out`` is
    returned. Raises ``ValidationError`` when the bytes do not hold ``shape`` x ``dtype``.
    """
    if isinstance(image, pa.Scalar):
        image = image.as_buffer()
    dt, shape = np.dtype(dtype), tuple(shape)
    if out is not None and (out.shape != shape or out.dtype != dt or not out.flags.c_contiguous):
        raise ValueError(f"out is {out.shape} {out.dtype}, the volume {shape} {dt}")
    if codec == "raw":
        got, need = memoryview(image).nbytes, math.prod(shape) * dt.itemsize
        if got != need:
            raise ValidationError(f"{got} image bytes, shape {list(shape)} x {dtype} needs {need}")
        a = np.frombuffer(image, dtype=dt).reshape(shape)
        if out is not None:
            np.copyto(out, a)
            a = out
    elif codec == "blosc":
        from numcodecs import blosc

        a = np.empty(shape, dt) if out is None else out
        nbytes, cbytes = _blosc_sizes(image)
        if nbytes != a.nbytes or cbytes != memoryview(image).nbytes:
            raise ValidationError(
                f"Blosc frame of {memoryview(image).nbytes} bytes says {nbytes} bytes in {cbytes}; "
                f"shape {list(shape)} x {dtype} needs {a.nbytes}"
            )
        try:
            blosc.decompress(image, a)
        except (RuntimeError, ValueError) as e:
            raise ValidationError(f"Blosc frame does not decode: {e}") from e
    else:
        raise ValidationError(f"image_codec {codec!r} is not one of {', '.join(IMAGE_CODECS)}")
    a.flags.writeable = False  # shared by the samples of one volume
    return a


def _blosc_sizes(frame) -> tuple[int, int]:
    """(uncompressed, compressed) bytes from a Blosc 1 frame's 16-byte header (0, 0 when too short)."""
    head = bytes(memoryview(frame)[:16])
    if len(head) < 16:
        return 0, 0
    return int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")


#: ``progress(done, total)``: how far a long job is (the CLI draws it; this module prints nothing)
Progress = Callable[[int, int], None]
#: ``alloc(volume_id, shape, dtype)`` -> a writable C-contiguous array to decode that volume into
VolumeAllocator = Callable[[str, tuple, np.dtype], np.ndarray]


def read_row_group(
    path: str | os.PathLike | pq.ParquetFile, index: int, columns=None, alloc: VolumeAllocator | None = None
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rows of one row group as dicts (without ``image``) and its volumes decoded once: ``{volume_id: array}``.

    ``columns`` limits the row columns (``volume_id`` is always read); images are read only when ``columns``
    is None or names ``image``. ``alloc`` gives the array each volume is decoded into (a shared-memory slab:
    :mod:`kneeprep.slabs`); without it raw volumes are views of the Parquet buffers and Blosc ones new arrays.
    """
    pf = path if isinstance(path, pq.ParquetFile) else pq.ParquetFile(path)
    want_image = columns is None or "image" in columns
    row_cols = list(
        dict.fromkeys(
            ["volume_id", *[c for c in (SCHEMA.names if columns is None else columns) if c != "image"]]
        )
    )
    extra = ["image", "image_dtype", "image_shape", "image_codec"] if want_image else []
    t = pf.read_row_group(index, columns=list(dict.fromkeys(row_cols + extra)))
    volumes: dict[str, np.ndarray] = {}
    if want_image:
        vids = t.column("volume_id").to_pylist()
        dts = t.column("image_dtype").to_pylist()
        shapes = t.column("image_shape").to_pylist()
        codecs = t.column("image_codec").to_pylist()
        for i, buf in enumerate(_binary_values(t.column("image"))):
            if buf is not None:
                out = None if alloc is None else alloc(vids[i], tuple(shapes[i]), np.dtype(dts[i]))
                volumes[vids[i]] = decode_image(buf, dts[i], shapes[i], codecs[i], out=out)
    rows = t.select(row_cols).to_pylist()
    return rows, volumes


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


# ----------------------------------------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a shards directory: where, what kind, and the details."""

    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: [{self.kind}] {self.message}"


def validate_shards(
    shards_dir: str | os.PathLike, *, decode: bool = True, progress: Progress | None = None
) -> list[Problem]:
    """Check a shards directory against its manifest and schema; an empty list means all is well.

    Checks: manifest and schema version; missing and extra shard files; bytes and sha256; row and volume
    counts; the Arrow schema; rows sorted by volume with the image on each volume's first row in the same
    row group; every volume decodes to its declared shape and dtype (``decode``); every box inside its
    volume and consistent with its list form; each row's split matches its directory; no patient in two splits.
    ``progress(done, total)`` is called after each shard file.
    """
    d = Path(shards_dir)
    try:
        m = read_manifest(d)
    except (InputNotFoundError, ValidationError) as e:
        return [Problem(str(d / MANIFEST), "manifest", str(e))]
    problems: list[Problem] = []
    listed = {e["path"] for e in m.get("shards", [])}
    for p in sorted(d.glob("*/part-*.parquet")):
        rel = p.relative_to(d).as_posix()
        if rel not in listed:
            problems.append(Problem(rel, "extra", "shard file not listed in the manifest"))
    patients: dict[str, set[str]] = {}
    entries = m.get("shards", [])
    for done, e in enumerate(entries):
        if progress is not None and done:
            progress(done, len(entries))
        rel = e["path"]
        p = d / rel
        if not p.is_file():
            problems.append(Problem(rel, "missing", "listed in the manifest but not on disk"))
            continue
        size = p.stat().st_size
        if size != e["bytes"]:
            problems.append(Problem(rel, "bytes", f"expected {e['bytes']} bytes, found {size}"))
        digest = sha256_file(p)
        if digest != e["sha256"]:
            problems.append(
                Problem(rel, "checksum", f"sha256 {digest} differs from the manifest's {e['sha256']}")
            )
            continue  # the content is not what was written: do not trust it further
        problems += _validate_file(p, rel, e, patients, decode)
    if progress is not None and entries:
        progress(len(entries), len(entries))
    for patient, splits in sorted(patients.items()):
        if len(splits) > 1:
            problems.append(
                Problem(
                    MANIFEST,
                    "split_leak",
                    f"patient {patient} is in several splits: {', '.join(sorted(splits))}",
                )
            )
    return problems


def _validate_file(p: Path, rel: str, e: dict, patients: dict[str, set[str]], decode: bool) -> list[Problem]:
    out: list[Problem] = []
    try:
        pf = pq.ParquetFile(p, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        return [Problem(rel, "unreadable", str(exc))]
    schema = pf.schema_arrow
    if (
        schema.metadata is None
        or schema.metadata.get(b"kneeprep.schema_version") != str(SCHEMA_VERSION).encode()
    ):
        out.append(
            Problem(
                rel,
                "schema",
                f"schema version {(schema.metadata or {}).get(b'kneeprep.schema_version')!r}, expected {SCHEMA_VERSION}",
            )
        )
    if not schema.remove_metadata().equals(SCHEMA.remove_metadata()):
        out.append(Problem(rel, "schema", "Arrow schema differs from kneeprep.shards.SCHEMA"))
        return out
    rows = volumes = 0
    seen: set[str] = set()
    for g in range(pf.num_row_groups):
        try:
            t = pf.read_row_group(g, columns=None if decode else [n for n in SCHEMA.names if n != "image"])
        except (OSError, pa.ArrowException) as exc:
            out.append(Problem(rel, "unreadable", f"row group {g}: {exc}"))
            continue
        rows += t.num_rows
        cols = {n: t.column(n).to_pylist() for n in t.column_names if n != "image"}
        bufs = _binary_values(t.column("image")) if decode else None
        current = None
        for i in range(t.num_rows):
            vid, sid = cols["volume_id"][i], cols["sample_id"][i]
            where = f"row group {g}, sample {sid}"
            if cols["split"][i] != e["split"]:
                out.append(
                    Problem(rel, "split", f"{where}: split {cols['split'][i]!r} in a {e['split']} shard")
                )
            patients.setdefault(cols["patient_id"][i], set()).add(cols["split"][i])
            shape = cols["image_shape"][i]
            if vid != current:
                if vid in seen:
                    out.append(Problem(rel, "order", f"{where}: rows of volume {vid} are not contiguous"))
                seen.add(vid)
                current = vid
                volumes += 1
                if decode and bufs[i] is None:
                    out.append(
                        Problem(rel, "image", f"{where}: first row of volume {vid} has no image bytes")
                    )
                elif decode:
                    out += _check_image(
                        rel, where, bufs[i], cols["image_dtype"][i], shape, cols["image_codec"][i]
                    )
            elif decode and bufs[i] is not None:
                out.append(Problem(rel, "image", f"{where}: volume {vid} stored twice"))
            out += _check_box(rel, where, cols, i, shape)
    if rows != e["rows"]:
        out.append(Problem(rel, "rows", f"manifest says {e['rows']} rows, file has {rows}"))
    if volumes != e["volumes"]:
        out.append(Problem(rel, "volumes", f"manifest says {e['volumes']} volumes, file has {volumes}"))
    return out


def _check_image(rel: str, where: str, image, dtype: str, shape, codec: str = "raw") -> list[Problem]:
    try:
        np.dtype(dtype)
    except TypeError:
        return [Problem(rel, "image", f"{where}: image_dtype {dtype!r} is not a numpy dtype")]
    try:  # raw: the byte count (a view, nothing copied); Blosc: the frame's sizes, and that it decompresses
        decode_image(image, dtype, shape, codec)
    except ValidationError as e:
        return [Problem(rel, "image", f"{where}: {e}")]
    return []


def _check_box(rel: str, where: str, cols: dict, i: int, shape) -> list[Problem]:
    v = cols["box_voxels"][i]
    if v is None:
        if not cols["box_empty"][i]:
            return [Problem(rel, "box", f"{where}: no box but box_empty is false")]
        return []
    z0, y0, x0, z1, y1, x1 = v
    if not (0 <= z0 < z1 <= shape[0] and 0 <= y0 < y1 <= shape[1] and 0 <= x0 < x1 <= shape[2]):
        return [Problem(rel, "box", f"{where}: box {v} outside volume of shape {shape} (or empty)")]
    if list(cols["box_list_form"][i]) != [z0, z1 - 1, x0, x1 - 1, y0, y1 - 1]:
        return [
            Problem(rel, "box", f"{where}: list form {cols['box_list_form'][i]} does not match voxels {v}")
        ]
    return []


# ----------------------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# the stage: store + annotation directory -> shards (what `kneeprep shards` and `rebuild` run)


def inputs_hash(
    store: str | os.PathLike, annotations_dir: str | os.PathLike, volume_ids: Iterable[str], attrs
) -> str:
    """Fingerprint of the shards stage's inputs: every annotation file's bytes and every volume's attrs (which
    carry the content hash of its sources and the convert/boxes recipe hashes)."""
    h = hashlib.sha256()
    d = Path(annotations_dir)
    files = sorted(
        [*d.glob("split_files/*.csv"), *d.glob("*_split.csv"), *d.glob("*.json"), *d.glob("*.jsonl")]
    )
    for f in files:
        h.update(f"{f.relative_to(d).as_posix()}\0{sha256_file(f)}\n".encode())
    for vid in sorted(volume_ids):
        h.update(f"{vid}\0".encode() + json.dumps(attrs[vid], sort_keys=True, default=str).encode() + b"\n")
    return h.hexdigest()[:16]


def up_to_date(out_dir: str | os.PathLike, recipe_hash: str, in_hash: str) -> bool:
    """True when ``out_dir`` holds complete shards made from the same inputs with the same shards-stage recipe
    (manifest hashes equal and every listed file present with its size; ``kneeprep validate`` checks more)."""
    try:
        m = read_manifest(out_dir)
    except (InputNotFoundError, ValidationError):
        return False
    if m.get("recipe_hash") != recipe_hash or m.get("inputs_hash") != in_hash:
        return False
    d = Path(out_dir)
    return all(
        (d / e["path"]).is_file() and (d / e["path"]).stat().st_size == e["bytes"] for e in m["shards"]
    )


def build_shards(
    store, annotations_dir, out_dir, recipe, *, force: bool = False, progress: Progress | None = None
) -> dict[str, Any]:
    """Run the shards stage and return its report (also written to ``out_dir/report.json``).

    Reads the annotation directory and every complete volume's attrs, joins them
    (:func:`kneeprep.quintuples.build_quintuples`), writes the shards and the manifest. Does nothing when the
    inputs and the shards-stage recipe hash match the existing manifest (``report["up_to_date"]``), unless
    ``force``. ``report["errors"]`` counts rejections other than :data:`~kneeprep.quintuples.BENIGN_KINDS`.
    """
    import time

    from .privacy import Pseudonymizer
    from .store import store_lock

    t0 = time.perf_counter()
    pseudo = Pseudonymizer.from_recipe(recipe)  # a missing key fails before any work
    out = Path(out_dir)
    # one writer per shards directory: two runs at once wrote the same .partial files and deleted each
    # other's (a corrupt shard, issue 19); the second now stops before any work
    with store_lock(out, what="shards directory"):
        return _build_shards(store, annotations_dir, out, recipe, pseudo, force, t0, progress)


def _build_shards(
    store, annotations_dir, out: Path, recipe, pseudo, force: bool, t0: float, progress: Progress | None
) -> dict[str, Any]:
    import time

    from .annotations import read_annotations
    from .quintuples import BENIGN_KINDS, build_quintuples
    from .store import list_volumes, read_attrs, read_volume

    annotations = read_annotations(annotations_dir)
    vids = list_volumes(store)
    attrs = {v: read_attrs(store, v) for v in vids}
    rhash = recipe.stage_hash("shards")
    ihash = inputs_hash(store, annotations_dir, vids, attrs)
    if pseudo.enabled:  # shards pseudonymized with another key are not up to date
        ihash = hashlib.sha256(f"{ihash}\0{pseudo.fingerprint}".encode()).hexdigest()[:16]
    if not force and up_to_date(out, rhash, ihash):
        previous = json.loads((out / REPORT).read_text()) if (out / REPORT).is_file() else {}
        return previous | {"up_to_date": True, "seconds": round(time.perf_counter() - t0, 3)}
    quintuples, rejected = build_quintuples(annotations, attrs, recipe)
    real_volume: dict[str, str] = {}  # published (pseudonymized) volume id -> store volume id
    if pseudo.enabled:
        real_volume = {pseudo.prefixed(q.volume_id, q.patient_id): q.volume_id for q in quintuples}
        quintuples = [pseudo.quintuple(q) for q in quintuples]
        rejected = _pseudonymize_rejections(rejected, pseudo, annotations, attrs)
    manifest = write_shards(
        quintuples,
        lambda v: read_volume(store, real_volume.get(v, v)),
        out,
        recipe,
        inputs_hash=ihash,
        progress=progress,
    )
    mismatched = prompt_mismatches(annotations)
    by_kind: dict[str, int] = {}
    for r in rejected:
        by_kind[r.reason_kind] = by_kind.get(r.reason_kind, 0) + 1
    report = {
        "up_to_date": False,
        "recipe_name": recipe.name,
        "recipe_hash": rhash,
        "inputs_hash": ihash,
        "annotations": len(annotations.records) + len(annotations.errors),
        "quintuples": {s: manifest["splits"][s]["rows"] for s in SPLITS},
        "volumes": {s: manifest["splits"][s]["volumes"] for s in SPLITS},
        "rejected": dict(sorted(by_kind.items())),
        "errors": sum(n for k, n in by_kind.items() if k not in BENIGN_KINDS),
        "shards": len(manifest["shards"]),
        "bytes": sum(e["bytes"] for e in manifest["shards"]),
        "codec": recipe.shards.codec,
        "seconds": round(time.perf_counter() - t0, 3),
        "rejected_items": [r.to_json() for r in rejected],
        # the rule: a record's own prompt wins; the bank (questions.json) fills in records without one
        "prompt_rule": "record",
        "prompt_mismatches": len(mismatched),
        "prompt_mismatch_examples": mismatched[:5],
    }
    _write_json_atomic(out / REPORT, report)
    return report


def prompt_mismatches(annotations) -> list[dict[str, str]]:
    """Records whose own prompt differs from the question bank's prompt for their question id (the record's
    is the one written: docs/SHARDS.md, "The join"), in record order."""
    bank = dict(annotations.questions)
    return [
        {"sample_id": r.sample_id, "question_id": r.question_id}
        for r in annotations.records
        if r.question and r.question_id in bank and bank[r.question_id] and r.question != bank[r.question_id]
    ]


def _pseudonymize_rejections(rejected, pseudo, annotations, attrs) -> list:
    """Rejections with every known patient id (store, annotations, split CSVs) replaced in ids and messages."""
    import dataclasses

    patients = {str(a.get("patient_id") or "") for a in attrs.values()}
    patients |= {r.volume_id.split("_", 1)[0] for r in annotations.records if r.volume_id}
    patients |= {str(r.patient_id) for r in annotations.splits}
    return [
        dataclasses.replace(
            r, sample_id=pseudo.text(r.sample_id, patients), message=pseudo.text(r.message, patients)
        )
        for r in rejected
    ]
