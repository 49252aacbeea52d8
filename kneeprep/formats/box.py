"""The one box type: a labelled region's 3D box in every form kneeprep writes, and the conversions between them.

Box convention (``docs/DESIGN.md``, "Conventions")
--------------------------------------------------
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

* :func:`iou` is the true 3D IoU of two half-open boxes (voxels in both over voxels in either).

``boxes.parquet`` (:func:`boxes_schema`) holds one :class:`Box` per volume and region, as :meth:`Box.to_json`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from kneeprep.errors import AnnotationError

#: half-open ``(z0, y0, x0, z1, y1, x1)`` voxel indices in array order
Voxels = tuple[int, int, int, int, int, int]
BOXES_TABLE = "boxes.parquet"
#: beside the boxes table while a run may change volumes; left by a killed run: the table must be rewritten
BOXES_TABLE_STALE = ".boxes-stale"


@dataclass(frozen=True)
class Box:
    """The box of one named region of one label array (conventions: module docstring)."""

    region: str
    #: the label ids the region is made of (``()`` on a quintuple's box: the shards do not carry them).
    label_ids: tuple[int, ...]
    #: half-open ``(z0, y0, x0, z1, y1, x1)`` in array order; None when empty.
    voxels: Voxels | None
    #: voxels of the region in the mask (None on a quintuple's box).
    voxel_count: int | None
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
            return None if v is None else tuple(map(kind, v))

        return cls(
            region=str(d["region"]),
            label_ids=tuple(map(int, d.get("label_ids") or ())),
            voxels=tup("voxels", int),
            voxel_count=None if d.get("voxel_count") is None else int(d["voxel_count"]),
            centroid=tup("centroid", float),
            size_mm=tup("size_mm", float),
            center_lps=tup("center_lps", float),
            normalized=tup("normalized", float),
            list_form=tup("list_form", int),
            empty=bool(d.get("empty", d.get("voxels") is None)),
            margin_mm=float(d.get("margin_mm", 0.0)),
        )

    def extent(self) -> Box:
        """This box without the mask's statistics (label ids, voxel count, centroid): what a quintuple carries
        and a shard row stores."""
        return Box(
            region=self.region, label_ids=(), voxels=self.voxels, voxel_count=None, centroid=None,
            size_mm=self.size_mm, center_lps=self.center_lps, normalized=self.normalized,
            list_form=self.list_form, empty=self.empty, margin_mm=0.0,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# conversions between box forms (pure)


def six_ints(values: Any, what: str = "box") -> tuple[int, int, int, int, int, int]:
    """Six integers (floats with integer values accepted) or an ``AnnotationError`` that says what came."""
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise AnnotationError(f"{what} must be a list of 6 integers, got {values!r}"[:200])
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise AnnotationError(f"{what} must be a list of 6 integers, got {values!r}"[:200])
        out.append(int(v))
    if len(out) != 6:
        raise AnnotationError(f"{what} must be a list of 6 integers, got {len(out)} values")
    return tuple(out)  # type: ignore[return-value]


def check_voxels(voxels: Iterable[int]) -> Voxels:
    """Half-open voxels, checked: six integers with ``0 <= z0 < z1``, ``0 <= y0 < y1``, ``0 <= x0 < x1``."""
    b = six_ints(voxels, "half-open box")
    if not (0 <= b[0] < b[3] and 0 <= b[1] < b[4] and 0 <= b[2] < b[5]):
        raise AnnotationError(f"half-open box {list(b)}: needs 0 <= z0 < z1, 0 <= y0 < y1, 0 <= x0 < x1")
    return b


def voxels_to_list_form(voxels: Iterable[int]) -> tuple[int, int, int, int, int, int]:
    """Half-open ``[z0, y0, x0, z1, y1, x1]`` -> 3DReasonKnee inclusive ``[start, end, x_min, x_max, y_min, y_max]``.

    >>> voxels_to_list_form([10, 20, 30, 15, 40, 31])
    (10, 14, 30, 30, 20, 39)
    """
    z0, y0, x0, z1, y1, x1 = check_voxels(voxels)
    return (z0, z1 - 1, x0, x1 - 1, y0, y1 - 1)


def list_form_to_voxels(list_form: Iterable[int]) -> Voxels:
    """3DReasonKnee inclusive ``[start, end, x_min, x_max, y_min, y_max]`` -> half-open ``[z0, y0, x0, z1, y1, x1]``.

    >>> list_form_to_voxels([10, 14, 30, 30, 20, 39])
    (10, 20, 30, 15, 40, 31)
    """
    s, e, xa, xb, ya, yb = six_ints(list_form, "list-form box")
    if not (s <= e and xa <= xb and ya <= yb) or min(s, xa, ya) < 0:
        raise AnnotationError(
            f"list-form box {list(list_form)}: needs 0 <= start <= end, x_min <= x_max, y_min <= y_max"
        )
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


def box_volume(voxels: Sequence[int]) -> int:
    """Voxels inside a half-open box (0 when it is empty or inverted)."""
    return max(0, voxels[3] - voxels[0]) * max(0, voxels[4] - voxels[1]) * max(0, voxels[5] - voxels[2])


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """True IoU of two half-open voxel boxes: voxels in both over voxels in either.

    >>> iou((0, 0, 0, 2, 2, 2), (1, 1, 1, 3, 3, 3))  # 1 shared voxel, 8 + 8 - 1 = 15 in the union
    0.06666666666666667
    """
    inter = box_volume(tuple(max(a[i], b[i]) for i in range(3)) + tuple(min(a[i], b[i]) for i in range(3, 6)))
    union = box_volume(a) + box_volume(b) - inter
    return inter / union if union else 0.0


def boxes_schema() -> pa.Schema:
    """The Arrow schema of ``<store>/boxes.parquet`` (one row per volume and region)."""
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
