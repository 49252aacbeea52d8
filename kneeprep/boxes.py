"""3D boxes of labelled regions, computed in one pass over a label array (the box type and its forms:
:mod:`kneeprep.formats.box`).

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

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kneeprep.errors import AnnotationError, MaskError
from kneeprep.formats.box import Box, margin_voxels, voxels_to_list_form, voxels_to_normalized
from kneeprep.geometry import Geometry
from kneeprep.moaks.anatomy import QUESTIONS

#: label arrays whose ids all lie in ``0..DIRECT_MAX_ID`` are histogrammed by raw id; others are first
#: mapped to compact codes (a lookup table, or a sorted search for very wide id ranges).
DIRECT_MAX_ID = 1023
_LUT_MAX_RANGE = 1 << 20


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
