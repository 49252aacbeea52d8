"""The sample's grids: the sagittal DESS (``GRIDS``: the OAI protocol, or a scaled-down one), its coronal
MPR reformat (no resampling) and the 3-plane localizer through the knee centre.
"""

from __future__ import annotations

import math

import numpy as np

from kneeprep.geometry import Geometry
from kneeprep.synth.canvas import Canvas
from kneeprep.synth.image import synthesize_image
from kneeprep.synth.knee import Anatomy
from kneeprep.synth.phantom import paint_anatomy
from kneeprep.synth.shapes import KneeFrame

FIELD_OF_VIEW_MM = 140.0
#: size -> (slices, rows, columns, slice spacing mm). "full" is the OAI DESS protocol (FOV 140 mm).
GRIDS = {"full": (160, 384, 384, 0.7), "small": (40, 96, 96, 2.8)}
#: slices of the DESS between two coronal reformat slices (full: 1.46 mm, like OAI's 1.5 mm MPR)
MPR_STEP = {"full": 4, "small": 1}
LOCALIZER_PIXELS = {"full": 256, "small": 64}


def _rotation(yaw_deg: float, tilt_deg: float) -> np.ndarray:
    a, b = math.radians(yaw_deg), math.radians(tilt_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return rz @ ry


def _grid(shape, spacing, directions, centre) -> Geometry:
    """A grid of ``shape`` centred on ``centre`` with unit ``directions`` (columns: array axes 0, 1, 2)."""
    a = np.eye(4)
    a[:3, :3] = directions * np.asarray(spacing)[None, :]
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Geometry(tuple(shape), tuple(spacing), a)


#: unit directions of array axes 0, 1, 2 for the sagittal DESS before obliquity: slices toward R, rows
#: toward I, columns toward P (ITK code "PIR"; row x column = R, so it is right-handed).
SAGITTAL_PIR = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T


def dess_geometry(size: str, centre_lps, obliquity_deg=(0.0, 0.0)) -> Geometry:
    """The sagittal DESS grid of ``size`` centred on ``centre_lps``, rotated by ``(about S, about A)`` degrees."""
    n, rows, cols, dz = GRIDS[size]
    px = FIELD_OF_VIEW_MM / rows
    return _grid(
        (n, rows, cols),
        (dz, px, FIELD_OF_VIEW_MM / cols),
        _rotation(*obliquity_deg) @ SAGITTAL_PIR,
        centre_lps,
    )


def coronal_reformat(array: np.ndarray, geometry: Geometry, step: int) -> tuple[np.ndarray, Geometry]:
    """A coronal MPR of a "PIR" sagittal volume without resampling: every ``step``-th column becomes a slice,
    rows stay, the sagittal slices become columns in reverse order (toward L). Right-handed, same frame."""
    n0 = array.shape[0]
    cor = np.ascontiguousarray(array[::-1, :, ::step].transpose(2, 1, 0))
    t = np.array([[0, 0, -1, n0 - 1], [0, 1, 0, 0], [step, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    a = geometry.affine_lps @ t
    return cor, Geometry(cor.shape, tuple(np.linalg.norm(a[:3, :3], axis=0)), a)


def localizer(anatomy: Anatomy, frame: KneeFrame, size: str, rng: np.random.Generator):
    """Three single-slice planes (sagittal, coronal, axial) through the knee centre, as one array plus the
    per-slice geometry overrides for :func:`write_series`."""
    n = LOCALIZER_PIXELS[size]
    fov = 200.0
    px = fov / n
    planes = {  # array axes 0 (normal), 1 (rows), 2 (columns) unit directions
        "sagittal": SAGITTAL_PIR,
        "coronal": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]).T,
        "axial": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T,
    }
    slices, geoms = [], []
    for dirs in planes.values():
        g = _grid((1, n, n), (5.0, px, px), dirs, frame.centre_lps)
        canvas = Canvas(g, frame)
        paint_anatomy(canvas, anatomy, effusion_size=0.2, extrusion_mp={"medial": (0, 0), "lateral": (0, 0)})
        slices.append(synthesize_image(canvas.tissue, rng)[0])
        geoms.append(g)
    slice_tags = []
    for g in geoms:
        a = g.affine_lps
        iop = [*(a[:3, 2] / px).tolist(), *(a[:3, 1] / px).tolist()]
        slice_tags.append(
            {
                "ImageOrientationPatient": [f"{v:.8g}" for v in iop],
                "ImagePositionPatient": [f"{v:.8g}" for v in a[:3, 3].tolist()],
                "SliceLocation": None,
            }
        )
    stack = np.stack(slices)
    return stack, Geometry(stack.shape, geoms[0].spacing, geoms[0].affine_lps), slice_tags
