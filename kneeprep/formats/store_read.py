"""Reading a stored volume -- its arrays, its ``kneeprep`` attrs (as a dict or a
:class:`~kneeprep.formats.volume_attrs.VolumeAttrs`) -- and updating its attrs; the guards every attrs write
passes (JSON-able values, no patient-identifying DICOM keyword).

Importers use :mod:`kneeprep.formats.store`, which re-exports everything here.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kneeprep.errors import InputNotFoundError, StoreError
from kneeprep.formats.store_paths import read_metadata, volume_path
from kneeprep.formats.volume_attrs import VolumeAttrs
from kneeprep.geometry import Geometry

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


# ----------------------------------------------------------------------------------------------------------
# reading


def open_image(store: str | os.PathLike, volume_id: str):
    """The image as a lazy ``zarr.Array`` (read-only)."""
    return zarr.open_array(str(volume_path(store, volume_id) / "image"), mode="r")


def read_volume(store: str | os.PathLike, volume_id: str) -> tuple[np.ndarray, Geometry]:
    """The stored image and its :class:`Geometry`."""
    image = open_image(store, volume_id)[...]
    return image, Geometry.from_json(read_attrs(store, volume_id)["geometry"])


def label_names(store: str | os.PathLike, volume_id: str) -> list[str]:
    p = volume_path(store, volume_id) / "labels" / "zarr.json"
    return list(read_metadata(p)["attributes"]["ome"]["labels"]) if p.is_file() else []


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
    return read_metadata(volume_path(store, volume_id) / "zarr.json")["attributes"]["kneeprep"]


def update_attrs(store: str | os.PathLike, volume_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Replace top-level ``kneeprep`` attribute keys (e.g. ``boxes`` after a recompute); returns the new attrs.

    The group's ``zarr.json`` is rewritten atomically (zarr's local store writes a temporary file and links
    it into place); one writer per store at a time (:func:`kneeprep.files.lock`)."""
    p = volume_path(store, volume_id)
    new = jsonable({**read_attrs(store, volume_id), **changes})
    refuse_phi(new, p)
    zarr.open_group(str(p), mode="r+").update_attributes({"kneeprep": new})
    return new


def read_volume_attrs(store: str | os.PathLike, volume_id: str) -> VolumeAttrs:
    """The volume's ``kneeprep`` attributes as a :class:`VolumeAttrs` record (a bad value: ``StoreError``
    naming the volume and the key). Inside :func:`attrs_cache`, parsed once while the file is unchanged."""
    p = volume_path(store, volume_id)
    meta = p / "zarr.json"
    cache = _ATTRS_CACHE.get()
    key = None
    if cache is not None:
        try:
            st = os.stat(meta)
            key = (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)
        except OSError:  # read_metadata says what is wrong
            key = None
        hit = cache.get(str(meta))
        if key is not None and hit is not None and hit[0] == key:
            return hit[1]
    attrs = VolumeAttrs.from_json(read_metadata(meta)["attributes"]["kneeprep"], where=p)
    if key is not None:
        cache[str(meta)] = (key, attrs)
    return attrs


_ATTRS_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "kneeprep_attrs_cache", default=None
)


@contextlib.contextmanager
def attrs_cache() -> Iterator[None]:
    """Within the block (in this thread), :func:`read_volume_attrs` parses a volume's ``zarr.json`` once and
    returns the same record again while the file is unchanged: same inode, device, size and modification time
    (every attrs write replaces the file: a new inode). ``kneeprep rebuild`` reads each volume's attrs in the
    convert stage's boxes table, the shards join and validate -- one parse instead of three (a volume's
    ``zarr.json`` is ~50 KB: most of it the boxes). Holds the records until the block ends, about what the
    shards stage holds anyway."""
    token = _ATTRS_CACHE.set({})
    try:
        yield
    finally:
        _ATTRS_CACHE.reset(token)


def derived_once(name: str, records: tuple, build: Callable[[], Any]) -> Any:
    """``build()``, made once inside :func:`attrs_cache` for the same attrs ``records`` (the very objects
    :func:`read_volume_attrs` returned, in the same order: a volume whose ``zarr.json`` changed is a new record,
    so the value is made again); outside the block, every time. For what is derived from every volume's attrs
    more than once per rebuild: the boxes table, written by convert and checked by validate."""
    cache = _ATTRS_CACHE.get()
    if cache is None:
        return build()
    hit = cache.get((_DERIVED, name))
    if (
        hit is not None
        and len(hit[0]) == len(records)
        and all(a is b for a, b in zip(hit[0], records, strict=True))
    ):
        return hit[1]
    value = build()
    cache[(_DERIVED, name)] = (records, value)
    return value


_DERIVED = object()  # keys of derived values in the attrs cache: never a zarr.json path


def update_volume_attrs(store: str | os.PathLike, volume_id: str, **changes: Any) -> VolumeAttrs:
    """:func:`update_attrs` with record fields: ``changes`` are :class:`VolumeAttrs` fields (``boxes=...``,
    ``provenance=Provenance(...)``); keys the record does not know are kept as they are. Returns the new record."""
    p = volume_path(store, volume_id)
    new = read_volume_attrs(store, volume_id).replace(**changes)
    meta = jsonable(new.to_json())
    refuse_phi(meta, p)
    zarr.open_group(str(p), mode="r+").update_attributes({"kneeprep": meta})
    return new


# ----------------------------------------------------------------------------------------------------------
# metadata helpers


def jsonable(obj: Any) -> Any:
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


def refuse_phi(attrs: Any, where: Path) -> None:
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
