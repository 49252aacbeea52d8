"""Where the synthetic lesions go and how large they are: osteophyte sites on the bone margins, the
subchondral band of a bone subregion, blob centres spread apart, radii enclosing a share of a region's voxels,
and the meniscal extrusion (mm) the shifted menisci give.
"""

from __future__ import annotations

import numpy as np

from kneeprep.synth.canvas import Canvas
from kneeprep.synth.knee import Anatomy

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


def radius_for_fraction(dist: np.ndarray, fraction: float) -> float:
    """A radius enclosing ``fraction`` of the points at distances ``dist``, halfway between two distances."""
    d = np.sort(dist)
    k = int(round(fraction * len(d)))
    if k <= 0:
        return float(d[0] / 2) if len(d) else 0.0
    if k >= len(d):
        return float(d[-1] + 0.5)
    return float((d[k - 1] + d[k]) / 2)


def farthest_points(points: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
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


def voxel_diag(canvas: Canvas) -> float:
    return float(np.linalg.norm(canvas.geometry.spacing))


def osteophyte_site(location: str) -> tuple[str, tuple[float, float, float]]:
    if location in _OSTEOPHYTE_SITES:
        return _OSTEOPHYTE_SITES[location]
    medial_name = location.replace("lateral", "medial")
    bone, (m, p, s) = _OSTEOPHYTE_SITES[medial_name]
    return bone, (-m, p, s)


def subchondral(region: str, pts: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    """Points of a bone subregion close to its articular surface (where MOAKS BMLs sit)."""
    sc = anatomy.scale
    if region.startswith("femur"):
        return pts[:, 2] < 22.0 * sc
    if region.startswith("tibia"):
        return pts[:, 2] > anatomy.tibia_plateau_s - 14.0 * sc
    return pts[:, 1] > anatomy.patella().c[1] - 2.0 * sc
