"""Shared pytest fixtures: the OAI-like sample and a factory for small DICOM series.

* ``small_sample`` -- ``kneeprep.synth.generate(root, patients=3, size="small", seed=0)`` written once per
  session; returns the sample's root ``Path`` (``raw/``, ``masks/``, ``split_files/``, ``questions.json``,
  ``quintuples.jsonl``, ``truth.json``). Treat it as read-only: copy what you want to break.
* ``synth_series`` -- a factory ``make(folder, shape=(8, 32, 32), spacing=(0.7, 0.5, 0.5), direction=PIR,
  origin=(0, 0, 0), **write_series_kwargs) -> SeriesOnDisk`` writing a small sagittal MR series (a smooth
  ramp, so every slice differs) with :func:`kneeprep.synth.write_series`; defect fixtures pass ``tags`` /
  ``slice_tags`` / ``file_names`` or edit the returned files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

#: ITK row-major direction of a "PIR" sagittal grid: ITK axis 0 (columns) -> P, 1 (rows) -> I, 2 (slices) -> R.
PIR_DIRECTION = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


@dataclass(frozen=True)
class SeriesOnDisk:
    folder: Path
    files: list[Path]
    array: np.ndarray
    geometry: object  # kneeprep.geometry.Geometry


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory) -> Path:
    from kneeprep.synth import generate

    root = tmp_path_factory.mktemp("sample")
    generate(root, patients=3, size="small", seed=0)
    return root


@pytest.fixture
def synth_series(tmp_path):
    from kneeprep.geometry import Geometry, affine_from_itk
    from kneeprep.synth import write_series

    def make(
        folder: str | Path = "series",
        shape=(8, 32, 32),
        spacing=(0.7, 0.5, 0.5),
        direction=PIR_DIRECTION,
        origin=(0.0, 0.0, 0.0),
        **kwargs,
    ) -> SeriesOnDisk:
        folder = Path(folder)
        if not folder.is_absolute():
            folder = tmp_path / folder
        z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
        array = (100 + 20 * z + 3 * y + x).astype(np.uint16)
        itk_spacing = tuple(reversed(spacing))
        geometry = Geometry(tuple(shape), tuple(spacing), affine_from_itk(origin, itk_spacing, direction))
        files = write_series(array, geometry, folder, **kwargs)
        return SeriesOnDisk(folder, files, array, geometry)

    return make
