"""The Zarr v3 volume store: one group per volume, written atomically, readable as OME-Zarr 0.5.

Layout (``docs/DESIGN.md``, "Volume store")::

    volumes.zarr/                  root group, attrs {"kneeprep": {"format_version": 1, "kind": "volume_store"}}
      <volume_id>/                 group, attrs {"ome": {multiscales}, "kneeprep": {...}}
        image                      array (z, y, x)
        labels/                    group, attrs {"ome": {"labels": [<name>, ...]}}
          <name>/                  group, attrs {"ome": {multiscales, "image-label"}}
            0                      array (z, y, x), same grid as image
      .kneeprep-tmp/               work area, never a zarr node
      .kneeprep-lock               held (flock) by the run writing this store
      report.json                  the last convert run's report

**Atomicity.** :func:`write_volume` builds the whole group under
``.kneeprep-tmp/<volume_id>.<uuid>.partial`` (a zarr group of its own: v3 nodes do not record their path) and
renames it to ``<volume_id>`` -- one ``rename(2)`` on the same filesystem. Replacing a volume moves the old
group aside first (``.old``) and deletes it after the new one is in place, so a reader sees the old volume, the
new one, or (for the instant between the two renames, or after a crash there) none, never a mixture. A crashed
or interrupted writer leaves only ``.partial``/``.old`` entries in the work area, which
:func:`clean_work_area` removes at the start of the next run. Local filesystems only (object stores have no
rename; they would need a completion flag written last).

**Chunks and codec** (chosen by measurement, see ``docs/DESIGN.md`` "Chunks and codec"): whole in-plane slabs
of about 4 MiB along array axis 0 (16 slices of a 384x384 uint16 DESS), Blosc zstd level 3 with bit-shuffle
(~2.8x smaller on MR; 0.14 s of one core to write a 160x384x384 volume, 0.05 s to read it), written one slab
of chunks at a time (peak memory: one chunk, not 1.7 volumes). Each chunk is compressed on
``KNEEPREP_CODEC_THREADS`` Blosc threads when that variable is set (:func:`codec_threads`; local convert
workers get cores / workers): zarr encodes one chunk per call here, so without them a worker that has
cores to spare compresses on one.

**OME-Zarr.** Each volume group carries 0.5 ``multiscales`` with one level (path ``image``, axes z/y/x in
millimetres, ``scale`` = spacing) and its label layers ``image-label`` metadata with the label names, so
napari-ome-zarr can open image and labels. OME 0.5 has no rotation: viewers show the voxel grid at its spacing;
the exact geometry is ``kneeprep.geometry.affine_lps``.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec

from kneeprep import FORMAT_VERSION
from kneeprep.errors import InputNotFoundError, StoreError
from kneeprep.files import LOCK_FILE
from kneeprep.geometry import Geometry

WORK_DIR = ".kneeprep-tmp"
REPORT_FILE = "report.json"
#: volume id -> the absolute raw tree it was converted from (written by convert; kneeprep.stages.resume)
SOURCES_FILE = "sources.json"
ROOT_ATTRS = {"format_version": FORMAT_VERSION, "kind": "volume_store"}
#: bytes of uncompressed data per chunk we aim for (rounded to a power-of-two number of slices).
CHUNK_TARGET_BYTES = 1 << 22
OME_VERSION = "0.5"
#: DICOM keywords that identify a patient; attrs holding any of them as a key are refused.
PHI_KEYWORDS = frozenset(
    {
        "PatientName", "PatientBirthDate", "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers",
        "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "InstitutionName", "InstitutionAddress",
        "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "StudyID",
        "PatientAge", "PatientSex", "PatientWeight", "PatientSize", "StudyDate", "StudyTime", "AcquisitionDate",
        "ContentDate", "SeriesDate", "DeviceSerialNumber", "StationName",
    }
)  # fmt: skip


#: environment variable: Blosc threads per process for chunk compression (unset: numcodecs' default, one
#: thread off the main thread, which is where zarr encodes).
CODEC_THREADS_ENV = "KNEEPREP_CODEC_THREADS"


def codec_threads() -> int:
    """Blosc threads :func:`write_volume` compresses with: ``KNEEPREP_CODEC_THREADS`` (1 when unset or bad)."""
    try:
        return max(1, int(os.environ.get(CODEC_THREADS_ENV, "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def _blosc_threads(n: int) -> Iterator[None]:
    """Let numcodecs' Blosc use ``n`` threads (from any thread) for the duration; restored afterwards.

    c-blosc then writes compressed blocks in completion order: the chunk bytes vary run to run, the values
    never do (nothing compares store chunks byte for byte; shards are built from decoded values)."""
    if n <= 1:
        yield
        return
    previous = blosc.use_threads, blosc.get_nthreads()
    blosc.use_threads = True
    blosc.set_nthreads(n)
    try:
        yield
    finally:
        blosc.use_threads = previous[0]
        blosc.set_nthreads(previous[1])


def _codec():
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def choose_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    """Whole ``(y, x)`` planes, a power-of-two number of them closest to :data:`CHUNK_TARGET_BYTES`.

    >>> choose_chunks((160, 384, 384), 2), choose_chunks((160, 384, 384), 4), choose_chunks((32, 256, 256), 1)
    ((16, 384, 384), (8, 384, 384), (32, 256, 256))
    """
    plane = max(1, shape[1] * shape[2] * itemsize)
    n = 2 ** max(0, round(math.log2(max(1.0, CHUNK_TARGET_BYTES / plane))))
    return (int(min(shape[0], n)), int(shape[1]), int(shape[2]))


# ----------------------------------------------------------------------------------------------------------
# the store itself


def init_store(path: str | os.PathLike) -> Path:
    """Create the store's root group if needed; refuse a directory that is something else."""
    p = Path(path)
    meta = p / "zarr.json"
    if meta.is_file():
        kind = _read_json(meta).get("attributes", {}).get("kneeprep", {}).get("kind")
        if kind != "volume_store":
            raise StoreError(f"{p}: a zarr group, but not a kneeprep volume store (kneeprep.kind = {kind!r})")
        return p
    if p.exists() and (not p.is_dir() or any(e.name not in (WORK_DIR, LOCK_FILE) for e in os.scandir(p))):
        raise StoreError(
            f"{p}: exists and is not a kneeprep volume store (no zarr.json); refusing to write into it"
        )
    p.mkdir(parents=True, exist_ok=True)
    zarr.open_group(str(p), mode="w", zarr_format=3, attributes={"kneeprep": dict(ROOT_ATTRS)})
    return p


def _check_store(store: str | os.PathLike) -> Path:
    p = Path(store)
    if not (p / "zarr.json").is_file():
        raise InputNotFoundError(f"{p}: no volume store here (expected a zarr.json)")
    return p


def list_volumes(store: str | os.PathLike) -> list[str]:
    """Ids of the complete volumes, sorted. Work-area entries are never listed."""
    p = _check_store(store)
    return sorted(
        e.name
        for e in os.scandir(p)
        if e.is_dir() and not e.name.startswith(".") and (Path(e.path) / "zarr.json").is_file()
    )


def volume_path(store: str | os.PathLike, volume_id: str) -> Path:
    p = Path(store) / volume_id
    if volume_id.startswith(".") or "/" in volume_id or not (p / "zarr.json").is_file():
        raise InputNotFoundError(f"{p}: no such volume in the store")
    return p


def clean_work_area(store: str | os.PathLike) -> list[str]:
    """Remove leftovers of interrupted writes (``.partial``/``.old`` in the work area); returns their names.

    Call only while holding the store's lock (:func:`kneeprep.files.lock`) (no writer is active then)."""
    work = Path(store) / WORK_DIR
    if not work.is_dir():
        return []
    removed = []
    for e in os.scandir(work):
        shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.unlink(e.path)
        removed.append(e.name)
    return sorted(removed)


# ----------------------------------------------------------------------------------------------------------
# writing


def write_volume(
    store: str | os.PathLike,
    volume_id: str,
    image: np.ndarray,
    geometry: Geometry,
    attrs: Mapping[str, Any],
    labels: Mapping[str, tuple[np.ndarray, Mapping[int, str]]] | None = None,
) -> Path:
    """Write one volume group atomically and return its path; an existing volume of that id is replaced.

    ``attrs`` are the ``kneeprep`` attributes (JSON-able; ``geometry`` is filled in from ``geometry``);
    ``labels`` maps a layer name to ``(label array on the same grid, label map)``.
    """
    root = Path(store)
    if not (root / "zarr.json").is_file():
        raise StoreError(f"{root}: not an initialised volume store (call init_store first)")
    if not volume_id or volume_id.startswith(".") or "/" in volume_id:
        raise StoreError(f"{root}: bad volume id {volume_id!r}")
    if image.shape != geometry.shape:
        raise StoreError(
            f"{root / volume_id}: image shape {image.shape} differs from its geometry {geometry.shape}"
        )
    labels = dict(labels or {})
    for name, (arr, _) in labels.items():
        if arr.shape != image.shape:
            raise StoreError(
                f"{root / volume_id}: label layer {name!r} has shape {arr.shape}, image {image.shape}"
            )
    meta = _jsonable({**attrs, "geometry": geometry.to_json()})
    _refuse_phi(meta, root / volume_id)
    work = root / WORK_DIR
    work.mkdir(exist_ok=True)
    tmp = work / f"{volume_id}.{uuid.uuid4().hex[:12]}.partial"
    try:
        group = zarr.open_group(
            str(tmp),
            mode="w-",
            zarr_format=3,
            attributes={"ome": _ome_image(volume_id, geometry), "kneeprep": meta},
        )
        _write_array(group, "image", image)
        if labels:
            lg = group.create_group(
                "labels", attributes={"ome": {"version": OME_VERSION, "labels": list(labels)}}
            )
            for name, (arr, label_map) in labels.items():
                layer = lg.create_group(name, attributes={"ome": _ome_label(name, geometry, label_map)})
                _write_array(layer, "0", arr)
        _install(tmp, root / volume_id)
    except StoreError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # ENOSPC, EDQUOT, EIO ... while writing the work copy: name the volume, leave nothing
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(
            f"{root / volume_id}: could not write the volume: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename else "")
            + "; the partial copy was removed, no volume was written"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / volume_id


def _write_array(group, name: str, data: np.ndarray) -> None:
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=choose_chunks(data.shape, data.dtype.itemsize),
        compressors=[_codec()],
        fill_value=0,
        dimension_names=("z", "y", "x"),
    )
    # One slab of chunks per call: zarr encodes every chunk of a call concurrently and holds a copy of each,
    # so a whole-volume assignment would add 1.7x the volume to peak memory; per slab it is one chunk, as fast.
    step = arr.chunks[0]
    with _blosc_threads(codec_threads()):
        for i in range(0, data.shape[0], step):
            arr[i : i + step] = data[i : i + step]


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted afterwards."""
    old = None
    if final.exists():
        old = tmp.with_name(tmp.name.replace(".partial", ".old"))
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if old is not None:
            os.rename(old, final)
        raise StoreError(f"{final}: could not move the new volume into place: {e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def delete_volume(store: str | os.PathLike, volume_id: str) -> None:
    """Remove a volume: moved into the work area first, so it disappears from listings at once."""
    p = volume_path(store, volume_id)
    gone = Path(store) / WORK_DIR / f"{volume_id}.{uuid.uuid4().hex[:12]}.old"
    gone.parent.mkdir(exist_ok=True)
    os.rename(p, gone)
    shutil.rmtree(gone, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# reading and attribute updates


def open_image(store: str | os.PathLike, volume_id: str):
    """The image as a lazy ``zarr.Array`` (read-only)."""
    return zarr.open_array(str(volume_path(store, volume_id) / "image"), mode="r")


def read_volume(store: str | os.PathLike, volume_id: str) -> tuple[np.ndarray, Geometry]:
    """The stored image and its :class:`Geometry`."""
    image = open_image(store, volume_id)[...]
    return image, Geometry.from_json(read_attrs(store, volume_id)["geometry"])


def label_names(store: str | os.PathLike, volume_id: str) -> list[str]:
    p = volume_path(store, volume_id) / "labels" / "zarr.json"
    return list(_read_json(p)["attributes"]["ome"]["labels"]) if p.is_file() else []


def read_labels(store: str | os.PathLike, volume_id: str, name: str | None = None) -> np.ndarray:
    """A label layer (default: the only or first one) as an array on the image grid."""
    names = label_names(store, volume_id)
    if not names:
        raise InputNotFoundError(f"{Path(store) / volume_id}: the volume has no label layers")
    name = name or names[0]
    if name not in names:
        raise InputNotFoundError(
            f"{Path(store) / volume_id}: no label layer {name!r} (has {', '.join(names)})"
        )
    return zarr.open_array(str(volume_path(store, volume_id) / "labels" / name / "0"), mode="r")[...]


def read_attrs(store: str | os.PathLike, volume_id: str) -> dict[str, Any]:
    """The volume's ``kneeprep`` attributes (``docs/DESIGN.md`` lists them)."""
    return _read_json(volume_path(store, volume_id) / "zarr.json")["attributes"]["kneeprep"]


def update_attrs(store: str | os.PathLike, volume_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Replace top-level ``kneeprep`` attribute keys (e.g. ``boxes`` after a recompute); returns the new attrs.

    The group's ``zarr.json`` is rewritten atomically (zarr's local store writes a temporary file and links
    it into place); one writer per store at a time (:func:`kneeprep.files.lock`)."""
    p = volume_path(store, volume_id)
    new = _jsonable({**read_attrs(store, volume_id), **changes})
    _refuse_phi(new, p)
    zarr.open_group(str(p), mode="r+").update_attributes({"kneeprep": new})
    return new


# ----------------------------------------------------------------------------------------------------------
# metadata helpers


def _ome_axes() -> list[dict]:
    return [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")]


def _ome_image(name: str, geometry: Geometry) -> dict:
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": _ome_axes(),
                "datasets": [
                    {
                        "path": "image",
                        "coordinateTransformations": [{"type": "scale", "scale": list(geometry.spacing)}],
                    }
                ],
            }
        ],
    }


def _ome_label(name: str, geometry: Geometry, label_map: Mapping[int, str]) -> dict:
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": _ome_axes(),
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [{"type": "scale", "scale": list(geometry.spacing)}],
                    }
                ],
            }
        ],
        "image-label": {
            "colors": [{"label-value": int(k), "rgba": _colour(int(k))} for k in sorted(label_map)],
            "properties": [{"label-value": int(k), "name": str(v)} for k, v in sorted(label_map.items())],
            "source": {"image": "../../"},
        },
    }


def _colour(label: int) -> list[int]:
    """A stable, well-spread colour per label id (golden-angle hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 0.95)
    return [int(r * 255), int(g * 255), int(b * 255), 255]


def _jsonable(obj: Any) -> Any:
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, tuple | set | frozenset):
            return list(o)
        raise TypeError(f"{type(o).__name__} is not JSON-serializable")

    return json.loads(json.dumps(obj, default=default, allow_nan=False))


def _refuse_phi(attrs: Any, where: Path) -> None:
    def walk(o, path):
        if isinstance(o, dict):
            for k, v in o.items():
                if k in PHI_KEYWORDS:
                    raise StoreError(
                        f"{where}: attribute {path}{k} is a patient-identifying DICOM field; not stored"
                    )
                walk(v, f"{path}{k}.")
        elif isinstance(o, list):
            for v in o:
                walk(v, path)

    walk(attrs, "")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable zarr metadata: {e}") from e
