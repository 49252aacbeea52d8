"""3D boxes of labelled regions, computed in one pass over a label array.

Box convention (``docs/DESIGN.md``, "Conventions")
--------------------------------------------------
* Boxes are in **voxel indices of the stored volume**, in **array order** ``(z, y, x)`` (SimpleITK's
  ``GetArrayFromImage`` order; for the sagittal DESS axis 0 runs across the 160 slices).
* ``Box.voxels`` is **half-open**: ``[z0, y0, x0, z1, y1, x1]`` with ``labels[z0:z1, y0:y1, x0:x1]`` exactly
  the smallest block holding every voxel of the region (plus the margin, if any). Upper bounds are exclusive.
* ``Box.list_form`` is the 3DReasonKnee form ``[start_slice, end_slice, x_min, x_max, y_min, y_max]`` with
  **inclusive** bounds: ``[z0, z1 - 1, x0, x1 - 1, y0, y1 - 1]``.
* ``Box.normalized`` is ``[z0/nz, y0/ny, x0/nx, z1/nz, y1/ny, x1/nx]`` (half-open, in ``[0, 1]``).
* Voxel centres sit at integer indices, so voxel ``i`` covers ``[i - 0.5, i + 0.5)``; ``Box.centroid`` (the mean
  index of the region's voxels) uses the same coordinates. ``Box.center_lps`` is the world (LPS, mm) position of
  the box's centre, index ``((z0 + z1 - 1) / 2, ...)``, through the geometry's ``affine_lps``; ``Box.size_mm`` is
  the box's extent along each array axis, ``(z1 - z0) * spacing_z, ...``.
* A margin of ``margin_mm`` grows the box by ``ceil(margin_mm / spacing)`` voxels on both sides of each axis,
  clipped to the volume. It changes ``voxels`` and every form derived from it, never ``voxel_count`` or
  ``centroid`` (those describe the mask itself).
* An empty region gives **no box**: ``empty=True`` and ``voxels``, ``list_form``, ``normalized``, ``size_mm``,
  ``center_lps`` and ``centroid`` all ``None``; never an invented box.

How the single pass works
-------------------------
:func:`label_stats` reads the array once, slice by slice along axis 0, and keeps for every label id its
**marginal histograms**: how many of its voxels lie in each z-slice, each y-row and each x-column (one
``np.bincount`` per slice over ``(row, label)`` and ``(column, label)`` keys). Everything else follows from
these small tables: a label's extent along an axis is the first and last non-zero bin, its voxel count the sum,
its centroid the bin-weighted mean. Because labels are disjoint, a region that is a union of labels has as
marginals the **sum** of its labels' marginals, so its box (the box of the union of boxes), count and centroid
are exact without touching the array again. Stats of blocks of one volume merge by adding marginals
(:meth:`LabelStats.merge`), the dask-image ``find_objects`` way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AnnotationError, MaskError
from .geometry import Geometry

#: label arrays whose ids all lie in ``0..DIRECT_MAX_ID`` are histogrammed by raw id; others are first
#: mapped to compact codes (a lookup table, or a sorted search for very wide id ranges).
DIRECT_MAX_ID = 1023
_LUT_MAX_RANGE = 1 << 20

BOXES_TABLE = "boxes.parquet"


# ----------------------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True)
class Box:
    """The box of one named region of one label array (conventions: module docstring)."""

    region: str
    label_ids: tuple[int, ...]
    #: half-open ``(z0, y0, x0, z1, y1, x1)`` in array order; None when empty.
    voxels: tuple[int, int, int, int, int, int] | None
    voxel_count: int
    #: mean array index ``(z, y, x)`` of the region's voxels; None when empty.
    centroid: tuple[float, float, float] | None
    #: box extent along array axes ``(z, y, x)`` in mm; None when empty or without a geometry.
    size_mm: tuple[float, float, float] | None
    #: world (LPS, mm) centre of the box; None when empty or without a geometry.
    center_lps: tuple[float, float, float] | None
    #: ``(z0/nz, y0/ny, x0/nx, z1/nz, y1/ny, x1/nx)``; None when empty.
    normalized: tuple[float, float, float, float, float, float] | None
    #: 3DReasonKnee ``(start_slice, end_slice, x_min, x_max, y_min, y_max)``, inclusive; None when empty.
    list_form: tuple[int, int, int, int, int, int] | None
    empty: bool
    margin_mm: float = 0.0

    def to_json(self) -> dict[str, Any]:
        def lst(v):
            return None if v is None else list(v)

        return {
            "region": self.region,
            "label_ids": list(self.label_ids),
            "voxels": lst(self.voxels),
            "voxel_count": self.voxel_count,
            "centroid": lst(self.centroid),
            "size_mm": lst(self.size_mm),
            "center_lps": lst(self.center_lps),
            "normalized": lst(self.normalized),
            "list_form": lst(self.list_form),
            "empty": self.empty,
            "margin_mm": self.margin_mm,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Box:
        def tup(key, kind):
            v = d.get(key)
            return None if v is None else tuple(kind(x) for x in v)

        return cls(
            region=str(d["region"]),
            label_ids=tuple(int(x) for x in d["label_ids"]),
            voxels=tup("voxels", int),
            voxel_count=int(d["voxel_count"]),
            centroid=tup("centroid", float),
            size_mm=tup("size_mm", float),
            center_lps=tup("center_lps", float),
            normalized=tup("normalized", float),
            list_form=tup("list_form", int),
            empty=bool(d["empty"]),
            margin_mm=float(d.get("margin_mm", 0.0)),
        )


# ----------------------------------------------------------------------------------------------------------
# conversions between box forms (pure; used by scoring and export)


def voxels_to_list_form(voxels: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """Half-open ``[z0, y0, x0, z1, y1, x1]`` -> 3DReasonKnee inclusive ``[start, end, x_min, x_max, y_min, y_max]``.

    >>> voxels_to_list_form([10, 20, 30, 15, 40, 31])
    (10, 14, 30, 30, 20, 39)
    """
    z0, y0, x0, z1, y1, x1 = (int(v) for v in voxels)
    if not (z0 < z1 and y0 < y1 and x0 < x1):
        raise ValueError(f"voxels {list(voxels)}: a half-open box needs z0 < z1, y0 < y1, x0 < x1")
    return (z0, z1 - 1, x0, x1 - 1, y0, y1 - 1)


def list_form_to_voxels(list_form: Sequence[int]) -> tuple[int, int, int, int, int, int]:
    """3DReasonKnee inclusive ``[start, end, x_min, x_max, y_min, y_max]`` -> half-open ``[z0, y0, x0, z1, y1, x1]``.

    >>> list_form_to_voxels([10, 14, 30, 30, 20, 39])
    (10, 20, 30, 15, 40, 31)
    """
    s, e, xa, xb, ya, yb = (int(v) for v in list_form)
    if not (s <= e and xa <= xb and ya <= yb):
        raise ValueError(f"list form {list(list_form)}: needs start <= end, x_min <= x_max, y_min <= y_max")
    return (s, ya, xa, e + 1, yb + 1, xb + 1)


def voxels_to_normalized(voxels: Sequence[int], shape: Sequence[int]) -> tuple[float, ...]:
    """Half-open voxels -> ``[z0/nz, y0/ny, x0/nx, z1/nz, y1/ny, x1/nx]``.

    >>> voxels_to_normalized([0, 96, 0, 80, 384, 192], (160, 384, 384))
    (0.0, 0.25, 0.0, 0.5, 1.0, 0.5)
    """
    n = [float(s) for s in shape] * 2
    return tuple(float(v) / d for v, d in zip(voxels, n, strict=True))


def normalized_to_voxels(normalized: Sequence[float], shape: Sequence[int]) -> tuple[int, ...]:
    """``[0, 1]``-normalized box -> half-open voxels on a grid of ``shape`` (rounded to the nearest index).

    >>> normalized_to_voxels((0.0, 0.25, 0.0, 0.5, 1.0, 0.5), (160, 384, 384))
    (0, 96, 0, 80, 384, 192)
    """
    n = list(shape) * 2
    return tuple(int(round(float(v) * d)) for v, d in zip(normalized, n, strict=True))


def margin_voxels(margin_mm: float, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxels added on each side per array axis for a margin in mm: ``ceil(margin_mm / spacing)``.

    >>> margin_voxels(1.0, (0.7, 0.3646, 0.3646))
    (2, 3, 3)
    >>> margin_voxels(0.7, (0.7, 0.35, 1.0))
    (1, 2, 1)
    """
    if margin_mm < 0:
        raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
    return tuple(int(math.ceil(margin_mm / float(s) - 1e-9)) if margin_mm else 0 for s in spacing)


# ----------------------------------------------------------------------------------------------------------
# one pass: marginal histograms per label


@dataclass(frozen=True)
class LabelStats:
    """Per-label marginal histograms of a label array of ``shape``.

    ``ids`` are the label values present (sorted, background 0 included when present); column ``c`` of
    ``per_z`` (``(nz, K)``), ``per_y`` (``(ny, K)``) and ``per_x`` (``(nx, K)``) counts the voxels of label
    ``ids[c]`` in each z-slice, y-row and x-column.
    """

    shape: tuple[int, int, int]
    ids: np.ndarray
    per_z: np.ndarray
    per_y: np.ndarray
    per_x: np.ndarray

    @property
    def counts(self) -> dict[int, int]:
        """Label id -> voxel count, for every id present (background included)."""
        return {int(i): int(c) for i, c in zip(self.ids, self.per_z.sum(axis=0), strict=True)}

    def unknown_labels(self, regions: Mapping[str, Sequence[int]], background: int = 0) -> dict[int, int]:
        """Ids present in the array but in no region (background excluded), with their voxel counts."""
        known = {int(i) for ids in regions.values() for i in ids} | {background}
        return {i: c for i, c in self.counts.items() if i not in known}

    def merge(self, other: LabelStats) -> LabelStats:
        """Stats of the union of two disjoint parts of the same volume (e.g. two chunks)."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge stats of shapes {self.shape} and {other.shape}")
        ids = np.union1d(self.ids, other.ids)
        out = []
        for name in ("per_z", "per_y", "per_x"):
            m = np.zeros((getattr(self, name).shape[0], ids.size), dtype=np.int64)
            for s in (self, other):
                m[:, np.searchsorted(ids, s.ids)] += getattr(s, name)
            out.append(m)
        return LabelStats(self.shape, ids, *out)

    def region_marginals(self, label_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Marginals of the union of ``label_ids`` (absent ids contribute nothing)."""
        wanted = np.unique(np.asarray(list(label_ids), dtype=np.int64))
        cols = np.flatnonzero(np.isin(self.ids, wanted))
        return tuple(m[:, cols].sum(axis=1) for m in (self.per_z, self.per_y, self.per_x))


def label_stats(
    labels: np.ndarray, offset: Sequence[int] = (0, 0, 0), shape: Sequence[int] | None = None
) -> LabelStats:
    """Read ``labels`` once and return its per-label marginal histograms.

    ``labels`` is a 3D integer (or bool) array in array order. To get stats of one block of a larger volume
    (for chunked processing), pass the block with its ``offset`` in the volume and the volume's ``shape``;
    merge blocks with :meth:`LabelStats.merge`. Memory beyond the marginals is a few slices' worth.
    """
    arr = _check_labels(labels)
    offset = tuple(int(o) for o in offset)
    shape = tuple(int(s) for s in (arr.shape if shape is None else shape))
    if (
        len(offset) != 3
        or len(shape) != 3
        or any(o < 0 or o + b > s for o, b, s in zip(offset, arr.shape, shape, strict=True))
    ):
        raise ValueError(
            f"block of shape {arr.shape} at offset {offset} does not fit in a volume of shape {shape}"
        )
    ids, encode = _encoder(arr)
    k = ids.size
    per_z = np.zeros((shape[0], k), dtype=np.int64)
    per_y = np.zeros((shape[1], k), dtype=np.int64)
    per_x = np.zeros((shape[2], k), dtype=np.int64)
    bz, by, bx = arr.shape
    oz, oy, ox = offset
    # When the codes are the raw ids (ids == 0..k-1), label 0 is not histogrammed: a slice that is mostly
    # background (masks usually are) is counted from its labelled voxels only, and the background's
    # marginals are what the other labels leave of each slice, row and column.
    skip_zero = k > 1 and ids[0] == 0 and ids[-1] == k - 1
    if arr.size:
        row_keys = (np.arange(by, dtype=np.intp) * k)[:, None]
        col_keys = np.arange(bx, dtype=np.intp) * k
        for i in range(bz):
            if skip_zero:
                flat = arr[i].reshape(-1)
                where = np.flatnonzero(flat)
                if where.size * 4 < flat.size:
                    codes = flat[where].astype(np.intp)
                    rows, cols = np.divmod(where, bx)
                    t = np.bincount(rows * k + codes, minlength=by * k).reshape(by, k)
                    per_y[oy : oy + by] += t
                    per_z[oz + i] += t.sum(axis=0)
                    per_x[ox : ox + bx] += np.bincount(cols * k + codes, minlength=bx * k).reshape(bx, k)
                    continue
            codes = encode(arr[i])
            t = np.bincount((codes + row_keys).ravel(), minlength=by * k).reshape(by, k)
            tx = np.bincount((codes + col_keys).ravel(), minlength=bx * k).reshape(bx, k)
            if skip_zero:
                t[:, 0] = 0
                tx[:, 0] = 0
            per_y[oy : oy + by] += t
            per_z[oz + i] += t.sum(axis=0)
            per_x[ox : ox + bx] += tx
        if skip_zero:
            per_z[oz : oz + bz, 0] = by * bx - per_z[oz : oz + bz, 1:].sum(axis=1)
            per_y[oy : oy + by, 0] = bz * bx - per_y[oy : oy + by, 1:].sum(axis=1)
            per_x[ox : ox + bx, 0] = bz * by - per_x[ox : ox + bx, 1:].sum(axis=1)
    keep = per_z.sum(axis=0) > 0
    return LabelStats(shape, ids[keep], per_z[:, keep], per_y[:, keep], per_x[:, keep])


def _check_labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype.kind not in "iu":
        raise MaskError(f"labels must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise MaskError(f"labels must be 3D (z, y, x), got shape {arr.shape}")
    return arr


def _encoder(arr: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``(ids, encode)``: the candidate label values and a function mapping a slice to codes (indices in ids)."""
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), lambda a: a
    lo, hi = int(arr.min()), int(arr.max())
    if hi >= 2**63:
        raise MaskError(f"label ids must fit in int64, got a maximum of {hi}")
    if lo >= 0 and hi <= DIRECT_MAX_ID:
        if arr.dtype == np.uint64:  # uint64 + intp would promote to float
            return np.arange(hi + 1, dtype=np.int64), lambda a: a.astype(np.intp)
        return np.arange(hi + 1, dtype=np.int64), lambda a: a
    if hi - lo < _LUT_MAX_RANGE:
        present = np.zeros(hi - lo + 1, dtype=bool)
        for sl in arr:
            present |= np.bincount((sl.astype(np.int64) - lo).ravel(), minlength=present.size) > 0
        ids = np.flatnonzero(present).astype(np.int64) + lo
        lut = np.zeros(hi - lo + 1, dtype=np.intp)
        lut[ids - lo] = np.arange(ids.size)
        return ids, lambda a: lut[a.astype(np.int64) - lo]
    ids = np.unique(arr).astype(np.int64)
    return ids, lambda a: np.searchsorted(ids, a.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------
# boxes from stats


def compute_boxes(
    labels: np.ndarray,
    regions: Mapping[str, Sequence[int]],
    geometry: Geometry | None = None,
    margin_mm: float = 0.0,
) -> dict[str, Box]:
    """The box of every region (name -> label ids) of ``labels``, from one pass over the array.

    Label ids found in the array but in no region are ignored here; :func:`label_stats` plus
    :meth:`LabelStats.unknown_labels` report them. ``geometry`` (same shape as ``labels``) gives the mm and world
    forms and is required for a non-zero ``margin_mm``.
    """
    return boxes_from_stats(label_stats(labels), regions, geometry, margin_mm)


def boxes_from_stats(
    stats: LabelStats,
    regions: Mapping[str, Sequence[int]],
    geometry: Geometry | None = None,
    margin_mm: float = 0.0,
) -> dict[str, Box]:
    """:func:`compute_boxes` on already computed :class:`LabelStats`."""
    if geometry is not None and tuple(geometry.shape) != tuple(stats.shape):
        raise MaskError(
            f"labels of shape {stats.shape} do not match the volume geometry's shape {geometry.shape}"
        )
    if margin_mm and geometry is None:
        raise ValueError(f"margin_mm={margin_mm} needs a geometry (its spacing turns mm into voxels)")
    margin = margin_voxels(margin_mm, geometry.spacing) if geometry is not None else (0, 0, 0)
    out = {}
    for region, ids in regions.items():
        ids = tuple(sorted({int(i) for i in ids}))
        out[region] = _box(region, ids, stats.region_marginals(ids), stats.shape, geometry, margin, margin_mm)
    return out


def _box(region, ids, marginals, shape, geometry, margin, margin_mm) -> Box:
    count = int(marginals[0].sum())
    if count == 0:
        return Box(region, ids, None, 0, None, None, None, None, None, True, float(margin_mm))
    lo, hi, centroid = [], [], []
    for m, n, pad in zip(marginals, shape, margin, strict=True):
        nz = np.flatnonzero(m)
        lo.append(max(int(nz[0]) - pad, 0))
        hi.append(min(int(nz[-1]) + 1 + pad, n))
        centroid.append(float(np.dot(np.arange(n, dtype=np.float64), m) / count))
    voxels = (*lo, *hi)
    size_mm = center = None
    if geometry is not None:
        size_mm = tuple(float((b - a) * s) for a, b, s in zip(lo, hi, geometry.spacing, strict=True))
        mid = [(a + b - 1) / 2.0 for a, b in zip(lo, hi, strict=True)]
        center = tuple(float(v) for v in geometry.index_to_world(mid))
    return Box(
        region=region,
        label_ids=ids,
        voxels=voxels,
        voxel_count=count,
        centroid=tuple(centroid),
        size_mm=size_mm,
        center_lps=center,
        normalized=voxels_to_normalized(voxels, shape),
        list_form=voxels_to_list_form(voxels),
        empty=False,
        margin_mm=float(margin_mm),
    )


# ----------------------------------------------------------------------------------------------------------
# recipe-level helpers


def boxes_for_volume(labels: np.ndarray, geometry: Geometry, recipe) -> list[Box]:
    """Boxes of every region of ``recipe.labels.region_labels()`` with ``recipe.boxes.margin_mm``, in region order."""
    regions = recipe.labels.region_labels()
    return list(compute_boxes(labels, regions, geometry, recipe.boxes.margin_mm).values())


def question_box(
    boxes_by_region: Mapping[str, Box] | Iterable[Box], recipe, question_id: str
) -> tuple[Box | None, str | None]:
    """The box question ``question_id`` gets, or ``(None, reason)``.

    Reasons: ``"no mask region for <finding>"`` (the recipe maps the question to no region) and
    ``"region <name> is empty in this mask"`` (or ``"... has no box in this volume"`` when the volume's boxes were
    computed without that region).
    """
    from .anatomy import QUESTIONS

    qid = str(question_id)
    if qid not in recipe.questions:
        raise AnnotationError(
            f"question {qid!r}: not in the recipe's question bank (ids 1..{len(recipe.questions)})"
        )
    if not isinstance(boxes_by_region, Mapping):
        boxes_by_region = {b.region: b for b in boxes_by_region}
    region = recipe.questions[qid]
    if not region:
        finding = QUESTIONS[qid].finding if qid in QUESTIONS else f"question {qid}"
        return None, f"no mask region for {finding}"
    box = boxes_by_region.get(region)
    if box is None:
        return None, f"region {region} has no box in this volume"
    if box.empty:
        return None, f"region {region} is empty in this mask"
    return box, None


def boxes_hash(recipe) -> str:
    """The ``provenance.boxes_hash`` of boxes computed with ``recipe`` (its ``labels`` and ``boxes`` sections)."""
    return recipe.stage_hash("boxes")


# ----------------------------------------------------------------------------------------------------------
# the store side: boxes.parquet and `kneeprep boxes`


def boxes_schema():
    """The Arrow schema of ``<store>/boxes.parquet`` (one row per volume and region)."""
    import pyarrow as pa

    i32 = pa.list_(pa.int32())
    f64 = pa.list_(pa.float64())
    return pa.schema(
        [
            pa.field("volume_id", pa.string(), nullable=False),
            pa.field("region", pa.string(), nullable=False),
            pa.field("label_ids", i32, nullable=False),
            pa.field("empty", pa.bool_(), nullable=False),
            pa.field("voxel_count", pa.int64(), nullable=False),
            pa.field("voxels", i32),  # half-open [z0, y0, x0, z1, y1, x1]
            pa.field("list_form", i32),  # [start_slice, end_slice, x_min, x_max, y_min, y_max], inclusive
            pa.field("normalized", f64),
            pa.field("size_mm", f64),
            pa.field("center_lps", f64),
            pa.field("centroid", f64),
            pa.field("margin_mm", pa.float64(), nullable=False),
        ]
    )


def write_boxes_table(store_path: str | os.PathLike) -> Path:
    """Write ``<store>/boxes.parquet`` from every complete volume's ``kneeprep.boxes`` attrs; return its path.

    Written to a ``.partial`` file and renamed, so readers never see half a table.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import store

    store_path = Path(store_path)
    schema = boxes_schema()
    rows = []
    for vid in sorted(store.list_volumes(store_path)):
        attrs = store.read_attrs(store_path, vid)
        for b in attrs.get("boxes") or []:
            d = Box.from_json(b).to_json()
            rows.append({"volume_id": attrs.get("volume_id", vid), **d})
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    out = store_path / BOXES_TABLE
    tmp = out.with_name(out.name + ".partial")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class BoxesSummary:
    """What :func:`recompute_store_boxes` did."""

    volumes: int
    boxes: int
    empty: int
    #: volume id -> {label id: voxel count} of labels in no region.
    unknown_labels: dict[str, dict[int, int]]
    #: ``(volume_id, kind, message)`` of volumes whose boxes could not be recomputed.
    failures: tuple[tuple[str, str, str], ...]
    table: str
    boxes_hash: str
    #: volumes left as they were (``stale_only``: boxes already made with this recipe, or no labels).
    unchanged: int = 0

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("volumes", "boxes", "empty", "table", "boxes_hash", "unchanged")}
        d["unknown_labels"] = {v: {str(i): c for i, c in u.items()} for v, u in self.unknown_labels.items()}
        d["failures"] = [list(f) for f in self.failures]
        return json.loads(json.dumps(d))


def recompute_store_boxes(
    store_path: str | os.PathLike,
    recipe,
    *,
    lock: bool = True,
    stale_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> BoxesSummary:
    """Recompute every volume's boxes from its stored labels (layer ``recipe.masks.name``) with ``recipe``.

    With ``stale_only``, volumes whose ``provenance.boxes_hash`` already equals this recipe's boxes-stage hash,
    and volumes without that label layer, are left alone (counted in ``unchanged``); ``boxes.parquet`` is
    rewritten only if some volume changed or it is missing.

    Updates the volume attrs ``boxes`` and ``provenance.boxes_hash``, rewrites ``boxes.parquet`` and returns a
    summary. A volume that fails (no labels, bad geometry) is recorded in ``failures``, never raised. Holds the
    store's writer lock (:func:`kneeprep.store.store_lock`) unless ``lock=False`` (a caller already holding it).
    ``progress(done, total)`` is called after each volume.
    """
    from . import store

    store_path = Path(store_path)
    store.list_volumes(store_path)  # a missing store is an error before anything is locked or written
    with store.store_lock(store_path) if lock else contextlib.nullcontext():
        return _recompute(store_path, recipe, stale_only, progress)


def _recompute(store_path: Path, recipe, stale_only: bool = False, progress=None) -> BoxesSummary:
    from . import store
    from .errors import KneeprepError

    regions = recipe.labels.region_labels()
    h = boxes_hash(recipe)
    n_vol = n_box = n_empty = n_same = 0
    unknown: dict[str, dict[int, int]] = {}
    failures = []
    vids = sorted(store.list_volumes(store_path))
    for done, vid in enumerate(vids):
        if progress is not None and done:
            progress(done, len(vids))
        try:
            attrs = store.read_attrs(store_path, vid)
            if stale_only and (
                (attrs.get("provenance") or {}).get("boxes_hash") == h
                or recipe.masks.name not in store.label_names(store_path, vid)
            ):
                n_same += 1
                continue
            geometry = Geometry.from_json(attrs["geometry"])
            labels = np.asarray(store.read_labels(store_path, vid, recipe.masks.name))
            stats = label_stats(labels)
            boxes = boxes_from_stats(stats, regions, geometry, recipe.boxes.margin_mm)
            provenance = dict(attrs.get("provenance") or {})
            provenance["boxes_hash"] = h
            store.update_attrs(
                store_path, vid, {"boxes": [b.to_json() for b in boxes.values()], "provenance": provenance}
            )
        except KneeprepError as e:
            failures.append((vid, e.kind, str(e)))
            continue
        except KeyError as e:
            failures.append((vid, "store", f"{store_path / vid}: attrs lack {e}"))
            continue
        n_vol += 1
        n_box += sum(not b.empty for b in boxes.values())
        n_empty += sum(b.empty for b in boxes.values())
        u = stats.unknown_labels(regions)
        if u:
            unknown[vid] = u
    if progress is not None and vids:
        progress(len(vids), len(vids))
    table = store_path / BOXES_TABLE
    if n_vol or failures or not table.is_file():
        table = write_boxes_table(store_path)
    return BoxesSummary(n_vol, n_box, n_empty, unknown, tuple(failures), str(table), h, n_same)
