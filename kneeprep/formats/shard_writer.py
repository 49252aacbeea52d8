"""Writing shards: quintuples and their volumes -> Parquet files and the manifest (``docs/SHARDS.md``).

The boundaries of every shard are planned first (:func:`kneeprep.formats.shard_plan.plan_shards`, from the
volumes' uncompressed sizes); then each shard is one independent task, :func:`write_shard`, that reads its
volumes and writes its two files (quintuples under ``data/``, volumes under ``_volumes/``) and returns their
sizes and checksums. Tasks run on any executor (:mod:`kneeprep.parallel`; in this process without one); the
manifest is written last, from the task results, in plan order.

Determinism: same quintuples, volumes and recipe give byte-identical files wherever the tasks run (stable sort
orders, no timestamps, fixed writer options, Blosc on one thread). Each file is written under a temporary name
and renamed; the manifest comes last, so a directory without ``manifest.json`` is not a complete set of shards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep import __version__
from kneeprep.errors import StoreError
from kneeprep.files import publish, remove_partials, sha256_file, temp_path, write_json
from kneeprep.formats.box import Box
from kneeprep.formats.quintuples import Quintuple
from kneeprep.formats.report import Progress
from kneeprep.formats.shard_plan import DATA_DIR, VOLUMES_DIR, ShardPlan, plan_shards
from kneeprep.formats.shard_schema import (
    MANIFEST,
    PARQUET_CODECS,
    QUINTUPLE_COLUMNS,
    ROW_GROUP_IMAGE_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    VOLUME_SCHEMA,
    encode_image,
)  # fmt: skip
from kneeprep.formats.splits import SPLITS
from kneeprep.moaks.severity import Grade

#: ``read_volume(volume_id) -> (image, geometry)``; ``geometry`` a ``Geometry`` or its ``to_json()`` dict. Must be
#: picklable to run on Dask workers (the shards stage passes :class:`kneeprep.stages.shards.StoreVolumes`).
VolumeReader = Callable[[str], tuple[np.ndarray, Any]]

#: Shard files of the layout before schema version 3 (``<split>/part-NNNNN.parquet``), removed by a rewrite.
LEGACY_GLOB = "*/part-*.parquet"


def write_shards(
    quintuples: Iterable[Quintuple],
    read_volume: VolumeReader,
    out_dir: str | os.PathLike,
    recipe,
    *,
    inputs_hash: str = "",
    row_group_bytes: int = ROW_GROUP_IMAGE_BYTES,
    nbytes: Mapping[str, int] | None = None,
    executor=None,
    progress: Progress | None = None,
    publish=None,
) -> dict[str, Any]:
    """Write quintuples (with their volumes) as Parquet shards under ``out_dir`` and return the manifest.

    ``nbytes[volume_id]`` (uncompressed bytes, e.g. from the store's attrs) plans the shards; without it each
    volume is read once here to learn its size. ``executor`` (``map_unordered(fn, items, **kwargs)``, see
    :mod:`kneeprep.parallel`) runs the shard tasks; without one they run here, in order. Old shard files not
    in the new manifest (also those of the layout before schema version 3) are removed after the manifest is
    written. ``progress("shards", done, total, path)`` is called after each shard. ``publish`` (a
    :class:`kneeprep.publish.Publisher`): the object store's manifest is withdrawn first and each task uploads
    its two files (the final push publishes the new manifest).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the new manifest lands
    if publish is not None:  # so on the object store too, before a shard file there changes
        from kneeprep.publish import publish_or_warn

        if publish_or_warn(publish.withdraw, out / MANIFEST):
            publish = None  # not withdrawn: the tasks upload nothing, the final push publishes the shards
    qs = list(quintuples)
    if nbytes is None:
        nbytes = {v: int(read_volume(v)[0].nbytes) for v in sorted({q.volume_id for q in qs})}
    plans = plan_shards(qs, nbytes, recipe.shards.target_bytes, row_group_bytes)
    kwargs = {"read_volume": read_volume, "out_dir": str(out), "spec": recipe.shards, "publish": publish}
    if executor is None:
        results: Iterable[dict] = (write_shard(p, **kwargs) for p in plans)
    else:  # the largest shards first: the last task to start is a small one (the files do not depend on it)
        by_size = sorted(plans, key=lambda p: -sum(nbytes[v] for v in p.volume_ids))
        results = executor.map_unordered(write_shard, by_size, **kwargs)
    done: dict[str, dict] = {}
    try:
        for e in results:
            done[e["path"]] = e
            if progress:
                progress("shards", len(done), len(plans), e["path"])
    except BaseException:
        remove_partials(
            out, "*/*"
        )  # a failed or interrupted run leaves no half-written shard (and no manifest)
        raise
    entries = [done[p.path] for p in plans]  # plan order, whatever order the tasks finished in
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
    keep = {e[k] for e in entries for k in ("path", "volumes_path")}
    for pattern in (f"{DATA_DIR}/*.parquet", f"{VOLUMES_DIR}/*.parquet", LEGACY_GLOB):
        for p in sorted(out.glob(pattern)):
            if p.relative_to(out).as_posix() not in keep:
                p.unlink()
    remove_partials(
        out, "*/*"
    )  # left by a run that was killed (SIGKILL, power loss) before it could clean up
    for split in SPLITS:  # the legacy layout's split folders, once empty
        with contextlib.suppress(OSError):
            (out / split).rmdir()
    return manifest


def write_shard(
    plan: ShardPlan, read_volume: VolumeReader, out_dir: str, spec, publish=None
) -> dict[str, Any]:
    """The task of one shard: read its volumes, write ``plan.path`` and ``plan.volumes_path`` under
    ``out_dir`` (and upload them, with ``publish``), return the manifest entry (rows, volumes, row groups,
    bytes and sha256 of both files)."""
    out = Path(out_dir)
    rows_file = _ParquetFile(out, plan.path, SCHEMA, spec)
    vols_file = _ParquetFile(out, plan.volumes_path, VOLUME_SCHEMA, spec)
    try:
        for group in plan.groups:
            encoded = [_encode(vid, qs, read_volume, spec) for vid, qs in group]
            rows_file.write_group(_rows_table(encoded))
            for e in encoded:  # one volume per row group: a lookup by volume id reads that volume only
                vols_file.write_group(_volumes_table([e]))
        rows, vols = rows_file.close(), vols_file.close()
    except BaseException:
        rows_file.abort()
        vols_file.abort()
        raise
    if publish is not None:
        from kneeprep.publish import publish_or_warn

        publish_or_warn(publish.files, out_dir, [plan.path, plan.volumes_path])
    return {
        "path": plan.path,
        "split": plan.split,
        "rows": rows_file.rows,
        "volumes": len(plan.volume_ids),
        "row_group_rows": rows_file.row_group_rows,
        "bytes": rows[0],
        "sha256": rows[1],
        "volumes_path": plan.volumes_path,
        "volumes_bytes": vols[0],
        "volumes_sha256": vols[1],
    }


def _encode(vid: str, qs, read_volume: VolumeReader, spec) -> tuple:
    """(quintuples, little-endian C-order image, dtype string, image bytes, image_codec, geometry dict)."""
    image, geometry = read_volume(vid)
    geom = geometry.to_json() if hasattr(geometry, "to_json") else dict(geometry)
    if tuple(geom["shape"]) != image.shape:
        raise StoreError(f"volume {vid}: image shape {image.shape} differs from its geometry {geom['shape']}")
    img = np.ascontiguousarray(image)
    if img.dtype.byteorder == ">" or (img.dtype.byteorder == "=" and not np.little_endian):
        img = img.astype(img.dtype.newbyteorder("<"))
    dtype = img.dtype.newbyteorder("<").str if img.dtype.itemsize > 1 else img.dtype.str
    data, image_codec = encode_image(img, spec.codec, spec.level)
    return tuple(qs), img, dtype, data, image_codec, geom


def _geometry_columns(img, dtype, image_codec, geom) -> dict[str, Any]:
    return {
        "image_shape": list(img.shape),
        "image_dtype": dtype,
        "image_codec": image_codec,
        "image_spacing": [float(v) for v in geom["spacing"]],
        "image_affine_lps": [float(v) for row in geom["affine_lps"] for v in row],
    }


def _rows_table(encoded: list[tuple]) -> pa.Table:
    cols: dict[str, list] = {n: [] for n in SCHEMA.names}
    for qs, img, dtype, data, image_codec, geom in encoded:
        extra = _geometry_columns(img, dtype, image_codec, geom)
        for i, q in enumerate(qs):
            for k, v in (quintuple_to_row(q) | extra).items():
                cols[k].append(v)
            cols["image"].append(data if i == 0 else None)
    return pa.Table.from_pydict(cols, schema=SCHEMA).cast(SCHEMA)


def _volumes_table(encoded: list[tuple]) -> pa.Table:
    cols: dict[str, list] = {n: [] for n in VOLUME_SCHEMA.names}
    for qs, img, dtype, data, image_codec, geom in encoded:
        row = {"volume_id": qs[0].volume_id, "patient_id": qs[0].patient_id, "split": qs[0].split,
               "questions": len(qs), "image": data, "image_nbytes": len(data)}  # fmt: skip
        for k, v in (row | _geometry_columns(img, dtype, image_codec, geom)).items():
            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=VOLUME_SCHEMA)


class _ParquetFile:
    """One shard file being written under a temporary name (:func:`kneeprep.files.temp_path`); ``close``
    publishes it and returns (bytes, sha256), ``abort`` removes it."""

    def __init__(self, out: Path, rel: str, schema: pa.Schema, spec):
        self.final = out / rel
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.final)
        self.sink = pa.OSFile(str(self.tmp), "wb")
        names = schema.names
        codec = PARQUET_CODECS[spec.codec]
        compression = {n: "ZSTD" for n in names} | {"image": codec}
        levels = {n: 3 for n in names} | ({"image": spec.level} if codec == "ZSTD" else {})
        dictionary = [n for n in QUINTUPLE_COLUMNS if n not in ("reasoning", "answer_json", "severity")]
        self.writer = pq.ParquetWriter(
            self.sink,
            schema,
            compression=compression,
            compression_level={n: levels[n] for n in names if compression[n] == "ZSTD"},
            use_dictionary=[n for n in [*dictionary, "image_dtype", "image_codec"] if n in names],
            write_statistics=[n for n in ("sample_id", "volume_id", "patient_id", "split", "question_id")
                              if n in names],
            write_page_checksum=True,
            store_schema=True,
        )  # fmt: skip
        self.rows = 0
        self.row_group_rows: list[int] = []

    def write_group(self, table: pa.Table) -> None:
        try:
            self.writer.write_table(table, row_group_size=max(1, table.num_rows))
        except (OSError, pa.ArrowException) as e:  # ENOSPC, EFBIG, EIO ...: name the file
            self.abort()
            raise StoreError(f"{self.final}: could not write the shard: {e}") from e
        self.rows += table.num_rows
        self.row_group_rows.append(table.num_rows)

    def abort(self) -> None:
        """Remove the temporary file (after an error; nothing under the final name)."""
        self.writer.is_open = False  # its __del__ would write a footer into the closed sink
        with contextlib.suppress(Exception):
            self.sink.close()
        self.tmp.unlink(missing_ok=True)

    def close(self) -> tuple[int, str]:
        try:
            self.writer.close()
            self.sink.close()
        except (OSError, pa.ArrowException) as e:
            self.abort()
            raise StoreError(f"{self.final}: could not finish the shard: {e}") from e
        publish(self.tmp, self.final)  # fsync + rename (a failure removes the temporary file)
        return self.final.stat().st_size, sha256_file(self.final)


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
