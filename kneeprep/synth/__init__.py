"""The OAI-like sample generator behind ``kneeprep synth``.

``generate(out, patients=2, size="full", seed=0)`` writes a raw OAI-style DICOM tree, NIfTI label maps,
the annotation directory (split CSVs, question bank, quintuples JSONL) and ``truth.json`` (grids, label
centroids, lesions and grades as placed); see :mod:`kneeprep.synth.sample` for the layout.

Modules: ``dicom_writer`` (any ``(z, y, x)`` array -> classic MR Image Storage series; test fixtures build
their defective series on it), ``enhanced_writer`` (the same as one Enhanced MR file); the phantom: ``shapes``
(the knee frame and solids), ``knee`` (one knee's dimensions, MOAKS subregion rules), ``canvas`` (painting
onto a grid), ``phantom`` (the normal anatomy painted), ``image`` (tissues -> DESS-like image); the findings:
``targets`` (what to place, drawn from the seed), ``lesion_geometry`` (where and how large), ``findings``
(lesions placed and graded from what was painted); ``answers`` (prompts, answer JSON, reasoning; not named
``annotations``, which ``from __future__ import annotations`` would shadow in this package); the sample:
``plan`` (planning), ``grids`` (DESS, MPR and localizer grids), ``dicom_tags`` (header contents, PHI
markers, UIDs), ``sample`` (writing).
"""

from __future__ import annotations

from pathlib import Path

from kneeprep.synth.dicom_tags import PHI_MARKERS
from kneeprep.synth.dicom_writer import make_uid, write_series
from kneeprep.synth.grids import GRIDS
from kneeprep.synth.plan import SamplePlan, plan_sample
from kneeprep.synth.sample import SampleSummary, write_sample

__all__ = [
    "GRIDS",
    "PHI_MARKERS",
    "SamplePlan",
    "SampleSummary",
    "generate",
    "make_uid",
    "plan_sample",
    "write_sample",
    "write_series",
]


def generate(
    out: str | Path, patients: int = 2, size: str = "full", seed: int = 0, *, progress=None
) -> SampleSummary:
    """Write an OAI-like sample of ``patients`` patients under ``out`` (``size`` "full" = the OAI DESS
    protocol, 160 x 384 x 384; "small" = 40 x 96 x 96 over the same field of view). Deterministic in ``seed``."""
    return write_sample(plan_sample(patients, size, seed), out, progress=progress)
