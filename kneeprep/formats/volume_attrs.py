"""A volume's ``kneeprep`` attributes as a typed, frozen record: :class:`VolumeAttrs`.

The convert stage builds one and writes :meth:`VolumeAttrs.to_json` into the volume group's ``zarr.json``
(``docs/DESIGN.md``, "Volume store", lists the keys); readers get it back with
:func:`kneeprep.formats.store.read_volume_attrs` instead of looking keys up in a dict. The nested parts are
records too (:class:`Source`, :class:`Qc`, :class:`LabelLayer`, :class:`Provenance`); the geometries are
:class:`kneeprep.geometry.Geometry`; the parts that are parameter records of their own modules
(``transforms``, ``normalization``), the DICOM whitelist (``dicom``), ``image_set`` and the boxes
(``Box.to_json()`` each; :meth:`VolumeAttrs.box_records` parses them) stay JSON values.

**Lossless.** ``VolumeAttrs.from_json(d).to_json() == d``, keys in the same order, for every store kneeprep
writes or wrote (a record read, changed and written back changes only what was changed):

* a key the record does not know (a newer or older writer's) is kept in ``extra`` and written back where it
  was;
* a known key that is absent (an older store; the minimal attrs tests write) is ``None`` and stays absent;
  ``keys`` holds the key order as read; a field set later is appended, as a dict update would.

**Validation** (``__post_init__``, as zarr-python's codecs do): a value of the wrong type or an impossible one
(a knee side other than 1 or 2, an unknown dtype, a negative file count ...) raises
:class:`~kneeprep.errors.StoreError` naming the volume (``from_json``: and where the attrs came from) and the key.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kneeprep.errors import StoreError
from kneeprep.formats.box import Box
from kneeprep.geometry import Geometry


def _bad(what: str, expected: str, value: Any) -> StoreError:
    shown = repr(value)
    return StoreError(f"attrs {what}: expected {expected}, got {shown[:120]} ({type(value).__name__})")


def _check(record, name: str, ok, expected: str) -> None:
    value = getattr(record, name)
    if value is not None and not ok(value):
        raise _bad(f"{record.WHAT}{name}", expected, value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, tuple) and all(isinstance(x, str) for x in v)


def _int_list(v) -> bool:
    return isinstance(v, tuple) and all(_is_int(x) for x in v)


def _json_copy(v: Any) -> Any:
    """A copy of a JSON value (tuples become lists, as in JSON); much faster than ``copy.deepcopy``."""
    if isinstance(v, dict):
        return {k: _json_copy(x) for k, x in v.items()}
    return [_json_copy(x) for x in v] if isinstance(v, list | tuple) else v


class _Record:
    """What the records share: JSON conversion in the order read, unknown keys kept (module docstring).

    A subclass lists its JSON keys in order (``KEYS``: key -> (decode, encode)); a record built with
    :meth:`new` writes every key but the ``OPTIONAL`` ones not given (``description`` only with
    ``keep_free_text``)."""

    __slots__ = ()
    KEYS: ClassVar[dict[str, tuple[Any, Any]]] = {}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    WHAT: ClassVar[str] = ""

    @classmethod
    def new(cls, **fields):
        """A record written from scratch: every key in the canonical order (``OPTIONAL`` ones only when given)."""
        keys = tuple(k for k in cls.KEYS if k not in cls.OPTIONAL or k in fields)
        return cls(**fields, keys=keys)

    @classmethod
    def _from_json(cls, d: Any, what: str):
        if not isinstance(d, Mapping):
            raise _bad(what.rstrip(".") or "(the attrs)", "an object", d)
        kw = {
            k: None if d[k] is None else dec(d[k], f"{what}{k}") for k, (dec, _) in cls.KEYS.items() if k in d
        }
        extra = {k: v for k, v in d.items() if k not in cls.KEYS}  # taken over, not copied (from_json)
        return cls(**kw, extra=extra, keys=tuple(d))

    def __eq__(self, other) -> bool:  # by value, as written (Geometry holds an array: no field-wise ==)
        return type(other) is type(self) and other.to_json() == self.to_json()

    __hash__ = None

    def to_json(self, *, copy: bool = True) -> dict[str, Any]:
        """The JSON object, keys in the order read or written: fresh (the record is not shared), or with
        ``copy=False`` the record's own JSON values (lists may be tuples: for ``json.dumps``, not for changing)."""
        out: dict[str, Any] = {}
        order = list(self.keys)
        order += [k for k in self.KEYS if k not in self.keys and getattr(self, k) is not None]
        order += [k for k in self.extra if k not in self.keys]
        for k in order:
            if k in self.KEYS:
                v = getattr(self, k)
                encode = self.KEYS[k][1]
                out[k] = None if v is None else v if not copy and encode is _json_copy else encode(v)
            elif k in self.extra:
                out[k] = _json_copy(self.extra[k]) if copy else self.extra[k]
        return out


# ----------------------------------------------------------------------------------------------------------
# decoders (JSON -> field value), with the key path for the message


def _as_is(v, what):
    return v


def _tuple_of(v, what):
    if not isinstance(v, list | tuple):
        raise _bad(what, "a list", v)
    return tuple(v)


def _geometry(v, what) -> Geometry:
    try:
        return Geometry.from_json(v)
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(what, f"a geometry (shape, spacing, 4x4 affine_lps; {type(e).__name__}: {e})", v) from None


def _mapping(v, what):
    if not isinstance(v, Mapping):
        raise _bad(what, "an object", v)
    return dict(v)


def _boxes(v, what):
    if not isinstance(v, list | tuple) or not all(isinstance(b, Mapping) for b in v):
        raise _bad(what, "a list of box objects", v)
    return tuple(b if isinstance(b, dict) else dict(b) for b in v)


def _record_of(cls):
    return lambda v, what: cls._from_json(v, f"{what}.")


def _layers(v, what):
    if not isinstance(v, Mapping):
        raise _bad(what, "an object of label layers", v)
    return {str(k): LabelLayer._from_json(layer, f"{what}.{k}.") for k, layer in v.items()}


_to_json = operator.methodcaller("to_json")
_PLAIN = (_as_is, _json_copy)
_TUPLE = (_tuple_of, list)
_GEOMETRY = (_geometry, _to_json)
_MAPPING = (_mapping, _json_copy)


# ----------------------------------------------------------------------------------------------------------
# the records


@dataclass(frozen=True, slots=True, eq=False)
class Source(_Record):
    """``source``: the series a volume came from (no free text unless the recipe keeps it)."""

    series_uid: str | None = None
    n_files: int | None = None
    files: tuple[str, ...] | None = None
    content_hash: str | None = None
    #: file names, sizes, mtimes, series UID and the mask file's (kneeprep.stages.resume.input_fingerprint)
    fingerprint: str | None = None
    description: str | None = None
    study_description: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    KEYS: ClassVar = {
        "series_uid": _PLAIN, "n_files": _PLAIN, "files": _TUPLE, "content_hash": _PLAIN,
        "fingerprint": _PLAIN, "description": _PLAIN, "study_description": _PLAIN,
    }  # fmt: skip
    OPTIONAL: ClassVar = frozenset({"description", "study_description"})
    WHAT: ClassVar = "source."

    def __post_init__(self):
        for name in ("series_uid", "content_hash", "fingerprint", "description", "study_description"):
            _check(self, name, lambda v: isinstance(v, str), "a string")
        _check(self, "n_files", lambda v: _is_int(v) and v >= 0, "a file count (an integer >= 0)")
        _check(self, "files", _str_list, "a list of file names")


@dataclass(frozen=True, slots=True, eq=False)
class Qc(_Record):
    """``qc``: the scan's verdict on the series."""

    status: str | None = None
    reasons: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    KEYS: ClassVar = {"status": _PLAIN, "reasons": _TUPLE}
    WHAT: ClassVar = "qc."
    STATUSES: ClassVar = ("ok", "warn", "fail", "unsupported")

    def __post_init__(self):
        _check(self, "status", lambda v: v in self.STATUSES, f"one of {', '.join(self.STATUSES)}")
        _check(self, "reasons", _str_list, "a list of strings")


@dataclass(frozen=True, slots=True, eq=False)
class LabelLayer(_Record):
    """``labels.<name>``: one label layer -- its label map, the mask file it was placed from, how it fit."""

    label_map: Mapping[str, str] | None = None
    source: str | None = None
    content_hash: str | None = None
    present: tuple[int, ...] | None = None
    unknown_labels: tuple[int, ...] | None = None
    grid_coverage: float | None = None
    label_coverage: float | None = None
    acquired_geometry: Geometry | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    KEYS: ClassVar = {
        "label_map": _MAPPING, "source": _PLAIN, "content_hash": _PLAIN, "present": _TUPLE,
        "unknown_labels": _TUPLE, "grid_coverage": _PLAIN, "label_coverage": _PLAIN, "acquired_geometry": _GEOMETRY,
    }  # fmt: skip
    WHAT: ClassVar = "labels."

    def __post_init__(self):
        _check(self, "label_map", lambda m: all(isinstance(v, str) for v in m.values()), "label id -> name")
        _check(self, "source", lambda v: isinstance(v, str), "a file name")
        _check(self, "content_hash", lambda v: isinstance(v, str), "a string")
        _check(self, "present", _int_list, "a list of label ids")
        _check(self, "unknown_labels", _int_list, "a list of label ids")
        for name in ("grid_coverage", "label_coverage"):
            _check(self, name, lambda v: _is_num(v) and v >= 0, "a fraction (a number >= 0)")
        _check(self, "acquired_geometry", lambda g: isinstance(g, Geometry), "a Geometry")

    def label_ids(self) -> dict[int, str]:
        """The label map with integer ids."""
        return {int(k): v for k, v in (self.label_map or {}).items()}


@dataclass(frozen=True, slots=True, eq=False)
class Provenance(_Record):
    """``provenance``: the recipe and the stage hashes the volume was made with."""

    recipe_name: str | None = None
    recipe_hash: str | None = None
    convert_hash: str | None = None
    #: ``recipe.stage_hash("boxes")`` of the boxes stored; None for a volume without labels
    boxes_hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    KEYS: ClassVar = dict.fromkeys(("recipe_name", "recipe_hash", "convert_hash", "boxes_hash"), _PLAIN)
    WHAT: ClassVar = "provenance."

    def __post_init__(self):
        for name in self.KEYS:
            _check(self, name, lambda v: isinstance(v, str), "a string")


def _dtype_name(v) -> bool:
    try:
        return isinstance(v, str) and np.dtype(v).name == v
    except TypeError:
        return False


@dataclass(frozen=True, slots=True, eq=False)
class VolumeAttrs(_Record):
    """A volume group's ``kneeprep`` attributes (``docs/DESIGN.md``, "Volume store"). Only ``volume_id`` is
    required; the rest is None where a store lacks it (module docstring)."""

    volume_id: str
    format_version: int | None = None
    kneeprep_version: str | None = None
    patient_id: str | None = None
    time: str | None = None
    study_folder: str | None = None
    series_folder: str | None = None
    knee_side: int | None = None
    acquired_geometry: Geometry | None = None
    mirrored: bool | None = None
    dtype: str | None = None
    #: ``orient``, ``mirror``, ``resample`` params (``kneeprep.transforms``' ``*.to_json()``)
    transforms: Mapping[str, Any] | None = None
    normalization: Mapping[str, Any] | None = None
    source: Source | None = None
    #: technical DICOM fields from a whitelist
    dicom: Mapping[str, Any] | None = None
    #: which echo / time point / ... of a split series (docs/FORMATS.md, "Image-set suffix"); None otherwise
    image_set: Mapping[str, Any] | None = None
    qc: Qc | None = None
    labels: Mapping[str, LabelLayer] | None = None
    #: ``Box.to_json()`` of every region (:meth:`box_records` parses them)
    boxes: tuple[Mapping[str, Any], ...] | None = None
    provenance: Provenance | None = None
    #: the stored grid (written last, by ``store.write_volume``)
    geometry: Geometry | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    keys: tuple[str, ...] = ()

    KEYS: ClassVar = {
        "format_version": _PLAIN, "kneeprep_version": _PLAIN, "volume_id": _PLAIN, "patient_id": _PLAIN,
        "time": _PLAIN, "study_folder": _PLAIN, "series_folder": _PLAIN, "knee_side": _PLAIN,
        "acquired_geometry": _GEOMETRY, "mirrored": _PLAIN, "dtype": _PLAIN, "transforms": _MAPPING,
        "normalization": _MAPPING, "source": (_record_of(Source), _to_json), "dicom": _MAPPING,
        "image_set": _MAPPING, "qc": (_record_of(Qc), _to_json),
        "labels": (_layers, lambda m: {k: v.to_json() for k, v in m.items()}), "boxes": (_boxes, _json_copy),
        "provenance": (_record_of(Provenance), _to_json), "geometry": _GEOMETRY,
    }  # fmt: skip
    WHAT: ClassVar = ""

    def __post_init__(self):
        try:
            self._validate()
        except StoreError as e:
            raise StoreError(f"volume {self.volume_id!r}: {e}") from None

    def _validate(self) -> None:
        if not isinstance(self.volume_id, str) or not self.volume_id:
            raise _bad("volume_id", "a non-empty string", self.volume_id)
        _check(self, "format_version", lambda v: _is_int(v) and v >= 1, "a format version (an integer >= 1)")
        for name in ("kneeprep_version", "patient_id", "time", "study_folder", "series_folder"):
            _check(self, name, lambda v: isinstance(v, str), "a string")
        _check(self, "knee_side", lambda v: _is_int(v) and v in (1, 2), "1 (right) or 2 (left)")
        _check(self, "mirrored", lambda v: isinstance(v, bool), "true or false")
        _check(self, "dtype", _dtype_name, "a numpy dtype name")
        for name in ("acquired_geometry", "geometry"):
            _check(self, name, lambda g: isinstance(g, Geometry), "a Geometry")
        for name in ("transforms", "normalization", "dicom", "image_set"):
            _check(self, name, lambda v: isinstance(v, Mapping), "an object")
        for name, cls in (("source", Source), ("qc", Qc), ("provenance", Provenance)):
            _check(self, name, lambda v, cls=cls: isinstance(v, cls), f"a {cls.__name__} record")
        _check(self, "labels", lambda m: all(isinstance(v, LabelLayer) for v in m.values()), "label layers")
        _check(self, "boxes", lambda v: isinstance(v, tuple), "a tuple of box objects")

    @classmethod
    def from_json(cls, d: Any, where: Any = None) -> VolumeAttrs:
        """The record of a volume's attrs as stored; ``where`` (the volume's path, say) prefixes every error.
        ``d``'s nested JSON parts are taken over, not copied (a volume's boxes are thousands of values, read
        several times per run): pass a copy if you go on changing ``d``; :meth:`to_json` returns a fresh one."""
        try:
            if isinstance(d, Mapping) and "volume_id" not in d:
                raise StoreError("attrs volume_id: missing")
            return cls._from_json(d, "")
        except StoreError as e:
            msg = str(e)
            if isinstance(d, Mapping) and not msg.startswith("volume "):  # a nested record's: name the volume
                msg = f"volume {d.get('volume_id')!r}: {msg}"
            raise StoreError(f"{where}: {msg}" if where is not None else msg) from None

    @classmethod
    def of(cls, attrs: VolumeAttrs | Mapping[str, Any], where: Any = None) -> VolumeAttrs:
        """``attrs`` as a record (a JSON object is read with :meth:`from_json`)."""
        return attrs if isinstance(attrs, VolumeAttrs) else cls.from_json(attrs, where)

    def replace(self, **changes) -> VolumeAttrs:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # what readers need, without ``.get(...) or {}``

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.geometry is None:
            raise StoreError(f"volume {self.volume_id!r}: attrs geometry: missing")
        return self.geometry.shape

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the image (``geometry.shape`` and ``dtype``)."""
        if self.dtype is None:
            raise StoreError(f"volume {self.volume_id!r}: attrs dtype: missing")
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def qc_status(self) -> str:
        """The QC status (``ok`` when none was recorded)."""
        return (self.qc.status if self.qc else None) or "ok"

    @property
    def qc_reasons(self) -> tuple[str, ...]:
        return (self.qc.reasons if self.qc else None) or ()

    @property
    def convert_hash(self) -> str | None:
        return self.provenance.convert_hash if self.provenance else None

    @property
    def boxes_hash(self) -> str | None:
        return self.provenance.boxes_hash if self.provenance else None

    def box_records(self) -> list[Box]:
        """The stored boxes as :class:`~kneeprep.formats.box.Box` records (empty when none)."""
        return [Box.from_json(b) for b in self.boxes or ()]


__all__ = ["LabelLayer", "Provenance", "Qc", "Source", "VolumeAttrs"]
