"""A procedural knee phantom: the normal anatomy painted onto any voxel grid.

The pieces: the knee frame and solids (:mod:`kneeprep.synth.shapes`), one knee's dimensions and subregion
rules (:mod:`kneeprep.synth.knee`), the canvas they are painted on (:mod:`kneeprep.synth.canvas`) and the
DESS-like image made from its tissue map (:mod:`kneeprep.synth.image`). :func:`paint_anatomy` paints soft
tissue first and bones last; lesions are painted afterwards (:mod:`kneeprep.synth.findings`).
"""

from __future__ import annotations

import numpy as np

from kneeprep.synth.canvas import Canvas
from kneeprep.synth.image import Tissue
from kneeprep.synth.knee import LABEL, Anatomy, bone_subregion
from kneeprep.synth.shapes import Ellipsoid, EllipticCylinder, Shape, Union


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
