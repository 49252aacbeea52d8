"""``kneeprep validate``: check a shards directory against its manifest and schema."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep.errors import InputNotFoundError, ValidationError
from kneeprep.files import sha256_file
from kneeprep.formats.report import Progress
from kneeprep.formats.shard_reader import _binary_values, read_manifest
from kneeprep.formats.shard_schema import MANIFEST, SCHEMA, SCHEMA_VERSION, decode_image


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
    ``progress("validate", done, total, path)`` is called after each shard file.
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
        if progress and done:
            progress("validate", done, len(entries), entries[done - 1]["path"])
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
    if progress and entries:
        progress("validate", len(entries), len(entries), entries[-1]["path"])
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
        out.append(Problem(rel, "schema", "Arrow schema differs from kneeprep.formats.shard_schema.SCHEMA"))
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
