"""One knee's dimensions (:class:`Anatomy`, knee-frame millimetres) and its MOAKS subregion rules.

Bone labels partition each bone into MOAKS subregions by simple planes in the knee frame
(:func:`bone_subregion`); the same rule applied to cartilage voxels gives the cartilage subregions
(:func:`cartilage_subregion`). Label values are those of :data:`kneeprep.moaks.anatomy.SAMPLE_LABELS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeprep.moaks.anatomy import SAMPLE_LABELS
from kneeprep.synth.shapes import Capsule, Ellipsoid, EllipticCylinder, Meniscus, Union

#: label name -> label value of the sample's label map.
LABEL: dict[str, int] = {name: value for value, name in SAMPLE_LABELS.items()}


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
