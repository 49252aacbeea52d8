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
from kneeprep.formats.shard_plan import DATA_DIR, HF_SPLITS, VOLUMES_DIR
from kneeprep.formats.shard_reader import _binary_values, is_legacy, read_manifest
from kneeprep.formats.shard_schema import MANIFEST, SCHEMA, SCHEMA_VERSION, VOLUME_SCHEMA, decode_image
from kneeprep.formats.shard_writer import LEGACY_GLOB
from kneeprep.stages.harness import Stage


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a shards directory: where, what kind, and the details."""

    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: [{self.kind}] {self.message}"


def validate_shards(
    shards_dir: str | os.PathLike,
    *,
    decode: bool = True,
    progress: Progress | None = None,
    workers: int | None = 0,
    scheduler: str | None = None,
    executor=None,
) -> list[Problem]:
    """Check a shards directory against its manifest and schema; an empty list means all is well.

    Checks: manifest and schema version (the layout before version 3 is one ``layout`` problem: re-run
    ``kneeprep shards``); missing and extra shard files; then one task per shard on the executor
    (``workers``/``scheduler``, :mod:`kneeprep.parallel`; ``0``: in this process), :func:`check_shard`: bytes
    and sha256 of both files; the Arrow schemas; row and volume counts; rows sorted by volume with the image on
    each volume's first row in the same row group; every volume decodes to its declared shape and dtype
    (``decode``); the volumes file holds the same volumes and bytes; every box inside its volume and consistent
    with its list form; each row's split matches its file. Last, no patient in two splits.
    ``progress("validate", done, total, path)`` is called after each shard.
    """
    d = Path(shards_dir)
    try:
        m = read_manifest(d)
    except (InputNotFoundError, ValidationError) as e:
        return [Problem(str(d / MANIFEST), "manifest", str(e))]
    if is_legacy(m):
        return [Problem(MANIFEST, "layout", f"schema version {m.get('schema_version')} layout "
                        "(<split>/part-NNNNN.parquet, no volumes table): ShardDataset still reads it; "
                        "re-run `kneeprep shards` to write the Hub layout (data/, _volumes/)")]  # fmt: skip
    problems: list[Problem] = []
    entries = m.get("shards", [])
    listed = {e[k] for e in entries for k in ("path", "volumes_path")}
    for pattern in (f"{DATA_DIR}/*.parquet", f"{VOLUMES_DIR}/*.parquet", LEGACY_GLOB):
        for p in sorted(d.glob(pattern)):
            rel = p.relative_to(d).as_posix()
            if rel not in listed:
                problems.append(Problem(rel, "extra", "shard file not listed in the manifest"))
    patients: dict[str, set[str]] = {}
    with Stage("validate", d, report_name=None, partials=(), lock=False, workers=workers,
               scheduler=scheduler, progress=progress, executor=executor) as st:  # fmt: skip
        ex = st.executor() if entries else None
        # the largest shards first, so the last task to start is a small one
        by_size = sorted(entries, key=lambda e: -e["bytes"] if isinstance(e.get("bytes"), int) else 0)
        results = ex.map_unordered(check_shard, by_size, shards_dir=str(d), decode=decode) if ex else []
        by_path = {}
        for path, found, seen in st.track(results, len(entries), "validate", item=lambda r: r[0]):
            by_path[path] = found
            for patient, splits in seen.items():
                patients.setdefault(patient, set()).update(splits)
    for e in entries:  # manifest order, whatever order the tasks finished in
        problems += by_path[e["path"]]
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


def check_shard(
    e: dict, shards_dir: str, decode: bool = True
) -> tuple[str, list[Problem], dict[str, set[str]]]:
    """The task of one shard: ``(path, problems, {patient: splits})`` for manifest entry ``e``."""
    d = Path(shards_dir)
    rel = e["path"]
    patients: dict[str, set[str]] = {}
    problems = _check_bytes(d, rel, e["bytes"], e["sha256"])
    firsts = None  # the quintuples file's volumes, from its one read: what the volumes file must match
    if not problems:  # the content is what was written: check what it holds
        if not rel.startswith(f"{DATA_DIR}/{HF_SPLITS.get(e['split'], '?')}-"):
            problems.append(Problem(rel, "split", f"a {e['split']} shard named {rel}"))
        found, firsts = _validate_file(d / rel, rel, e, patients, decode)
        problems += found
    vrel = e.get("volumes_path")
    if vrel is None:
        problems.append(Problem(rel, "manifest", "no volumes_path in the manifest entry"))
    else:
        found = _check_bytes(d, vrel, e.get("volumes_bytes"), e.get("volumes_sha256"))
        if not found and firsts is not None:  # compared with the quintuples file when both are as written
            found = check_volumes_file(d / vrel, vrel, firsts, decode)
        problems += found
    return rel, problems, patients


def _check_bytes(d: Path, rel: str, nbytes, sha256) -> list[Problem]:
    p = d / rel
    if not p.is_file():
        return [Problem(rel, "missing", "listed in the manifest but not on disk")]
    out = []
    size = p.stat().st_size
    if size != nbytes:
        out.append(Problem(rel, "bytes", f"expected {nbytes} bytes, found {size}"))
    digest = sha256_file(p)
    if digest != sha256:
        out.append(Problem(rel, "checksum", f"sha256 {digest} differs from the manifest's {sha256}"))
    return out


@dataclass
class _Run:
    """One volume's run of rows in a quintuples file: what its row in the volumes file must say."""

    volume_id: str
    patient_id: str
    split: str
    rows: int
    image: object  # the first row's image bytes (an Arrow buffer; ``None`` when not decoding)


def _validate_file(
    p: Path, rel: str, e: dict, patients: dict[str, set[str]], decode: bool
) -> tuple[list[Problem], list[_Run] | None]:
    """The quintuples file's problems, and its runs of rows per volume (``None`` when a part of it could not
    be read or its schema differs: the volumes file is then not compared with it)."""
    out: list[Problem] = []
    firsts: list[_Run] | None = []
    try:
        pf = pq.ParquetFile(p, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        return [Problem(rel, "unreadable", str(exc))], None
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
        return out, None
    rows = volumes = 0
    seen: set[str] = set()
    for g in range(pf.num_row_groups):
        try:
            t = pf.read_row_group(g, columns=None if decode else [n for n in SCHEMA.names if n != "image"])
        except (OSError, pa.ArrowException) as exc:
            out.append(Problem(rel, "unreadable", f"row group {g}: {exc}"))
            firsts = None
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
            if firsts is not None:
                if vid != current:
                    firsts.append(
                        _Run(vid, cols["patient_id"][i], cols["split"][i], 0, bufs[i] if decode else None)
                    )
                firsts[-1].rows += 1
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
    return out, firsts


def check_volumes_file(p: Path, rel: str, firsts: list[_Run], decode: bool) -> list[Problem]:
    """The volumes file of a shard: its schema, one row per volume of the quintuples file (same ids, order,
    patient and split; ``firsts`` from the quintuples file's own check, so it is read once), ``image_nbytes``
    the length of ``image``, and (``decode``) the same image bytes as the volume's first row there."""
    try:
        pf = pq.ParquetFile(p, page_checksum_verification=True)
        if not pf.schema_arrow.remove_metadata().equals(VOLUME_SCHEMA.remove_metadata()):
            return [
                Problem(
                    rel, "schema", "Arrow schema differs from kneeprep.formats.shard_schema.VOLUME_SCHEMA"
                )
            ]
        cols = ["volume_id", "patient_id", "split", "questions", "image_nbytes"] + (
            ["image"] if decode else []
        )
        t = pf.read(columns=cols)
    except (OSError, pa.ArrowException) as exc:
        return [Problem(rel, "unreadable", str(exc))]
    vids, expect = t.column("volume_id").to_pylist(), [f.volume_id for f in firsts]
    if vids != expect:
        return [
            Problem(
                rel, "volumes", f"volumes {vids[:3]}... differ from the quintuples file's {expect[:3]}..."
            )
        ]
    out: list[Problem] = []
    for name in ("patient_id", "split"):
        if t.column(name).to_pylist() != [getattr(f, name) for f in firsts]:
            out.append(Problem(rel, "volumes", f"{name} differs from the quintuples file"))
    if t.column("questions").to_pylist() != [f.rows for f in firsts]:
        out.append(Problem(rel, "volumes", "questions per volume differ from the quintuples file"))
    if decode:
        images, nbytes = _binary_values(t.column("image")), t.column("image_nbytes").to_pylist()
        for f, img, n in zip(firsts, images, nbytes, strict=True):
            if img.size != n:
                out.append(
                    Problem(rel, "image", f"volume {f.volume_id}: {img.size} image bytes, image_nbytes {n}")
                )
            elif f.image is None or not img.equals(f.image):
                out.append(
                    Problem(
                        rel, "image", f"volume {f.volume_id}: image bytes differ from the quintuples file"
                    )
                )
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
