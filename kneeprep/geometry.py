"""Voxel grids in patient space: the :class:`Geometry` record and small, pure affine helpers.

Conventions (``docs/DESIGN.md``):

* Array axes are numpy order ``(z, y, x)`` -- the order of SimpleITK's ``GetArrayFromImage``. Array axis ``a``
  is ITK image axis ``2 - a``.
* World coordinates are DICOM patient coordinates, LPS, millimetres: +x toward the patient's Left, +y toward
  Posterior, +z toward Superior.
* ``affine_lps`` is 4x4 and maps ``(i, j, k, 1)`` -- indices along array axes 0, 1, 2 -- to ``(x, y, z, 1)``.
  Voxel centres sit at integer indices.
* Orientation codes are ITK's 3 letters (as in ``SimpleITK.DICOMOrient``): letter ``n`` names the patient
  direction toward which the index along **ITK axis n** (array axis ``2 - n``) increases. ``"LPS"`` is the
  identity direction matrix: array axis 2 runs toward Left, axis 1 toward Posterior, axis 0 toward Superior.
  A typical sagittal DESS is ``"PIR"`` or ``"PIL"``: columns toward Posterior, rows toward Inferior, slices
  (array axis 0) across the knee, left to right or right to left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_LETTERS = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}


@dataclass(frozen=True)
class Geometry:
    """Where a 3D array sits in patient space.

    ``shape`` and ``spacing`` are in array order (mm); ``affine_lps`` is a read-only 4x4 float64 array.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine_lps: np.ndarray

    def __post_init__(self):
        a = np.array(self.affine_lps, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError(f"affine_lps must be 4x4, got {a.shape}")
        a.setflags(write=False)
        object.__setattr__(self, "affine_lps", a)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))

    @property
    def orientation(self) -> str:
        return orientation_code(self.affine_lps)

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "affine_lps": self.affine_lps.tolist(),
            "orientation": self.orientation,
        }

    @classmethod
    def from_json(cls, d: dict) -> Geometry:
        return cls(tuple(d["shape"]), tuple(d["spacing"]), np.asarray(d["affine_lps"], dtype=np.float64))

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        """Geometry of a 3D ``SimpleITK.Image`` (its array is ``GetArrayFromImage(image)``)."""
        size = image.GetSize()
        return cls(
            (size[2], size[1], size[0]),
            tuple(reversed(image.GetSpacing())),
            affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection()),
        )

    def apply_to_sitk(self, image) -> None:
        """Set origin, spacing and direction of ``image`` (whose array has this shape) from this geometry."""
        origin, spacing, direction = itk_from_affine(self.affine_lps)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)

    def index_to_world(self, ijk) -> np.ndarray:
        return index_to_world(self.affine_lps, ijk)

    def world_to_index(self, xyz) -> np.ndarray:
        return world_to_index(self.affine_lps, xyz)


def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """4x4 ``affine_lps`` for array indices from ITK origin, spacing ``(sx, sy, sz)`` and row-major direction.

    >>> a = affine_from_itk((1.0, 2.0, 3.0), (0.5, 0.6, 0.7), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    >>> a[:3, :3].diagonal().tolist(), a[:3, 3].tolist()
    ([0.0, 0.6, 0.0], [1.0, 2.0, 3.0])
    >>> a[:3, 0].tolist()   # array axis 0 = ITK axis 2
    [0.0, 0.0, 0.7]
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    s = np.asarray(spacing, dtype=np.float64)
    m = d * s[None, :]  # columns: ITK axes scaled
    a = np.eye(4)
    a[:3, :3] = m[:, ::-1]  # array axis a = ITK axis 2 - a
    a[:3, 3] = origin
    return a


def itk_from_affine(affine) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`affine_from_itk`: ``(origin, spacing, direction)`` in ITK order.

    >>> o, s, d = itk_from_affine(affine_from_itk((1, 2, 3), (0.5, 0.6, 0.7), (0, 0, 1, 1, 0, 0, 0, 1, 0)))
    >>> [round(v, 6) for v in s], [round(v, 6) for v in d]
    ([0.5, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    """
    a = np.asarray(affine, dtype=np.float64)
    m = a[:3, :3][:, ::-1]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing[None, :]
    return tuple(a[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def spacing_from_affine(affine) -> tuple[float, float, float]:
    """Voxel spacing in array order (mm): the lengths of the affine's first three columns.

    >>> spacing_from_affine(np.diag([0.7, 0.36, 0.36, 1.0]))
    (0.7, 0.36, 0.36)
    """
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def orientation_code(affine) -> str:
    """ITK 3-letter orientation code of an ``affine_lps`` (closest axis per ITK axis; see module docs).

    >>> orientation_code(np.eye(4))   # array axis 0 -> +x (Left) means ITK axis 2 is L
    'SPL'
    >>> orientation_code(affine_from_itk((0, 0, 0), (1, 1, 1), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    'LPS'
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    letters = []
    for itk_axis in range(3):
        col = a[:, 2 - itk_axis]
        w = int(np.argmax(np.abs(col)))
        letters.append(_LETTERS[(w, 1 if col[w] > 0 else -1)])
    return "".join(letters)


def index_to_world(affine, ijk) -> np.ndarray:
    """Map index points (``(..., 3)`` in array order) to LPS mm.

    >>> index_to_world(np.diag([2.0, 3.0, 4.0, 1.0]), [1, 1, 1]).tolist()
    [2.0, 3.0, 4.0]
    """
    p = np.asarray(ijk, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    return p @ a[:3, :3].T + a[:3, 3]


def world_to_index(affine, xyz) -> np.ndarray:
    """Map LPS mm points (``(..., 3)``) to continuous array indices.

    >>> world_to_index(np.diag([2.0, 3.0, 4.0, 1.0]), [2, 3, 4]).tolist()
    [1.0, 1.0, 1.0]
    """
    p = np.asarray(xyz, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    return (p - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T


def lps_to_ras(affine) -> np.ndarray:
    """An ``affine_lps`` as a NIfTI-style RAS affine (same voxel indices, x and y negated).

    >>> lps_to_ras(np.eye(4)).diagonal().tolist()
    [-1.0, -1.0, 1.0, 1.0]
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
