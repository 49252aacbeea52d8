"""Writing shards: quintuples and their volumes -> Parquet files and the manifest (``docs/SHARDS.md``).

Determinism: same quintuples, volumes and recipe give byte-identical files (stable sort orders, no
timestamps, fixed writer options). Each shard is written under a temporary name and renamed; the manifest
comes last, so a directory without ``manifest.json`` is not a complete set of shards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep import __version__
from kneeprep.errors import StoreError, ValidationError
from kneeprep.files import publish, remove_partials, sha256_file, temp_path, write_json
from kneeprep.formats.box import Box
from kneeprep.formats.quintuples import Quintuple, quintuple_order
from kneeprep.formats.report import Progress
from kneeprep.formats.shard_schema import (
    MANIFEST,
    PARQUET_CODECS,
    QUINTUPLE_COLUMNS,
    ROW_GROUP_IMAGE_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    encode_image,
)  # fmt: skip
from kneeprep.formats.splits import SPLITS
from kneeprep.moaks.severity import Grade

#: ``read_volume(volume_id) -> (image, geometry)``; ``geometry`` a ``Geometry`` or its ``to_json()`` dict.
VolumeReader = Callable[[str], tuple[np.ndarray, Any]]


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
    removed after the manifest is written. ``progress("shards", done, total, volume_id)`` is called after each
    volume read.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    qs = sorted(quintuples, key=quintuple_order)
    entries: list[dict[str, Any]] = []
    total = len({(q.split, q.volume_id) for q in qs})
    done = [0]

    def volume_done(vid: str) -> None:
        done[0] += 1
        if progress:
            progress("shards", done[0], total, vid)

    try:
        for split, split_rows in groupby(qs, key=lambda q: q.split):
            if split not in SPLITS:
                raise ValidationError(f"quintuple split {split!r} is not one of {', '.join(SPLITS)}")
            rg_bytes = min(row_group_bytes, recipe.shards.target_bytes)
            entries += _write_split(
                out, split, list(split_rows), read_volume, recipe.shards, rg_bytes, volume_done
            )
    except BaseException:
        remove_partials(
            out, "*/*"
        )  # a failed or interrupted run leaves no half-written shard (and no manifest)
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
    write_json(out / MANIFEST, manifest)
    keep = {e["path"] for e in entries}
    for p in sorted(out.glob("*/part-*.parquet")):
        if p.relative_to(out).as_posix() not in keep:
            p.unlink()
    remove_partials(
        out, "*/*"
    )  # left by a run that was killed (SIGKILL, power loss) before it could clean up
    return manifest


def _write_split(
    out: Path,
    split: str,
    rows: list[Quintuple],
    read_volume: VolumeReader,
    spec,
    row_group_bytes: int,
    volume_done: Callable[[str], None] = lambda vid: None,
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
        volume_done(vid)
    flush()
    if writer is not None:
        entries.append(writer.close())
    return entries


class _ShardWriter:
    """One shard file being written under a temporary name (:func:`kneeprep.files.temp_path`); ``close``
    publishes it and returns its entry, an error removes it."""

    def __init__(self, out: Path, rel: str, split: str, spec):
        self.out, self.rel, self.split, self.spec = out, rel, split, spec
        self.final = out / rel
        self.tmp = temp_path(self.final)
        self.sink = pa.OSFile(str(self.tmp), "wb")
        codec = PARQUET_CODECS[spec.codec]
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
            self.abort()
            raise StoreError(f"{self.final}: could not write the shard: {e}") from e
        self.rows += table.num_rows
        self.volumes += len(group)
        self.row_group_rows.append(table.num_rows)

    def abort(self) -> None:
        """Remove the temporary file (after an error; nothing under the final name)."""
        with contextlib.suppress(Exception):
            self.sink.close()
        self.tmp.unlink(missing_ok=True)

    def tell(self) -> int:
        return self.sink.tell()

    def close(self) -> dict[str, Any]:
        try:
            self.writer.close()
            self.sink.close()
        except (OSError, pa.ArrowException) as e:
            self.abort()
            raise StoreError(f"{self.final}: could not finish the shard: {e}") from e
        publish(self.tmp, self.final)  # fsync + rename (a failure removes the temporary file)
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
        box = Box(
            region=row["box_region"],
            label_ids=(),
            voxel_count=None,
            centroid=None,
            empty=False,
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
