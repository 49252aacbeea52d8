"""Planning an OAI-like sample (:func:`plan_sample`): patients, knees, series folders, positions,
obliquities, splits and findings, all drawn from the seed. Cheap and pure; :mod:`kneeprep.synth.sample`
renders and writes a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeprep.synth.grids import GRIDS
from kneeprep.synth.targets import KneeTargets, draw_targets


@dataclass(frozen=True)
class KneePlan:
    side: int  # 1 right, 2 left
    series: dict[str, str]  # kind ("LOCALIZER", "DESS", "COR_MPR") -> 8-digit series folder
    centre_lps: tuple[float, float, float]
    obliquity_deg: tuple[float, float]  # (about S, about A)
    study_time: str
    targets: KneeTargets

    @property
    def side_name(self) -> str:
        return "RIGHT" if self.side == 1 else "LEFT"


@dataclass(frozen=True)
class PatientPlan:
    index: int
    patient_id: str
    study_date: str
    barcode: str
    scale: float
    split: str
    knees: tuple[KneePlan, ...]


@dataclass(frozen=True)
class SamplePlan:
    size: str
    seed: int
    patients: tuple[PatientPlan, ...]

    @property
    def n_series(self) -> int:
        return sum(len(k.series) for p in self.patients for k in p.knees)


def plan_sample(patients: int = 2, size: str = "full", seed: int = 0) -> SamplePlan:
    """Choose patients, knees, series folders, positions, obliquities, splits and findings from ``seed``.

    With two or more patients at least one right and one left knee exist, and the first left knee is
    clearly oblique (5-8 degrees about the superior axis). With three or more, every split has a patient.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if size not in GRIDS:
        raise ValueError(f"size must be one of {sorted(GRIDS)}, got {size!r}")
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(9_000_000, 10_000_000), size=patients, replace=False)
    options = [(1,), (2,), (1, 2)]
    sides = [options[int(rng.choice(3, p=[0.3, 0.3, 0.4]))] for _ in range(patients)]
    if patients >= 2:
        if not any(1 in s for s in sides):
            sides[0] = tuple(sorted(set(sides[0]) | {1}))
        if not any(2 in s for s in sides):
            sides[1] = tuple(sorted(set(sides[1]) | {2}))
    splits = _assign_splits(patients, rng)
    series_base = rng.choice(np.arange(10_000_000, 99_000_000, 1000), size=patients, replace=False)
    out = []
    oblique_left_done = False
    first_knee = True
    for i in range(patients):
        days = int(rng.integers(0, 2 * 365))
        date = np.datetime64("2004-03-01") + np.timedelta64(days, "D")
        knees = []
        for n, side in enumerate(sides[i]):
            yaw = float(rng.uniform(-4.0, 4.0))
            if side == 2 and not oblique_left_done:
                yaw = float(rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 8.0))
                oblique_left_done = True
            tilt = float(rng.uniform(-2.0, 2.0))
            x = (-82.0 if side == 1 else 82.0) + float(rng.normal(0, 4))
            centre = (round(x, 3), round(float(rng.normal(15, 5)), 3), round(float(rng.normal(-5, 10)), 3))
            base = int(series_base[i]) + 100 * n
            folders = {
                kind: f"{base + k * 7 + 3:08d}" for k, kind in enumerate(("LOCALIZER", "DESS", "COR_MPR"))
            }
            hh, mm = 9 + 2 * n + int(rng.integers(0, 2)), int(rng.integers(0, 60))
            knees.append(
                KneePlan(
                    side=side,
                    series=folders,
                    centre_lps=centre,
                    obliquity_deg=(round(yaw, 3), round(tilt, 3)),
                    study_time=f"{hh:02d}{mm:02d}00",
                    targets=draw_targets(rng, at_least_one_lesion=first_knee),
                )
            )
            first_knee = False
        out.append(
            PatientPlan(
                index=i,
                patient_id=str(int(ids[i])),
                study_date=str(date).replace("-", ""),
                barcode=f"0166{int(rng.integers(0, 10**8)):08d}",
                scale=round(float(rng.uniform(0.93, 1.07)), 4),
                split=splits[i],
                knees=tuple(knees),
            )
        )
    return SamplePlan(size=size, seed=seed, patients=tuple(out))


def _assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """Split labels by patient: 70/15/15 with every split non-empty from 3 patients on."""
    if n == 1:
        return ["train"]
    if n == 2:
        labels = ["train", "test"]
    else:
        n_val = max(1, round(0.15 * n))
        n_test = max(1, round(0.15 * n))
        labels = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return [labels[i] for i in rng.permutation(n)]
