"""A procedural knee phantom: anatomy as simple solids in a knee-local frame, painted onto any voxel grid.

**Knee frame.** Shapes are defined in millimetres in a local frame ``(m, p, s)``: ``m`` toward the knee's
*medial* side, ``p`` toward posterior, ``s`` toward superior, origin at the centre of the joint line. It maps to
LPS world coordinates as ``x = cx + sign * m``, ``y = cy + p``, ``z = cz + s`` with ``sign = +1`` for a right
knee (its medial side faces the patient's left, +x) and ``-1`` for a left knee. The acquisition grid may be
oblique to this frame; painting works on any :class:`~kneeprep.geometry.Geometry`.

**Painting.** A :class:`Canvas` holds two ``uint8`` arrays on the grid: ``labels`` (the mask, label map
:data:`kneeprep.moaks.anatomy.SAMPLE_LABELS`) and ``tissue`` (what the image shows, :class:`Tissue`). Each shape is
evaluated only inside the index block that bounds it, in chunks of slices, so memory and time stay
proportional to the shape, not to the volume. Later paints overwrite earlier ones.

**Subregions.** Bone labels partition each bone into MOAKS subregions by simple planes in the knee frame
(:func:`bone_subregion`); the same rule applied to cartilage voxels gives the cartilage subregions
(:func:`cartilage_subregion`).

**Image.** :func:`synthesize_image` maps tissues to DESS-like intensities (fluid and cartilage bright, fatty
marrow bright, menisci, ligaments and cortex dark), adds a smooth coil-sensitivity bias and Rician noise
(magnitude of a complex signal with Gaussian noise in both channels), and returns 12-bit integers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from kneeprep.geometry import Geometry
from kneeprep.moaks.anatomy import SAMPLE_LABELS

#: label name -> label value of the sample's label map.
LABEL: dict[str, int] = {name: value for value, name in SAMPLE_LABELS.items()}


class Tissue(IntEnum):
    """What a voxel shows in the image (independent of its mask label)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTEX = 3
    MARROW = 4
    CARTILAGE = 5
    CARTILAGE_PARTIAL = 6  # partial-thickness cartilage loss: fibrillated, intermediate signal
    FLUID = 7
    MENISCUS = 8
    MENISCUS_SIGNAL = 9  # intrasubstance meniscal signal (MOAKS morphology 1)
    LIGAMENT = 10
    BML = 11  # bone-marrow lesion: oedema-like, hyperintense on DESS
    CYST = 12  # subchondral cyst: fluid-bright, well defined
    SYNOVITIS = 13  # Hoffa-synovitis signal in the fat pad
    TENDON_SIGNAL = 14


#: DESS-like mean signal per tissue (arbitrary units, well inside 12 bits).
DESS_INTENSITY: dict[Tissue, float] = {
    Tissue.AIR: 4.0,
    Tissue.FAT: 230.0,
    Tissue.MUSCLE: 110.0,
    Tissue.CORTEX: 30.0,
    Tissue.MARROW: 260.0,
    Tissue.CARTILAGE: 330.0,
    Tissue.CARTILAGE_PARTIAL: 450.0,
    Tissue.FLUID: 620.0,
    Tissue.MENISCUS: 25.0,
    Tissue.MENISCUS_SIGNAL: 170.0,
    Tissue.LIGAMENT: 45.0,
    Tissue.BML: 470.0,
    Tissue.CYST: 700.0,
    Tissue.SYNOVITIS: 420.0,
    Tissue.TENDON_SIGNAL: 300.0,
}

# ----------------------------------------------------------------------------------------------------------
# Knee frame and solids


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


# ----------------------------------------------------------------------------------------------------------
# The anatomy (knee-frame millimetres)


@dataclass(frozen=True)
class Anatomy:
    """Dimensions of one knee. Defaults describe an adult knee; ``scaled`` varies them per patient."""

    scale: float = 1.0
    # subregion planes (knee frame): femur trochlea p < FEMUR_TROCHLEA_P, posterior p > FEMUR_POSTERIOR_P
    femur_trochlea_p: float = -6.0
    femur_posterior_p: float = 12.0
    tibia_anterior_p: float = -5.0
    tibia_posterior_p: float = 11.0
    subspinous_half_width: float = 5.0
    subspinous_floor_s: float = -20.0
    tibia_plateau_s: float = -3.0
    # MOAKS subregions end here (knee frame, mm): femur above, tibia below is shaft
    femur_shaft_s: float = 45.0
    tibia_shaft_s: float = -30.0
    cartilage_thickness: float = 2.5
    cortex: float = 1.0

    def mm(self, v):
        return np.asarray(v, dtype=np.float64) * self.scale

    # bones ------------------------------------------------------------------------------------------
    def condyle(self, medial: bool) -> Ellipsoid:
        m = 22.0 if medial else -22.0
        return Ellipsoid(self.mm([m, 4.0, 20.0]), self.mm([13.0, 22.0, 18.0]))

    def trochlea(self) -> Ellipsoid:
        return Ellipsoid(self.mm([0.0, -10.0, 28.0]), self.mm([26.0, 12.0, 16.0]))

    def femur_shaft(self) -> EllipticCylinder:
        return EllipticCylinder(self.mm([0.0, 2.0]), self.mm([17.0, 15.0]), self.mm(28.0), self.mm(80.0))

    def femur(self) -> Union:
        return Union(self.condyle(True), self.condyle(False), self.trochlea(), self.femur_shaft())

    def patella(self) -> Ellipsoid:
        return Ellipsoid(self.mm([0.0, -37.0, 30.0]), self.mm([20.0, 8.0, 17.0]))

    def tibia_plateau(self) -> EllipticCylinder:
        return EllipticCylinder(
            self.mm([0.0, 3.0]), self.mm([39.0, 25.0]), self.mm(-30.0), self.tibia_plateau_s
        )

    def tibia(self) -> Union:
        shaft = EllipticCylinder(self.mm([0.0, 5.0]), self.mm([17.0, 16.0]), self.mm(-80.0), self.mm(-29.0))
        spines = [Ellipsoid(self.mm([v, 3.0, -3.0]), self.mm([4.0, 8.0, 4.0])) for v in (-5.0, 5.0)]
        return Union(self.tibia_plateau(), shaft, *spines)

    # cartilage, menisci -----------------------------------------------------------------------------
    def plate_centre(self, medial: bool) -> np.ndarray:
        return self.mm([20.0 if medial else -20.0, 3.0])

    def plate_radii(self) -> np.ndarray:
        return self.mm([13.0, 14.8])

    def tibial_cartilage(self, medial: bool) -> EllipticCylinder:
        s0 = self.tibia_plateau_s
        return EllipticCylinder(self.plate_centre(medial), self.plate_radii(), s0, s0 + 2.2 * self.scale)

    def meniscus(self, medial: bool, shift_mp=(0.0, 0.0)) -> Meniscus:
        return Meniscus(
            self.plate_centre(medial), self.plate_radii(), self.tibia_plateau_s, shift_mp=shift_mp
        )

    # soft tissue -------------------------------------------------------------------------------------
    def leg(self) -> EllipticCylinder:
        return EllipticCylinder(self.mm([0.0, 8.0]), self.mm([60.0, 62.0]), -1e3, 1e3)

    def patellar_tendon(self) -> Capsule:
        return Capsule(
            self.mm([0.0, -40.0, 13.0]), self.mm([0.0, -25.0, -22.0]), 2.5 * self.scale, 13.0 * self.scale
        )

    def hoffa(self) -> Ellipsoid:
        return Ellipsoid(self.mm([0.0, -27.0, 3.0]), self.mm([20.0, 7.0, 11.0]))

    def acl(self) -> Capsule:
        return Capsule(self.mm([-7.0, 14.0, 10.0]), self.mm([-1.0, -6.0, -2.0]), 3.5 * self.scale)

    def pcl(self) -> Capsule:
        return Capsule(self.mm([6.0, 2.0, 14.0]), self.mm([1.0, 22.0, -6.0]), 4.0 * self.scale)

    def effusion(self, size: float) -> Ellipsoid:
        """The suprapatellar recess; ``size`` in [0, 1] from a trace of fluid to a large effusion."""
        return Ellipsoid(self.mm([0.0, -21.0, 54.0]), self.mm([22.0, 2.5 + 7.0 * size, 9.0 + 11.0 * size]))

    def popliteal_cyst(self) -> Ellipsoid:
        return Ellipsoid(self.mm([16.0, 42.0, 4.0]), self.mm([7.0, 6.0, 14.0]))


# ----------------------------------------------------------------------------------------------------------
# Subregion rules


def bone_subregion(bone: str, m, p, s, anatomy: Anatomy) -> np.ndarray:
    """Label values of the MOAKS subregion of ``bone`` ("patella", "femur", "tibia") at knee-frame points."""
    medial = m > 0
    if bone == "patella":
        return np.where(medial, LABEL["patella medial"], LABEL["patella lateral"]).astype(np.uint8)
    sc = anatomy.scale
    if bone == "femur":
        zone = np.where(
            p < anatomy.femur_trochlea_p * sc, 0, np.where(p > anatomy.femur_posterior_p * sc, 2, 1)
        )
        names = [
            [
                LABEL["femur lateral trochlea"],
                LABEL["femur lateral central"],
                LABEL["femur lateral posterior"],
            ],
            [LABEL["femur medial trochlea"], LABEL["femur medial central"], LABEL["femur medial posterior"]],
        ]
        out = np.asarray(names, dtype=np.uint8)[medial.astype(int), zone]
        return np.where(s > anatomy.femur_shaft_s * sc, LABEL["femur shaft"], out).astype(np.uint8)
    if bone == "tibia":
        zone = np.where(
            p < anatomy.tibia_anterior_p * sc, 0, np.where(p > anatomy.tibia_posterior_p * sc, 2, 1)
        )
        names = [
            [
                LABEL["tibia lateral anterior"],
                LABEL["tibia lateral central"],
                LABEL["tibia lateral posterior"],
            ],
            [LABEL["tibia medial anterior"], LABEL["tibia medial central"], LABEL["tibia medial posterior"]],
        ]
        out = np.asarray(names, dtype=np.uint8)[medial.astype(int), zone]
        spine = (np.abs(m) <= anatomy.subspinous_half_width * sc) & (s > anatomy.subspinous_floor_s * sc)
        out = np.where(spine, LABEL["tibia subspinous"], out)
        return np.where(s < anatomy.tibia_shaft_s * sc, LABEL["tibia shaft"], out).astype(np.uint8)
    raise ValueError(f"unknown bone {bone!r}")


#: cartilage label -> the bone whose subregion rule splits it into MOAKS cartilage subregions.
CARTILAGE_BONE = {
    "patellar cartilage": "patella",
    "femoral cartilage medial": "femur",
    "femoral cartilage lateral": "femur",
    "femoral cartilage trochlear": "femur",
    "tibial cartilage medial": "tibia",
    "tibial cartilage lateral": "tibia",
}


def cartilage_subregion(labels: np.ndarray, mps: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """For cartilage voxels (``labels`` values, ``mps`` their ``(N, 3)`` knee-frame coordinates), the label value
    of the bone subregion naming their MOAKS cartilage subregion (0 for non-cartilage voxels). Subspinous
    positions map to the medial/lateral tibial subregion of their plate (no cartilage subregion there)."""
    out = np.zeros(len(labels), dtype=np.uint8)
    m, p, s = mps[:, 0], mps[:, 1], mps[:, 2]
    for name, bone in CARTILAGE_BONE.items():
        sel = labels == LABEL[name]
        if not np.any(sel):
            continue
        mm = m[sel]
        if name.startswith("tibial"):  # keep each plate on its own side whatever the subspinous strip says
            mm = np.where(name.endswith("medial"), np.maximum(mm, 1e-3), np.minimum(mm, -1e-3))
            sub = bone_subregion("tibia", mm, p[sel], np.full(mm.shape, -1e3), anatomy)
        else:
            sub = bone_subregion(bone, mm, p[sel], s[sel], anatomy)
        out[sel] = sub
    return out


# ----------------------------------------------------------------------------------------------------------
# The canvas


class Canvas:
    """Label and tissue arrays on a grid, painted shape by shape in knee-frame coordinates."""

    def __init__(self, geometry: Geometry, frame: KneeFrame, chunk: int = 24):
        self.geometry = geometry
        self.frame = frame
        self.labels = np.zeros(geometry.shape, dtype=np.uint8)
        self.tissue = np.full(geometry.shape, Tissue.AIR, dtype=np.uint8)
        a = geometry.affine_lps
        r = frame.rotation
        # local = R^T (A[:3,:3] ijk + A[:3,3] - c)
        self._m = r.T @ a[:3, :3]
        self._t = r.T @ (a[:3, 3] - np.asarray(frame.centre_lps))
        self._chunk = chunk

    def local_of_indices(self, ijk: np.ndarray) -> np.ndarray:
        """Knee-frame coordinates of ``(N, 3)`` voxel indices."""
        return np.asarray(ijk, dtype=np.float64) @ self._m.T + self._t

    def index_block(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices bounding the local box ``[lo, hi]`` (None when it misses the grid)."""
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        idx = (corners - self._t) @ np.linalg.inv(self._m).T
        i0 = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        i1 = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, self.geometry.shape)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1, strict=True))

    def blocks(
        self, lo, hi
    ) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]]:
        """Chunks of the index block of ``[lo, hi]`` with their knee-frame coordinates ``m, p, s`` (float32)."""
        block = self.index_block(lo, hi)
        if block is None:
            return
        bi, bj, bk = block
        j = np.arange(bj.start, bj.stop, dtype=np.float32)[None, :, None]
        k = np.arange(bk.start, bk.stop, dtype=np.float32)[None, None, :]
        for start in range(bi.start, bi.stop, self._chunk):
            stop = min(start + self._chunk, bi.stop)
            i = np.arange(start, stop, dtype=np.float32)[:, None, None]
            coords = [
                (self._m[r, 0] * i + self._m[r, 1] * j + self._m[r, 2] * k + self._t[r]).astype(np.float32)
                for r in range(3)
            ]
            yield (slice(start, stop), bj, bk), coords[0], coords[1], coords[2]

    def paint(
        self,
        shape: Shape,
        *,
        label: int | Callable | None = None,
        tissue: int | None = None,
        where: Callable | None = None,
    ) -> int:
        """Paint ``shape``: set ``label`` (a value, or ``f(m, p, s) -> values``) and/or ``tissue`` inside it,
        restricted to voxels where ``where(labels, tissue, m, p, s)`` is true. Returns the voxels painted."""
        count = 0
        for sl, m, p, s in self.blocks(shape.lo, shape.hi):
            inside = shape.contains(m, p, s)
            if where is not None:
                inside &= where(self.labels[sl], self.tissue[sl], m, p, s)
            if not inside.any():
                continue
            count += int(inside.sum())
            if label is not None:
                values = label(m, p, s) if callable(label) else label
                target = self.labels[sl]
                target[inside] = values[inside] if callable(label) else values
            if tissue is not None:
                self.tissue[sl][inside] = tissue
        return count


# ----------------------------------------------------------------------------------------------------------
# Anatomy painting


def paint_anatomy(canvas: Canvas, anatomy: Anatomy, *, effusion_size: float, extrusion_mp: dict) -> None:
    """Paint the normal knee, soft tissue first and bones last. ``extrusion_mp`` maps "medial"/"lateral" to
    the meniscus shift ``(dm, dp)`` in mm (outward ``m``, anterior ``-p``)."""
    sc = anatomy.scale
    leg = anatomy.leg()
    canvas.paint(leg, tissue=Tissue.FAT)
    canvas.paint(EllipticCylinder(leg.c, leg.r - 6.0 * sc, leg.s0, leg.s1), tissue=Tissue.MUSCLE)
    canvas.paint(anatomy.effusion(effusion_size), label=LABEL["joint effusion"], tissue=Tissue.FLUID)
    canvas.paint(anatomy.hoffa(), label=LABEL["hoffa fat pad"], tissue=Tissue.FAT)
    canvas.paint(anatomy.patellar_tendon(), label=LABEL["patellar tendon"], tissue=Tissue.LIGAMENT)
    canvas.paint(anatomy.acl(), label=LABEL["acl"], tissue=Tissue.LIGAMENT)
    canvas.paint(anatomy.pcl(), label=LABEL["pcl"], tissue=Tissue.LIGAMENT)

    for medial in (True, False):
        side = "medial" if medial else "lateral"
        men = anatomy.meniscus(medial, extrusion_mp[side])
        parts = np.array(
            [
                LABEL[f"{side} meniscus anterior horn"],
                LABEL[f"{side} meniscus body"],
                LABEL[f"{side} meniscus posterior horn"],
            ],
            dtype=np.uint8,
        )
        canvas.paint(
            men, label=lambda m, p, s, men=men, parts=parts: parts[men.part(m, p)], tissue=Tissue.MENISCUS
        )
        canvas.paint(
            anatomy.tibial_cartilage(medial), label=LABEL[f"tibial cartilage {side}"], tissue=Tissue.CARTILAGE
        )

    # Femoral cartilage: the grown condyles/trochlea below the top of the trochlea, outside the notch; the
    # bone painted afterwards leaves a shell of cartilage_thickness.
    t = anatomy.cartilage_thickness * sc
    femur_grown = Union(
        anatomy.condyle(True).grown(t), anatomy.condyle(False).grown(t), anatomy.trochlea().grown(t)
    )
    troch_p, top_s = anatomy.femur_trochlea_p * sc, 36.0 * sc

    def femoral_cartilage(m, p, s):
        return np.where(
            p < troch_p,
            LABEL["femoral cartilage trochlear"],
            np.where(m > 0, LABEL["femoral cartilage medial"], LABEL["femoral cartilage lateral"]),
        ).astype(np.uint8)

    def articular(labels, tissue, m, p, s):
        # trochlear groove, and the inferior and posterior condylar surfaces; no notch, no side walls
        notch = (np.abs(m) < 8.0 * sc) & (p > troch_p)
        bearing = (p < troch_p) | (s < 20.0 * sc) | (p > 10.0 * sc)
        return (s < top_s) & ~notch & (np.abs(m) < 33.0 * sc) & bearing

    canvas.paint(femur_grown, label=femoral_cartilage, tissue=Tissue.CARTILAGE, where=articular)
    patella = anatomy.patella()
    pc = patella.c[1]
    canvas.paint(
        patella.grown(anatomy.cartilage_thickness * sc + 0.5 * sc),
        label=LABEL["patellar cartilage"],
        tissue=Tissue.CARTILAGE,
        where=lambda labels, tissue, m, p, s: p > pc + 1.0 * sc,
    )

    # Bones: a cortex rim, then marrow inside it; labels by subregion.
    cortex = anatomy.cortex * sc
    for bone, shape in (("patella", patella), ("femur", anatomy.femur()), ("tibia", anatomy.tibia())):
        canvas.paint(
            shape,
            label=lambda m, p, s, bone=bone: bone_subregion(bone, m, p, s, anatomy),
            tissue=Tissue.CORTEX,
        )
        canvas.paint(_shrunk(shape, cortex), tissue=Tissue.MARROW)


def _shrunk(shape: Shape, t: float) -> Shape:
    if isinstance(shape, Union):
        return Union(*(_shrunk(s, t) for s in shape.shapes))
    if isinstance(shape, Ellipsoid):
        return Ellipsoid(shape.c, np.maximum(shape.r - t, 0.1))
    if isinstance(shape, EllipticCylinder):
        return EllipticCylinder(shape.c, np.maximum(shape.r - t, 0.1), shape.s0 + t, shape.s1 - t)
    raise TypeError(type(shape))


# ----------------------------------------------------------------------------------------------------------
# Image synthesis


def synthesize_image(
    tissue: np.ndarray, rng: np.random.Generator, *, noise_sigma: float = 14.0
) -> np.ndarray:
    """A DESS-like 12-bit image from a tissue map: per-tissue means (:data:`DESS_INTENSITY`) with a little
    per-voxel texture, a smooth multiplicative coil bias along rows and columns, and Rician noise
    ``sqrt((S + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, noise_sigma)``. Returns ``uint16`` in ``[0, 4095]``."""
    lut = np.zeros(256, dtype=np.float32)
    for t, v in DESS_INTENSITY.items():
        lut[int(t)] = v
    nz, ny, nx = tissue.shape
    bias_y = 1.0 + 0.12 * np.cos(np.linspace(-1.2, 1.2, ny, dtype=np.float32))
    bias_x = 1.0 + 0.10 * np.cos(np.linspace(-1.0, 1.4, nx, dtype=np.float32))
    bias = (bias_y[:, None] * bias_x[None, :]).astype(np.float32)
    out = np.empty(tissue.shape, dtype=np.uint16)
    sigma = np.float32(noise_sigma)
    for start in range(0, nz, 16):  # slabs bound the float32 temporaries
        sl = slice(start, min(start + 16, nz))
        signal = lut[tissue[sl]] * bias[None]
        n1 = rng.standard_normal(signal.shape, dtype=np.float32)
        n1 *= sigma
        n1 += signal
        n2 = rng.standard_normal(signal.shape, dtype=np.float32)
        n2 *= sigma
        mag = np.sqrt(n1 * n1 + n2 * n2)
        out[sl] = np.clip(np.rint(mag), 0, 4095).astype(np.uint16)
    return out
