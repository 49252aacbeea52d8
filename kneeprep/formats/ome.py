"""OME-Zarr 0.5 metadata of the volume store: the root as a bioformats2raw collection, each volume an image.

Pure functions of a :class:`~kneeprep.geometry.Geometry` (or a list of volume ids) returning the ``ome``
attributes :mod:`kneeprep.formats.store` writes; the layout is ``docs/FORMATS.md``, "Volume store as OME-Zarr".

- **Root** (:func:`root_attrs`, :func:`series_attrs`): NGFF 0.5 has no plain "collection of images"; the one
  layout for several images in one hierarchy is the transitional ``bioformats2raw.layout`` (version 3): the
  root's ``ome`` holds ``{"version": "0.5", "bioformats2raw.layout": 3}`` and a group ``OME`` holds
  ``{"series": [<path of each image>, ...]}``. The series are the volume groups, named by volume id (the spec
  allows any paths when ``series`` lists them). There is no ``OME/METADATA.ome.xml`` (optional; kneeprep has
  no OME-XML, and a non-zarr file there would make zarr warn).
- **Images** (:func:`image_attrs`, :func:`label_attrs`): one level; axes ``z, y, x`` (array order) in mm;
  ``coordinateTransformations`` ``[scale, translation]``. 0.5 has only scale and translation, so the OME
  frame is the patient (LPS) frame with its axes relabelled to follow the array: OME axis ``a`` measures mm
  along the patient direction that array axis ``a`` runs toward (:func:`world_axes`, the orientation code's
  letters), ``scale`` = spacing, ``translation`` = voxel ``(0, 0, 0)``'s centre in that frame. For a volume
  whose axes are the patient axes (any order and signs, e.g. the DESS's ``PIR``) this is exact: every voxel
  sits where ``affine_lps`` puts it (:func:`ome_to_lps` maps OME coordinates to LPS). For an oblique volume
  voxel ``(0, 0, 0)`` is exact and the others are off by the rotation 0.5 cannot state; the exact geometry is
  always the ``kneeprep.geometry.affine_lps`` attribute (RFC-5 / NGFF 0.6 adds affines; not written here).
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping

import numpy as np

from kneeprep.geometry import Geometry

OME_VERSION = "0.5"
#: name of the root's bioformats2raw metadata group (holds ``series``); never a volume id.
OME_GROUP = "OME"
BIOFORMATS2RAW_LAYOUT = 3


def root_attrs() -> dict:
    """The root group's ``ome`` attributes: a bioformats2raw (layout 3) collection."""
    return {"version": OME_VERSION, "bioformats2raw.layout": BIOFORMATS2RAW_LAYOUT}


def series_attrs(volume_ids: Iterable[str]) -> dict:
    """The ``OME`` group's ``ome`` attributes: the image paths (volume ids), as given."""
    return {"version": OME_VERSION, "series": list(volume_ids)}


def world_axes(geometry: Geometry) -> tuple[tuple[int, int], ...]:
    """For each array axis: ``(LPS axis, sign)`` of the patient direction it runs closest to.

    Always a signed permutation (ties go to the axis with the larger component first, then the lower LPS
    axis), so the OME frame is a rotation of LPS.

    >>> from kneeprep.geometry import affine_from_itk
    >>> world_axes(Geometry((2, 2, 2), (1, 1, 1), affine_from_itk((0, 0, 0), (1, 1, 1), (0, 0, -1, 1, 0, 0, 0, -1, 0))))
    ((0, -1), (2, -1), (1, 1))
    """
    cols = np.asarray(geometry.affine_lps, dtype=np.float64)[:3, :3]
    cols = cols / np.linalg.norm(cols, axis=0)[None, :]
    order = sorted(range(3), key=lambda a: (-float(np.max(np.abs(cols[:, a]))), a))
    taken: set[int] = set()
    out: dict[int, tuple[int, int]] = {}
    for a in order:
        w = max((w for w in range(3) if w not in taken), key=lambda w: (abs(cols[w, a]), -w))
        taken.add(w)
        out[a] = (w, 1 if cols[w, a] >= 0 else -1)
    return tuple(out[a] for a in range(3))


def translation(geometry: Geometry) -> list[float]:
    """Voxel ``(0, 0, 0)``'s centre in the OME frame (array-axis order): ``sign * origin_lps[axis]`` per axis.

    >>> from kneeprep.geometry import affine_from_itk
    >>> translation(Geometry((2, 2, 2), (1, 1, 1), affine_from_itk((10, 20, 30), (1, 1, 1), (0, 0, -1, 1, 0, 0, 0, -1, 0))))
    [-10.0, -30.0, 20.0]
    """
    origin = np.asarray(geometry.affine_lps, dtype=np.float64)[:3, 3]
    return [float(s * origin[w]) + 0.0 for w, s in world_axes(geometry)]


def ome_to_lps(geometry: Geometry) -> np.ndarray:
    """The 4x4 map from OME coordinates ``(z, y, x, 1)`` (array-axis order, mm) to LPS ``(x, y, z, 1)``.

    ``ome_to_lps(g) @ [scale * index + translation, 1]`` equals ``g.affine_lps @ [index, 1]`` for a volume
    whose axes are patient axes (exact), and at index ``(0, 0, 0)`` for any volume."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a, (w, s) in enumerate(world_axes(geometry)):
        m[w, a] = s
    return m


def _axes() -> list[dict]:
    return [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")]


def _multiscale(name: str, path: str, geometry: Geometry) -> dict:
    return {
        "name": name,
        "axes": _axes(),
        "datasets": [
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": list(geometry.spacing)},
                    {"type": "translation", "translation": translation(geometry)},
                ],
            }
        ],
    }


def image_attrs(name: str, geometry: Geometry) -> dict:
    """A volume group's ``ome`` attributes: one-level multiscales over the ``image`` array."""
    return {"version": OME_VERSION, "multiscales": [_multiscale(name, "image", geometry)]}


def labels_attrs(names: Iterable[str]) -> dict:
    """The ``labels`` group's ``ome`` attributes."""
    return {"version": OME_VERSION, "labels": list(names)}


def label_attrs(name: str, geometry: Geometry, label_map: Mapping[int, str]) -> dict:
    """A label layer's ``ome`` attributes: multiscales over its ``0`` array (same transforms as the image)
    and ``image-label`` with a stable colour and the name of every label value."""
    return {
        "version": OME_VERSION,
        "multiscales": [_multiscale(name, "0", geometry)],
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
