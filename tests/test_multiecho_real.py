"""Real multi-echo series written by a Siemens Prisma (imagedata 3.9.7's sdist on PyPI, MIT, (c) Erling
Andersen, Haukeland University Hospital): 4 echoes x 3 repeated acquisitions (AcquisitionNumber, no temporal
tags) of the same positions, each image set compared with dcm2niix's echo NIfTI (acquisitions as its 4th
dimension) in world space. `make test` downloads the sdist into ``$(VENV)/testdata`` (docs/FORMATS.md).
"""

from __future__ import annotations

import io
import os
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import pydicom
import pytest
from test_enhanced import dcm2niix_all
from test_real_dicom import assert_same_in_world

from kneeprep.dicom import read_series, scan_tree
from kneeprep.recipe import QC

SDIST = "imagedata-3.9.7.tar.gz"


def _sdist() -> Path:
    folder = Path(os.environ.get("KNEEPREP_TESTDATA", Path(sys.prefix) / "testdata"))
    path = folder / SDIST
    if not path.exists():
        pytest.skip(f"{path} absent (test data only: `make test` downloads it from PyPI)")
    return path


def imagedata_series(dest: Path, zip_name: str, member: str, acquisition: int | None = None) -> Path:
    """The zip members of the sdist's ``data/dicom/<zip_name>`` whose name contains ``member`` (one series),
    written unmodified to ``dest``; only those of AcquisitionNumber ``acquisition`` when given."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_sdist()) as tar:
        blob = tar.extractfile(f"imagedata-3.9.7/data/dicom/{zip_name}").read()
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for name in z.namelist():
            if member in name and not name.endswith("/"):
                data = z.read(name)
                if acquisition is not None:
                    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                    if int(ds.AcquisitionNumber) != acquisition:
                        continue
                (dest / Path(name).name).write_bytes(data)
    return dest


def _by_echo(nii: dict) -> dict[int, tuple]:
    """dcm2niix's NIfTI by echo number (its names end in the echo: ``6_e2`` or ``6_2``)."""
    out = {}
    for name, v in nii.items():
        m = re.search(r"_e?(\d+)$", name)
        assert m, name
        out[int(m.group(1))] = v
    return out


def _check_against_dcm2niix(folder: Path, tmp_path: Path, n_echoes: int, n_acq: int, qc: QC) -> None:
    series = scan_tree(folder, qc).series
    assert len(series) == n_echoes * n_acq
    assert all(s.qc.status == "ok" for s in series), [s.qc.reasons for s in series]
    ref = _by_echo(dcm2niix_all(folder, tmp_path / "nii"))
    assert sorted(ref) == list(range(1, n_echoes + 1))
    seen = set()
    for s in series:
        attrs = dict(zip(s.image_set["attributes"], s.image_set["values"], strict=True))
        e, a = attrs["EchoNumbers"], attrs.get("AcquisitionNumber", 1)
        assert s.image_set["suffix"] == (f"e{e}-a{a}" if n_acq > 1 else f"e{e}")
        assert s.volume_id.endswith("_" + s.image_set["suffix"])
        seen.add((e, a))
        vol, geo = read_series(s)
        data, aff = ref[e]
        sub = data[..., a - 1] if data.ndim == 4 else data
        assert data.ndim == (4 if n_acq > 1 else 3) and (data.shape[3] if n_acq > 1 else 1) == n_acq
        assert float(abs(vol).max()) > 0  # a real image: equality below is not of zeros
        assert_same_in_world(vol, geo.affine_lps, sub, aff)
    assert seen == {(e, a) for e in range(1, n_echoes + 1) for a in range(1, n_acq + 1)}


def test_siemens_4_echoes_3_acquisitions_make_12_volumes_like_dcm2niix(tmp_path):
    folder = imagedata_series(tmp_path / "s6", "6D_TE_TIME_FA.zip", ".MR.IMAGEDATA.0006.")
    assert len(list(folder.iterdir())) == 96  # 8 positions x 4 echoes x 3 acquisitions
    _check_against_dcm2niix(folder, tmp_path, 4, 3, QC())


def test_siemens_one_acquisition_of_4_echoes_makes_4_volumes_like_dcm2niix(tmp_path):
    folder = imagedata_series(tmp_path / "s6a1", "6D_TE_TIME_FA.zip", ".MR.IMAGEDATA.0006.", acquisition=1)
    assert len(list(folder.iterdir())) == 32
    _check_against_dcm2niix(folder, tmp_path, 4, 1, QC())


def test_siemens_2d_3_slices_4_echoes_3_acquisitions_like_dcm2niix(tmp_path):
    folder = imagedata_series(tmp_path / "5d", "5D.zip", "t1_fl2d_DE_4TEs/")
    assert len(list(folder.iterdir())) == 36
    assert all(s.qc.status != "ok" for s in scan_tree(folder).series)  # 3 slices: under the default minimum
    _check_against_dcm2niix(folder, tmp_path, 4, 3, QC(min_slices=3))
