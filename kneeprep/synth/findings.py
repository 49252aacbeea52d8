"""Findings of one synthetic knee: place the lesions on the canvas, and grade what was placed.

Choosing is separate from placing (:func:`kneeprep.synth.targets.draw_targets` -> ``KneeTargets``, a small
record) and grades are never taken from the targets: :func:`place_and_grade` paints the lesions (where and how
large: :mod:`kneeprep.synth.lesion_geometry`), then measures the painted voxels and applies the MOAKS
thresholds (``docs/DOMAIN.md``), so the answers always agree with the image.

Measured quantities and bands (``band_grade``: 0 when nothing is there, else 1/2/3 by the two cut points):

* BML size -- voxels of BML+cyst in the bone subregion / voxels of the subregion: <33 %, 33-66 %, >66 %.
  BML number -- separate blobs placed (1, 2, >=3). "% of lesion that is BML (excluding cyst)" -- non-cyst
  share of the lesion voxels: <33 %, 33-66 %, >66 %.
* Cartilage size -- lesion voxels / cartilage voxels of the subregion (a volume proxy of the area share):
  <10 %, 10-75 %, >75 %. Depth -- full-thickness share of the lesion voxels, same bands; 0 when none.
* Osteophyte grade -- radius of the spur: <3.2 mm grade 1, <5 mm grade 2, else 3.
* Effusion-synovitis -- volume of the "joint effusion" label: <4 ml grade 0, <8 ml 1, <13 ml 2, else 3.
* Hoffa-synovitis -- share of the fat-pad label showing synovitis signal: none 0, <20 % 1, <45 % 2, else 3.
* Meniscal extrusion -- distance (mm) of the meniscal edge beyond the tibial plateau margin, along ``m``
  (medial/lateral) or ``-p`` (anterior): <2 grade 0, 2-3 grade 1, 3-4.9 grade 2, >=5 grade 3.
"""

from __future__ import annotations

import numpy as np

from kneeprep.moaks.anatomy import CARTILAGE_PLATES, QUESTIONS
from kneeprep.synth.canvas import Canvas
from kneeprep.synth.image import Tissue
from kneeprep.synth.knee import LABEL, Anatomy, bone_subregion, cartilage_subregion
from kneeprep.synth.lesion_geometry import (
    extrusion_measures,
    farthest_points,
    osteophyte_site,
    radius_for_fraction,
    subchondral,
    voxel_diag,
)
from kneeprep.synth.shapes import Ball
from kneeprep.synth.targets import KneeTargets, meniscus_shifts

BML_SIZE_BANDS = (1 / 3, 2 / 3)
BML_SHARE_BANDS = (1 / 3, 2 / 3)
CARTILAGE_BANDS = (0.10, 0.75)
OSTEOPHYTE_RADIUS_BANDS = (3.2, 5.0)
EFFUSION_ML_BANDS = (4.0, 8.0, 13.0)
HOFFA_BANDS = (0.20, 0.45)
EXTRUSION_MM_BANDS = (2.0, 3.0, 5.0)

_SIZE_TARGET = {1: 0.15, 2: 0.50, 3: 0.85}  # mid-band fractions for BML size
_SHARE_TARGET = {1: 0.15, 2: 0.50, 3: 1.0}
_CART_SIZE_TARGET = {1: 0.05, 2: 0.35, 3: 0.90}
_CART_DEPTH_TARGET = {0: 0.0, 1: 0.05, 2: 0.40, 3: 0.90}
_OSTEOPHYTE_RADIUS = {1: 2.5, 2: 4.0, 3: 6.5}


_HOFFA_TARGET = {0: 0.0, 1: 0.10, 2: 0.32, 3: 0.65}


def band_grade(value: float, cuts) -> int:
    """0 for nothing (``value <= 0``), else 1 + the number of cut points ``value`` reaches (2 cuts -> 1..3).

    >>> [band_grade(v, (1 / 3, 2 / 3)) for v in (0.0, 0.1, 0.5, 0.9)]
    [0, 1, 2, 3]
    """
    if value <= 0:
        return 0
    return 1 + int(np.searchsorted(np.asarray(cuts), value, side="right"))


def level_grade(value: float, cuts) -> int:
    """Grade 0..len(cuts) by how many cut points ``value`` reaches (a level, not a presence).

    >>> [level_grade(v, (2.0, 3.0, 5.0)) for v in (0.5, 2.0, 4.9, 5.0)]
    [0, 1, 2, 3]
    """
    return int(np.searchsorted(np.asarray(cuts), value, side="right"))


def place_and_grade(canvas: Canvas, anatomy: Anatomy, targets: KneeTargets, rng: np.random.Generator):
    """Paint the lesions of ``targets`` on a canvas that already holds the anatomy; return
    ``(grades, lesions)``: ``grades`` maps every question id to ``{component: grade}`` measured from the
    canvas, ``lesions`` is a list of JSON-ready records (kind, region, question id, centre in LPS mm, radius,
    the measured quantities and grades)."""
    frame = canvas.frame
    sc = anatomy.scale
    voxel_mm3 = float(np.prod(canvas.geometry.spacing))
    lesions: list[dict] = []
    grades: dict[str, dict[str, int]] = {qid: {c: 0 for c in q.components} for qid, q in QUESTIONS.items()}
    qid_of = {(q.finding, q.region): qid for qid, q in QUESTIONS.items()}
    hoffa_qid = qid_of[("hoffa_synovitis", "")]
    tendon_qid = qid_of[("ligament", "patellar tendon")]

    def lps(c):
        return [round(float(v), 4) for v in frame.to_world(c)]

    # Osteophytes first: they add bone, which later measurements include.
    for location, grade in targets.osteophytes.items():
        bone, point = osteophyte_site(location)
        radius = _OSTEOPHYTE_RADIUS[grade] * sc
        c = anatomy.mm(point)
        soft = (0, LABEL["joint effusion"], LABEL["hoffa fat pad"])
        n = canvas.paint(
            Ball(c, radius),
            label=lambda m, p, s, bone=bone: bone_subregion(bone, m, p, s, anatomy),
            tissue=Tissue.MARROW,
            where=lambda labels, tissue, m, p, s, soft=soft: np.isin(labels, soft),
        )
        measured = band_grade(radius, OSTEOPHYTE_RADIUS_BANDS) if n else 0
        qid = qid_of[("osteophyte", location)]
        grades[qid]["grade"] = measured
        lesions.append(
            {
                "kind": "osteophyte",
                "region": location,
                "question_id": qid,
                "centre_lps": lps(c),
                "radius_mm": radius,
                "voxels": n,
                "grades": {"grade": measured},
            }
        )

    # Effusion: measured volume of the label painted with the anatomy.
    counts = np.bincount(canvas.labels.ravel(), minlength=256)
    eff_ml = counts[LABEL["joint effusion"]] * voxel_mm3 / 1000.0
    grades[qid_of[("effusion_synovitis", "")]]["grade"] = level_grade(eff_ml, EFFUSION_ML_BANDS)

    # Hoffa-synovitis: a blob of signal inside the fat pad.
    hoffa_idx = np.argwhere(canvas.labels == LABEL["hoffa fat pad"])
    hoffa_share = 0.0
    if targets.hoffa and len(hoffa_idx):
        pts = canvas.local_of_indices(hoffa_idx)
        c = pts.mean(axis=0)
        r = radius_for_fraction(np.linalg.norm(pts - c, axis=1), _HOFFA_TARGET[targets.hoffa])
        n = canvas.paint(
            Ball(c, r),
            tissue=Tissue.SYNOVITIS,
            where=lambda labels, tissue, m, p, s: labels == LABEL["hoffa fat pad"],
        )
        hoffa_share = n / len(hoffa_idx)
        g = band_grade(hoffa_share, HOFFA_BANDS)
        lesions.append(
            {
                "kind": "hoffa_synovitis",
                "region": "hoffa fat pad",
                "question_id": hoffa_qid,
                "centre_lps": lps(c),
                "radius_mm": r,
                "fraction": hoffa_share,
                "grades": {"grade": g},
            }
        )
    grades[hoffa_qid]["grade"] = band_grade(hoffa_share, HOFFA_BANDS)

    # Meniscal extrusion (shapes were shifted when the anatomy was painted).
    for loc, mm in extrusion_measures(anatomy, meniscus_shifts(targets, anatomy)).items():
        qid = qid_of[("meniscal_extrusion", loc)]
        g = level_grade(mm, EXTRUSION_MM_BANDS)
        grades[qid]["grade"] = g
        if g:
            lesions.append(
                {
                    "kind": "meniscal_extrusion",
                    "region": loc,
                    "question_id": qid,
                    "extrusion_mm": round(mm, 3),
                    "grades": {"grade": g},
                }
            )

    # Meniscal morphology: intrasubstance signal (1) or a horizontal cleft (3) in one part.
    for part, morph in targets.morphology.items():
        if not morph:
            continue
        side, *rest = part.split()
        label = LABEL[f"{side} meniscus {' '.join(rest)}"]
        idx = np.argwhere(canvas.labels == label)
        if not len(idx):
            continue
        pts = canvas.local_of_indices(idx)
        if morph == 1:
            keep = np.linalg.norm(pts - pts.mean(axis=0), axis=1) <= radius_for_fraction(
                np.linalg.norm(pts - pts.mean(axis=0), axis=1), 0.35
            )
            tissue = Tissue.MENISCUS_SIGNAL
        else:
            s_mid = anatomy.tibia_plateau_s + 1.6 * sc
            half = max(0.6 * sc, 0.5 * float(np.min(canvas.geometry.spacing)))
            keep = np.abs(pts[:, 2] - s_mid) <= half
            tissue = Tissue.FLUID
        sel = idx[keep]
        canvas.tissue[sel[:, 0], sel[:, 1], sel[:, 2]] = tissue
        measured = morph if len(sel) else 0
        qid = qid_of[("meniscal_morphology", part)]
        grades[qid]["morphology"] = measured
        lesions.append(
            {
                "kind": "meniscal_morphology",
                "region": part,
                "question_id": qid,
                "centre_lps": lps(pts[keep].mean(axis=0)) if len(sel) else None,
                "voxels": int(len(sel)),
                "grades": {"morphology": measured},
            }
        )

    # Patellar tendon signal abnormality and a popliteal cyst.
    if targets.tendon_signal:
        tendon = anatomy.patellar_tendon()
        c = tendon.a + 0.55 * (tendon.b - tendon.a)
        n = canvas.paint(
            Ball(c, 4.0 * sc),
            tissue=Tissue.TENDON_SIGNAL,
            where=lambda labels, tissue, m, p, s: labels == LABEL["patellar tendon"],
        )
        grades[tendon_qid]["signal_abnormality"] = int(n > 0)
        lesions.append(
            {
                "kind": "tendon_signal",
                "region": "patellar tendon",
                "question_id": tendon_qid,
                "centre_lps": lps(c),
                "radius_mm": 4.0 * sc,
                "voxels": n,
                "grades": {"signal_abnormality": int(n > 0)},
            }
        )
    if targets.popliteal_cyst:
        cyst = anatomy.popliteal_cyst()
        n = canvas.paint(cyst, tissue=Tissue.FLUID, where=lambda labels, tissue, m, p, s: labels == 0)
        qid = qid_of[("periarticular", "popliteal cyst")]
        grades[qid]["presence"] = int(n > 0)
        lesions.append(
            {
                "kind": "popliteal_cyst",
                "region": "popliteal cyst",
                "question_id": qid,
                "centre_lps": lps(cyst.c),
                "radius_mm": float(cyst.r.max()),
                "voxels": n,
                "grades": {"presence": int(n > 0)},
            }
        )

    # Cartilage defects: full-thickness core (fluid) inside a partial-thickness rim (intermediate signal).
    cart_labels = [LABEL[n] for n in CARTILAGE_PLATES]
    cart_idx = np.argwhere(np.isin(canvas.labels, cart_labels))
    cart_pts = canvas.local_of_indices(cart_idx)
    cart_sub = cartilage_subregion(canvas.labels[tuple(cart_idx.T)], cart_pts, anatomy)
    for region, (size_t, depth_t) in targets.cartilage.items():
        sel = cart_sub == LABEL[region]
        if not np.any(sel):
            continue
        pts, idx = cart_pts[sel], cart_idx[sel]
        c = pts[farthest_points(pts, 1, rng)[0]]
        dist = np.linalg.norm(pts - c, axis=1)
        r = radius_for_fraction(dist, _CART_SIZE_TARGET[size_t])
        lesion = dist < r
        r_ft = (
            radius_for_fraction(dist[lesion], _CART_DEPTH_TARGET[depth_t])
            if depth_t and lesion.any()
            else 0.0
        )
        full = dist < r_ft
        partial = lesion & ~full
        canvas.tissue[tuple(idx[partial].T)] = Tissue.CARTILAGE_PARTIAL
        canvas.tissue[tuple(idx[full].T)] = Tissue.FLUID
        n_lesion = int(lesion.sum())
        size_fraction = n_lesion / len(pts)
        depth_fraction = int(full.sum()) / n_lesion if n_lesion else 0.0
        g = {
            "cartilage_size": band_grade(size_fraction, CARTILAGE_BANDS),
            "cartilage_depth": band_grade(depth_fraction, CARTILAGE_BANDS),
        }
        qid = qid_of[("cartilage", region)]
        grades[qid].update(g)
        lesions.append(
            {
                "kind": "cartilage",
                "region": region,
                "question_id": qid,
                "centre_lps": lps(c),
                "radius_mm": r,
                "full_thickness_radius_mm": r_ft,
                "fraction": size_fraction,
                "full_thickness_fraction": depth_fraction,
                "region_voxels": int(len(pts)),
                "grades": g,
            }
        )

    # Bone-marrow lesions: separate blobs near the articular surface of the subregion, optional cyst core.
    diag = voxel_diag(canvas)
    for region, (size_t, blobs_t, share_t) in targets.bml.items():
        label = LABEL[region]
        idx = np.argwhere(canvas.labels == label)
        if not len(idx):
            continue
        pts = canvas.local_of_indices(idx)
        near = subchondral(region, pts, anatomy)
        cand = pts[near] if near.sum() >= 10 else pts
        fraction, k = _SIZE_TARGET[size_t], blobs_t
        for _ in range(12):
            centres = [cand[i] for i in farthest_points(cand, k, rng)]
            dists = [np.linalg.norm(pts - c, axis=1) for c in centres]
            radii = [radius_for_fraction(d, fraction / k) for d in dists]
            ok = all(
                np.linalg.norm(centres[a] - centres[b]) > radii[a] + radii[b] + diag
                for a in range(k)
                for b in range(a + 1, k)
            )
            if ok:
                break
            fraction *= 0.85
            if fraction < 0.02 * k and k > 1:
                k, fraction = k - 1, _SIZE_TARGET[size_t]
        in_lesion = np.zeros(len(pts), dtype=bool)
        in_cyst = np.zeros(len(pts), dtype=bool)
        blob_records = []
        for c, d, r in zip(centres, dists, radii, strict=True):
            member = d < r
            r_c = (
                radius_for_fraction(d[member], 1.0 - _SHARE_TARGET[share_t])
                if share_t < 3 and member.any()
                else 0.0
            )
            in_lesion |= member
            in_cyst |= d < r_c
            blob_records.append((c, r, r_c))
        bml_only = in_lesion & ~in_cyst
        canvas.tissue[tuple(idx[bml_only].T)] = Tissue.BML
        canvas.tissue[tuple(idx[in_cyst].T)] = Tissue.CYST
        n_lesion = int(in_lesion.sum())
        size_fraction = n_lesion / len(pts)
        share = int(bml_only.sum()) / n_lesion if n_lesion else 0.0
        g = {
            "bml_size": band_grade(size_fraction, BML_SIZE_BANDS),
            "bml_number": min(3, len(blob_records)) if n_lesion else 0,
            "bml_percent": band_grade(share, BML_SHARE_BANDS),
        }
        qid = qid_of[("bml", region)]
        grades[qid].update(g)
        for n_blob, (c, r, r_c) in enumerate(blob_records):
            lesions.append(
                {
                    "kind": "bml",
                    "region": region,
                    "question_id": qid,
                    "blob": n_blob,
                    "centre_lps": lps(c),
                    "radius_mm": r,
                    "cyst_radius_mm": r_c,
                    "fraction": size_fraction,
                    "bml_share": share,
                    "region_voxels": int(len(pts)),
                    "grades": g,
                }
            )
    return grades, lesions
