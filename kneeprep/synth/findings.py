"""Findings of one synthetic knee: draw targets, place lesions on the canvas, and grade what was placed.

Choosing is separate from placing (``draw_targets`` -> :class:`KneeTargets`, a small record) and grades are
never taken from the targets: :func:`place_and_grade` paints the lesions, then measures the painted voxels
and applies the MOAKS thresholds (``docs/DOMAIN.md``), so the answers always agree with the image.

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

from dataclasses import dataclass, field

import numpy as np

from kneeprep.moaks.anatomy import (
    BML_REGIONS,
    CARTILAGE_PLATES,
    CARTILAGE_REGIONS,
    MENISCUS_PARTS,
    OSTEOPHYTE_LOCATIONS,
    QUESTIONS,
)
from kneeprep.synth.phantom import (
    LABEL,
    Anatomy,
    Ball,
    Canvas,
    Tissue,
    bone_subregion,
    cartilage_subregion,
)

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
_EFFUSION_ML = {0: 2.5, 1: 6.0, 2: 10.5, 3: 17.0}
_HOFFA_TARGET = {0: 0.0, 1: 0.10, 2: 0.32, 3: 0.65}

#: osteophyte location -> (bone, knee-frame point on the bone margin, unscaled mm; medial versions)
_OSTEOPHYTE_SITES = {
    "patella superior": ("patella", (0.0, -37.0, 47.0)),
    "patella inferior": ("patella", (0.0, -37.0, 13.0)),
    "patella medial": ("patella", (20.0, -37.0, 30.0)),
    "femur medial anterior": ("femur", (24.0, -14.6, 28.0)),
    "femur medial central": ("femur", (33.6, 4.0, 12.0)),
    "femur medial posterior": ("femur", (22.0, 26.0, 20.0)),
    "tibia medial": ("tibia", (39.0, 3.0, -5.0)),
}


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


@dataclass(frozen=True)
class KneeTargets:
    """What to place in one knee (the intent; grades are measured after placing)."""

    bml: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # region -> (size, blobs, share grade)
    cartilage: dict[str, tuple[int, int]] = field(default_factory=dict)  # region -> (size, depth)
    osteophytes: dict[str, int] = field(default_factory=dict)  # location -> grade
    effusion: int = 0
    hoffa: int = 0
    extrusion_mm: dict[str, float] = field(default_factory=dict)  # "medial medial" etc. -> shift in mm
    morphology: dict[str, int] = field(default_factory=dict)  # meniscus part -> 0, 1 or 3
    tendon_signal: bool = False
    popliteal_cyst: bool = False

    def to_json(self) -> dict:
        return {
            "bml": {k: list(v) for k, v in self.bml.items()},
            "cartilage": {k: list(v) for k, v in self.cartilage.items()},
            "osteophytes": dict(self.osteophytes),
            "effusion": self.effusion,
            "hoffa": self.hoffa,
            "extrusion_mm": dict(self.extrusion_mm),
            "morphology": dict(self.morphology),
            "tendon_signal": self.tendon_signal,
            "popliteal_cyst": self.popliteal_cyst,
        }


def draw_targets(rng: np.random.Generator, *, at_least_one_lesion: bool = False) -> KneeTargets:
    """Random findings for one knee, with prevalences loosely like an OA cohort."""
    n_bml = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
    n_cart = int(rng.choice(4, p=[0.3, 0.35, 0.25, 0.10]))
    if at_least_one_lesion:
        n_bml, n_cart = max(n_bml, 1), max(n_cart, 1)
    bml = {}
    for r in rng.choice(BML_REGIONS, size=n_bml, replace=False):
        size = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        blobs = 1 if size == 3 else int(rng.integers(1, 3 if size == 2 else 4))
        share = int(rng.choice([3, 2, 1], p=[0.6, 0.25, 0.15]))
        bml[str(r)] = (size, blobs, share)
    cartilage = {}
    for r in rng.choice(CARTILAGE_REGIONS, size=n_cart, replace=False):
        cartilage[str(r)] = (int(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15])), int(rng.choice(4)))
    n_ost = int(rng.choice(5, p=[0.3, 0.3, 0.2, 0.1, 0.1]))
    osteophytes = {
        str(r): int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        for r in rng.choice(OSTEOPHYTE_LOCATIONS, size=n_ost, replace=False)
    }
    shifts = [0.0, 2.5, 4.0, 6.0]
    extrusion = {
        "medial medial": float(rng.choice(shifts, p=[0.55, 0.2, 0.15, 0.10])),
        "medial anterior": float(rng.choice(shifts, p=[0.8, 0.1, 0.05, 0.05])),
        "lateral lateral": float(rng.choice(shifts, p=[0.85, 0.1, 0.05, 0.0])),
        "lateral anterior": float(rng.choice(shifts, p=[0.9, 0.1, 0.0, 0.0])),
    }
    morphology = {
        part: int(
            rng.choice([0, 1, 3], p=[0.6, 0.2, 0.2] if part == "medial posterior horn" else [0.9, 0.1, 0.0])
        )
        for part in MENISCUS_PARTS
    }
    return KneeTargets(
        bml=bml,
        cartilage=cartilage,
        osteophytes=osteophytes,
        effusion=int(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1])),
        hoffa=int(rng.choice(4, p=[0.5, 0.3, 0.15, 0.05])),
        extrusion_mm=extrusion,
        morphology=morphology,
        tendon_signal=bool(rng.random() < 0.15),
        popliteal_cyst=bool(rng.random() < 0.3),
    )


def meniscus_shifts(targets: KneeTargets, anatomy: Anatomy) -> dict[str, tuple[float, float]]:
    """Meniscus shift ``(dm, dp)`` per side (outward along m is +m medially, -m laterally; anterior is -p)."""
    sc = anatomy.scale
    e = targets.extrusion_mm
    return {
        "medial": (e.get("medial medial", 0.0) * sc, -e.get("medial anterior", 0.0) * sc),
        "lateral": (-e.get("lateral lateral", 0.0) * sc, -e.get("lateral anterior", 0.0) * sc),
    }


def effusion_size(grade: int, anatomy: Anatomy) -> float:
    """The effusion shape parameter whose nominal ellipsoid volume is the mid-band volume of ``grade``."""
    target_mm3 = _EFFUSION_ML[grade] * 1000.0
    lo, hi = 0.0, 1.5
    for _ in range(40):
        mid = (lo + hi) / 2
        r = anatomy.effusion(mid).r
        if 4.0 / 3.0 * np.pi * np.prod(r) < target_mm3:
            lo = mid
        else:
            hi = mid
    return lo


def extrusion_measures(anatomy: Anatomy, shifts: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Extrusion in mm per location, from the shapes: meniscal edge minus tibial plateau margin."""
    plateau = anatomy.tibia_plateau()
    out = {}
    for side in ("medial", "lateral"):
        men = anatomy.meniscus(side == "medial", shifts[side])
        outward = 1.0 if side == "medial" else -1.0
        # along m through the meniscus centre
        edge_m = outward * (men.c[0] + outward * men.outer * men.r[0])
        dp = men.c[1] - plateau.c[1]
        plateau_m = plateau.c[0] + plateau.r[0] * np.sqrt(max(0.0, 1 - (dp / plateau.r[1]) ** 2))
        out[f"{side} {'medial' if side == 'medial' else 'lateral'}"] = float(edge_m - plateau_m)
        # along -p through the (unshifted) plate centre column
        mc = anatomy.plate_centre(side == "medial")[0]
        edge_p = men.c[1] - men.outer * men.r[1] * np.sqrt(
            max(0.0, 1 - ((mc - men.c[0]) / (men.outer * men.r[0])) ** 2)
        )
        plateau_p = plateau.c[1] - plateau.r[1] * np.sqrt(
            max(0.0, 1 - ((mc - plateau.c[0]) / plateau.r[0]) ** 2)
        )
        out[f"{side} anterior"] = float(plateau_p - edge_p)
    return out


def _radius_for_fraction(dist: np.ndarray, fraction: float) -> float:
    """A radius enclosing ``fraction`` of the points at distances ``dist``, halfway between two distances."""
    d = np.sort(dist)
    k = int(round(fraction * len(d)))
    if k <= 0:
        return float(d[0] / 2) if len(d) else 0.0
    if k >= len(d):
        return float(d[-1] + 0.5)
    return float((d[k - 1] + d[k]) / 2)


def _farthest_points(points: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    first = (
        int(np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1)))
        if k == 1
        else int(rng.integers(len(points)))
    )
    chosen = [first]
    d = np.linalg.norm(points - points[first], axis=1)
    while len(chosen) < k:
        nxt = int(np.argmax(d))
        chosen.append(nxt)
        d = np.minimum(d, np.linalg.norm(points - points[nxt], axis=1))
    return chosen


def _voxel_diag(canvas: Canvas) -> float:
    return float(np.linalg.norm(canvas.geometry.spacing))


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
        bone, point = _osteophyte_site(location)
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
        r = _radius_for_fraction(np.linalg.norm(pts - c, axis=1), _HOFFA_TARGET[targets.hoffa])
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
            keep = np.linalg.norm(pts - pts.mean(axis=0), axis=1) <= _radius_for_fraction(
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
        c = pts[_farthest_points(pts, 1, rng)[0]]
        dist = np.linalg.norm(pts - c, axis=1)
        r = _radius_for_fraction(dist, _CART_SIZE_TARGET[size_t])
        lesion = dist < r
        r_ft = (
            _radius_for_fraction(dist[lesion], _CART_DEPTH_TARGET[depth_t])
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
    diag = _voxel_diag(canvas)
    for region, (size_t, blobs_t, share_t) in targets.bml.items():
        label = LABEL[region]
        idx = np.argwhere(canvas.labels == label)
        if not len(idx):
            continue
        pts = canvas.local_of_indices(idx)
        near = _subchondral(region, pts, anatomy)
        cand = pts[near] if near.sum() >= 10 else pts
        fraction, k = _SIZE_TARGET[size_t], blobs_t
        for _ in range(12):
            centres = [cand[i] for i in _farthest_points(cand, k, rng)]
            dists = [np.linalg.norm(pts - c, axis=1) for c in centres]
            radii = [_radius_for_fraction(d, fraction / k) for d in dists]
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
                _radius_for_fraction(d[member], 1.0 - _SHARE_TARGET[share_t])
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


def _osteophyte_site(location: str) -> tuple[str, tuple[float, float, float]]:
    if location in _OSTEOPHYTE_SITES:
        return _OSTEOPHYTE_SITES[location]
    medial_name = location.replace("lateral", "medial")
    bone, (m, p, s) = _OSTEOPHYTE_SITES[medial_name]
    return bone, (-m, p, s)


def _subchondral(region: str, pts: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Points of a bone subregion close to its articular surface (where MOAKS BMLs sit)."""
    sc = anatomy.scale
    if region.startswith("femur"):
        return pts[:, 2] < 22.0 * sc
    if region.startswith("tibia"):
        return pts[:, 2] > anatomy.tibia_plateau_s - 14.0 * sc
    return pts[:, 1] > anatomy.patella().c[1] - 2.0 * sc
