"""What to place in one synthetic knee: :class:`KneeTargets`, drawn at random with prevalences loosely like an
OA cohort (:func:`draw_targets`), and the shape parameters the anatomy is painted with for them (meniscus
shifts, effusion size).

The targets are the intent only: grades are measured from what was painted (:mod:`kneeprep.synth.findings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kneeprep.moaks.anatomy import BML_REGIONS, CARTILAGE_REGIONS, MENISCUS_PARTS, OSTEOPHYTE_LOCATIONS
from kneeprep.synth.knee import Anatomy

_EFFUSION_ML = {0: 2.5, 1: 6.0, 2: 10.5, 3: 17.0}


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
