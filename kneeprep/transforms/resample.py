"""Resample a volume to a target spacing and/or shape, keeping its field of view and direction.

* ``spacing`` only: the new shape is ``round(shape * old_spacing / spacing)`` per axis (at least 1);
* ``shape`` only: the new spacing is ``old_spacing * shape / new_shape``, so the physical extent
  (``shape * spacing``, voxel edge to edge) is kept exactly;
* both: exactly that grid (crop or pad around the centre).

In every case the new grid has the old direction cosines and the same centre in world space; only spacing,
shape and origin change. Interpolation is SimpleITK's (``linear``, ``bspline``, ``nearest``); points outside
the source grid get 0. Integer images are interpolated in float and rounded back to their dtype, clipped to
its range (B-spline overshoot), so normalization ``none`` still sees DICOM-like integers. Labels use
``nearest`` and keep their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from kneeprep.errors import GeometryError
from kneeprep.geometry import Geometry

INTERPOLATORS = ("linear", "bspline", "nearest")


@dataclass(frozen=True)
class ResampleParams:
    """The target grid (``None``: keep the source grid) and the interpolator."""

    target: Geometry | None
    interpolator: str = "linear"

    def to_json(self) -> dict:
        return {
            "target": None if self.target is None else self.target.to_json(),
            "interpolator": self.interpolator,
        }

    @classmethod
    def from_json(cls, d: dict) -> ResampleParams:
        return cls(None if d["target"] is None else Geometry.from_json(d["target"]), d["interpolator"])


def centred_grid(geometry: Geometry, shape, spacing) -> Geometry:
    """A grid with ``geometry``'s direction and centre and the given shape and spacing (array order)."""
    a = geometry.affine_lps
    unit = a[:3, :3] / np.asarray(geometry.spacing)[None, :]
    centre = a[:3, 3] + a[:3, :3] @ ((np.asarray(geometry.shape) - 1) / 2)
    affine = np.eye(4)
    affine[:3, :3] = unit * np.asarray(spacing, dtype=np.float64)[None, :]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return Geometry(tuple(shape), tuple(spacing), affine)


def plan_resample(geometry: Geometry, spacing=(), shape=(), interpolator: str = "linear") -> ResampleParams:
    """Choose the target grid from a recipe's ``geometry.spacing`` and ``geometry.shape`` (either may be empty).

    >>> g = Geometry((160, 384, 384), (0.7, 0.3646, 0.3646), np.diag([0.7, 0.3646, 0.3646, 1.0]))
    >>> [round(v, 4) for v in plan_resample(g, shape=(32, 256, 256)).target.spacing]
    [3.5, 0.5469, 0.5469]
    >>> plan_resample(g, spacing=(1.0, 1.0, 1.0)).target.shape
    (112, 140, 140)
    """
    if interpolator not in INTERPOLATORS:
        raise GeometryError(f"interpolator {interpolator!r}: expected one of {', '.join(INTERPOLATORS)}")
    old_shape = np.asarray(geometry.shape, dtype=np.float64)
    old_spacing = np.asarray(geometry.spacing, dtype=np.float64)
    if not spacing and not shape:
        return ResampleParams(None, interpolator)
    if spacing and len(spacing) != 3 or shape and len(shape) != 3:
        raise GeometryError(
            f"target spacing {list(spacing)} / shape {list(shape)}: expected 3 values in array order"
        )
    if shape and not spacing:
        new_shape = tuple(int(s) for s in shape)
        new_spacing = tuple(float(v) for v in old_shape * old_spacing / np.asarray(new_shape))
    elif spacing and not shape:
        new_spacing = tuple(float(v) for v in spacing)
        new_shape = tuple(max(1, int(v)) for v in np.rint(old_shape * old_spacing / np.asarray(new_spacing)))
    else:
        new_shape, new_spacing = tuple(int(s) for s in shape), tuple(float(v) for v in spacing)
    if new_shape == geometry.shape and np.allclose(new_spacing, geometry.spacing, rtol=0, atol=1e-9):
        return ResampleParams(None, interpolator)
    return ResampleParams(centred_grid(geometry, new_shape, new_spacing), interpolator)


def resample_onto(array: np.ndarray, geometry: Geometry, target: Geometry, interpolator: str) -> np.ndarray:
    """Values of ``array`` (on ``geometry``) at the voxel centres of ``target``, matched in world space.

    Points outside the source grid get 0. Integer input comes back in its own dtype (rounded and clipped
    unless ``nearest``); float input as float32.
    """
    if array.shape != geometry.shape:
        raise GeometryError(f"array shape {array.shape} differs from geometry shape {geometry.shape}")
    integer = np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
    if interpolator == "nearest":
        src = array.astype(np.uint8) if array.dtype == np.bool_ else array
        kind, out_type = sitk.sitkNearestNeighbor, sitk.sitkUnknown
    else:
        src = array
        kind = sitk.sitkLinear if interpolator == "linear" else sitk.sitkBSpline
        out_type = sitk.sitkFloat32
    image = sitk.GetImageFromArray(np.ascontiguousarray(src))
    geometry.apply_to_sitk(image)
    ref = sitk.Image(*reversed(target.shape), image.GetPixelID())
    target.apply_to_sitk(ref)
    out = sitk.Resample(image, ref, sitk.Transform(), kind, 0.0, out_type)
    result = sitk.GetArrayFromImage(out)
    if interpolator != "nearest" and integer:
        info = np.iinfo(array.dtype)
        np.rint(result, out=result)
        np.clip(result, info.min, info.max, out=result)
        result = result.astype(array.dtype)
    elif array.dtype == np.bool_:
        result = result.astype(np.bool_)
    return result


def apply_resample(
    array: np.ndarray, geometry: Geometry, params: ResampleParams
) -> tuple[np.ndarray, Geometry]:
    """Resample onto ``params.target`` (no-op when ``None``)."""
    if params.target is None:
        return array, geometry
    return resample_onto(array, geometry, params.target, params.interpolator), params.target
