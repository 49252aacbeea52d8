"""Reorient a volume to an ITK orientation code (``SimpleITK.DICOMOrient`` semantics), or keep it native.

Letter *n* of a code names the patient direction toward which the index along ITK axis *n* (= array axis
``2 - n``) increases; ``"LPS"`` is the identity direction matrix (see :mod:`kneeprep.geometry`). Example: a
sagittal DESS acquired as ``"PIR"`` (columns toward Posterior, rows toward Inferior, slices toward Right)
reoriented to ``"LPS"`` becomes ``array[z, y, x]`` with x toward Left, y toward Posterior, z toward Superior,
so its 160 sagittal slices then run along array axis 2 (reversed). The array is transposed, never resampled.

Reorientation only permutes and flips array axes: no voxel value changes, and every voxel keeps its world
(LPS) position because the affine is permuted and flipped with the array. An oblique grid stays oblique; each
array axis is matched to the patient axis it is closest to, as ITK's ``OrientImageFilter`` does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from kneeprep.errors import GeometryError
from kneeprep.geometry import Geometry

#: letter -> (world axis 0=x/1=y/2=z in LPS, sign)
LETTER_AXIS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
_AXIS_LETTER = {v: k for k, v in LETTER_AXIS.items()}


@dataclass(frozen=True)
class OrientParams:
    """How to reorder the array: target axis ``a`` is source axis ``permutation[a]``, reversed if ``flips[a]``.

    ``source``/``target`` are the ITK codes before and after; ``requested`` is the recipe value
    (``"native"`` or a code).
    """

    requested: str
    source: str
    target: str
    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    def to_json(self) -> dict:
        return {
            "requested": self.requested,
            "source": self.source,
            "target": self.target,
            "permutation": list(self.permutation),
            "flips": list(self.flips),
        }

    @classmethod
    def from_json(cls, d: dict) -> OrientParams:
        return cls(
            d["requested"],
            d["source"],
            d["target"],
            tuple(d["permutation"]),
            tuple(bool(f) for f in d["flips"]),
        )


def axis_code(affine) -> str:
    """ITK code of an affine with each array axis matched to a *distinct* patient axis.

    Unlike :func:`kneeprep.geometry.orientation_code` (closest axis per column, which can repeat a letter for a
    grid tilted near 45 degrees), this picks the one-to-one matching with the largest total alignment, so it
    is always a valid code.

    >>> from kneeprep.geometry import affine_from_itk
    >>> axis_code(affine_from_itk((0, 0, 0), (0.36, 0.36, 0.7), (0, 0, -1, 1, 0, 0, 0, -1, 0)))
    'PIR'
    """
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = a / np.linalg.norm(a, axis=0)[None, :]
    best = max(
        itertools.permutations(range(3)),
        key=lambda worlds: sum(abs(unit[w, b]) for b, w in enumerate(worlds)),
    )
    letters = [_AXIS_LETTER[(best[b], 1 if unit[best[b], b] > 0 else -1)] for b in range(3)]
    return "".join(reversed(letters))  # ITK axis n = array axis 2 - n


def plan_orient(geometry: Geometry, code: str) -> OrientParams:
    """The permutation and flips that take ``geometry`` to orientation ``code`` (``"native"`` = keep)."""
    source = axis_code(geometry.affine_lps)
    if code == "native":
        return OrientParams(code, source, source, (0, 1, 2), (False, False, False))
    code = code.upper()
    letters = [LETTER_AXIS.get(c) for c in code]
    if len(code) != 3 or None in letters or len({w for w, _ in letters}) != 3:
        raise GeometryError(
            f"orientation {code!r}: expected three letters naming distinct axes from L/R, A/P, S/I"
        )
    src = [LETTER_AXIS[source[2 - b]] for b in range(3)]  # per source array axis: (world axis, sign)
    perm, flips = [], []
    for a in range(3):
        w, sign = LETTER_AXIS[code[2 - a]]
        b = next(b for b in range(3) if src[b][0] == w)
        perm.append(b)
        flips.append(src[b][1] != sign)
    return OrientParams(code, source, code, tuple(perm), tuple(flips))


def permute_flip(array: np.ndarray, geometry: Geometry, permutation, flips) -> tuple[np.ndarray, Geometry]:
    """Reorder array axes (target ``a`` = source ``permutation[a]``, reversed where ``flips[a]``), keeping every
    voxel's world position: the affine's columns are permuted and negated and its origin moved to the new
    first voxel. Returns a new C-contiguous array (the input itself when nothing changes)."""
    if array.shape != geometry.shape:
        raise GeometryError(f"array shape {array.shape} differs from geometry shape {geometry.shape}")
    perm = tuple(int(p) for p in permutation)
    if perm == (0, 1, 2) and not any(flips):
        return array, geometry
    src = geometry.affine_lps
    out = np.transpose(array, perm)
    affine = np.eye(4)
    origin = src[:3, 3].copy()
    for a, (b, flip) in enumerate(zip(perm, flips, strict=True)):
        col = src[:3, b]
        if flip:
            origin += (geometry.shape[b] - 1) * col
            affine[:3, a] = -col
        else:
            affine[:3, a] = col
    affine[:3, 3] = origin
    flipped = tuple(a for a, f in enumerate(flips) if f)
    if flipped:
        out = np.flip(out, axis=flipped)
    new = Geometry(tuple(geometry.shape[b] for b in perm), tuple(geometry.spacing[b] for b in perm), affine)
    return np.ascontiguousarray(out), new


def apply_orient(array: np.ndarray, geometry: Geometry, params: OrientParams) -> tuple[np.ndarray, Geometry]:
    """Apply :func:`plan_orient`'s params: a permutation and flips of the array, affine updated alongside."""
    return permute_flip(array, geometry, params.permutation, params.flips)
