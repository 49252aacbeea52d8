"""The knee frame and the solids the phantom is built of.

**Knee frame.** Shapes are defined in millimetres in a local frame ``(m, p, s)``: ``m`` toward the knee's
*medial* side, ``p`` toward posterior, ``s`` toward superior, origin at the centre of the joint line. It maps to
LPS world coordinates as ``x = cx + sign * m``, ``y = cy + p``, ``z = cz + s`` with ``sign = +1`` for a right
knee (its medial side faces the patient's left, +x) and ``-1`` for a left knee. The acquisition grid may be
oblique to this frame; painting (:mod:`kneeprep.synth.canvas`) works on any :class:`~kneeprep.geometry.Geometry`.

Each solid has an axis-aligned bounding box in the knee frame and a vectorized membership test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KneeFrame:
    """The knee-local frame ``(m, p, s)`` in world (LPS) space; see the module docstring."""

    centre_lps: tuple[float, float, float]
    side: int  # OAI code: 1 right, 2 left

    @property
    def sign(self) -> float:
        return 1.0 if self.side == 1 else -1.0

    @property
    def rotation(self) -> np.ndarray:
        """3x3 matrix whose columns are the local axes m, p, s in LPS."""
        return np.diag([self.sign, 1.0, 1.0])

    def to_world(self, mps) -> np.ndarray:
        return np.asarray(mps, dtype=np.float64) @ self.rotation.T + np.asarray(self.centre_lps)

    def to_local(self, xyz) -> np.ndarray:
        return (np.asarray(xyz, dtype=np.float64) - np.asarray(self.centre_lps)) @ self.rotation


class Shape:
    """A solid in the knee frame: an axis-aligned local bounding box and a vectorized membership test."""

    lo: np.ndarray
    hi: np.ndarray

    def contains(self, m, p, s) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class Ellipsoid(Shape):
    def __init__(self, centre, radii):
        self.c = np.asarray(centre, dtype=np.float64)
        self.r = np.asarray(radii, dtype=np.float64)
        self.lo, self.hi = self.c - self.r, self.c + self.r

    def contains(self, m, p, s):
        c, r = self.c, self.r
        return ((m - c[0]) / r[0]) ** 2 + ((p - c[1]) / r[1]) ** 2 + ((s - c[2]) / r[2]) ** 2 <= 1.0

    def grown(self, t: float) -> Ellipsoid:
        return Ellipsoid(self.c, self.r + t)


def Ball(centre, radius) -> Ellipsoid:  # noqa: N802 - reads as a shape constructor
    return Ellipsoid(centre, (radius, radius, radius))


class EllipticCylinder(Shape):
    """An elliptic cylinder along ``s``: ellipse ``(cm, cp), (rm, rp)`` in the m-p plane, ``s0 <= s <= s1``."""

    def __init__(self, centre_mp, radii_mp, s0, s1):
        self.c = np.asarray(centre_mp, dtype=np.float64)
        self.r = np.asarray(radii_mp, dtype=np.float64)
        self.s0, self.s1 = float(s0), float(s1)
        self.lo = np.array([*(self.c - self.r), self.s0])
        self.hi = np.array([*(self.c + self.r), self.s1])

    def contains(self, m, p, s):
        inside = ((m - self.c[0]) / self.r[0]) ** 2 + ((p - self.c[1]) / self.r[1]) ** 2 <= 1.0
        return inside & (s >= self.s0) & (s <= self.s1)

    def grown(self, t: float) -> EllipticCylinder:
        return EllipticCylinder(self.c, self.r + t, self.s0 - t, self.s1 + t)


class Capsule(Shape):
    """Points within ``radius`` of the segment ``a``-``b``; with ``half_width`` the distance is measured in the
    p-s plane only and ``|m - a_m| <= half_width`` bounds the width (a flat band such as a tendon)."""

    def __init__(self, a, b, radius, half_width: float | None = None):
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        self.radius = float(radius)
        self.half_width = half_width
        ext = np.full(3, self.radius)
        if half_width is not None:
            ext[0] = half_width
        self.lo = np.minimum(self.a, self.b) - ext
        self.hi = np.maximum(self.a, self.b) + ext

    def contains(self, m, p, s):
        a, b = self.a, self.b
        axes = (1, 2) if self.half_width is not None else (0, 1, 2)
        pts = (m, p, s)
        d = b - a
        dd = sum(d[i] ** 2 for i in axes)
        t = sum((pts[i] - a[i]) * d[i] for i in axes) / dd
        t = np.clip(t, 0.0, 1.0)
        dist2 = sum((pts[i] - (a[i] + t * d[i])) ** 2 for i in axes)
        inside = dist2 <= self.radius**2
        if self.half_width is not None:
            inside &= np.abs(m - a[0]) <= self.half_width
        return inside


class Union(Shape):
    def __init__(self, *shapes: Shape):
        self.shapes = shapes
        self.lo = np.min([sh.lo for sh in shapes], axis=0)
        self.hi = np.max([sh.hi for sh in shapes], axis=0)

    def contains(self, m, p, s):
        out = self.shapes[0].contains(m, p, s)
        for sh in self.shapes[1:]:
            out = out | sh.contains(m, p, s)
        return out


class Meniscus(Shape):
    """A C-shaped wedge around a tibial plateau ellipse: normalized radius ``1 <= rho <= outer``, height rising
    from the plateau ``s0`` to ``s0 + base + slope * (rho - 1)``; shifted by ``(dm, dp)`` (extrusion)."""

    def __init__(self, centre_mp, radii_mp, s0, outer=1.45, base=1.6, rise=2.6, shift_mp=(0.0, 0.0)):
        self.c = np.asarray(centre_mp, dtype=np.float64) + np.asarray(shift_mp, dtype=np.float64)
        self.r = np.asarray(radii_mp, dtype=np.float64)
        self.s0, self.outer, self.base, self.rise = float(s0), float(outer), float(base), float(rise)
        self.lo = np.array([*(self.c - self.outer * self.r), self.s0])
        self.hi = np.array([*(self.c + self.outer * self.r), self.s0 + self.base + self.rise])

    def rho(self, m, p):
        return np.sqrt(((m - self.c[0]) / self.r[0]) ** 2 + ((p - self.c[1]) / self.r[1]) ** 2)

    def contains(self, m, p, s):
        rho = self.rho(m, p)
        top = self.s0 + self.base + self.rise * (rho - 1.0) / (self.outer - 1.0)
        return (rho >= 1.0) & (rho <= self.outer) & (s >= self.s0) & (s <= top)

    def part(self, m, p) -> np.ndarray:
        """0 anterior horn, 1 body, 2 posterior horn (by the AP position relative to the plateau centre)."""
        q = (p - self.c[1]) / (self.r[1] * self.outer)
        return np.where(q < -0.45, 0, np.where(q > 0.45, 2, 1))
