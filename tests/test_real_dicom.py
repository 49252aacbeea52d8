"""DICOM written by other software (pydicom's and nibabel's test files), and dcm2niix as the reference.

dcm2niix stores rows in the reverse order of SimpleITK/kneeprep, so volumes are compared in world space:
every kneeprep voxel's LPS centre is mapped through dcm2niix's own affine to its voxel, and the values must
be equal there.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from kneeprep.dicom import read_series, read_slices, scan_tree
from kneeprep.errors import UnsupportedSeriesError
from kneeprep.recipe import QC

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
DIRTESTS = TEST_FILES / "dicomdirtests"
DCM2NIIX = Path(sys.executable).with_name("dcm2niix")


def copy_files(files, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / Path(f).name)
    return dest


def dcm2niix(folder: Path, out: Path):
    """Convert ``folder`` with dcm2niix; returns (data as float, affine_lps) of the single NIfTI written."""
    import nibabel as nib

    if not DCM2NIIX.exists():
        pytest.skip("dcm2niix binary not installed")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(DCM2NIIX), "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
    )
    niis = sorted(out.glob("*.nii"))
    assert len(niis) == 1, niis
    img = nib.load(niis[0])
    return np.asarray(img.get_fdata()), np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine  # RAS -> LPS


def assert_same_in_world(vol, affine_lps, ref, ref_affine_lps):
    """Same value at the same LPS point, for every voxel of ``vol`` (grids must coincide)."""
    idx = np.indices(vol.shape).reshape(3, -1).T.astype(float)
    world = idx @ affine_lps[:3, :3].T + affine_lps[:3, 3]
    inv = np.linalg.inv(ref_affine_lps)
    ref_idx = world @ inv[:3, :3].T + inv[:3, 3]
    rounded = np.rint(ref_idx)
    assert np.abs(ref_idx - rounded).max() < 1e-3, "grids do not coincide"
    r = rounded.astype(int)
    assert (r >= 0).all() and (r < np.array(ref.shape[:3])).all()
    np.testing.assert_array_equal(vol.reshape(-1), ref[r[:, 0], r[:, 1], r[:, 2]])


def test_ct5n_reads_and_matches_dcm2niix_in_world_space(tmp_path):
    folder = copy_files(sorted((DIRTESTS / "98892001" / "CT5N").iterdir()), tmp_path / "ct5n")
    r = scan_tree(folder, QC(min_slices=3))
    assert len(r.series) == 1
    s = r.series[0]
    assert s.qc.status == "ok" and s.n_slices == 5 and s.id_source == "tags"
    assert s.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    vol, geo = read_series(s)
    # signed 16-bit stored values with intercept -1024 can reach -33792: int32 holds every possible value
    assert vol.dtype == np.int32 and vol.min() < 0
    # axis 0 runs along +z (slice normal of IOP 1,0,0 / 0,1,0): the first slice is the lowest position
    assert geo.affine_lps[2, 3] == pytest.approx(-1.2375) and geo.affine_lps[2, 0] == pytest.approx(2.5)
    ref, ref_aff = dcm2niix(folder, tmp_path / "nii")
    assert_same_in_world(vol, geo.affine_lps, ref, ref_aff)
    # default tolerances: 5 slices are too few for a volume, and the verdict says so
    assert scan_tree(folder).series[0].qc.first_reason == "too few slices: 5 < min_slices 8"


def test_ct2_gap_is_missing_slices(tmp_path):
    folder = copy_files(sorted((DIRTESTS / "77654033" / "CT2").iterdir()), tmp_path / "ct2")
    (s,) = scan_tree(folder, QC(min_slices=2)).series
    assert s.qc.status == "fail"
    assert s.qc.first_reason.startswith("missing slices: 161 slice(s) missing at the 1.25 mm spacing")
    assert "between 17106 (-99.48 mm) and 17136 (103 mm)" in s.qc.first_reason


def test_mr700_is_not_a_stack(tmp_path):
    folder = copy_files(sorted((DIRTESTS / "98892003" / "MR700").iterdir()), tmp_path / "mr700")
    r = scan_tree(folder)
    assert len(r.series) == 7 and {s.series_uid for s in r.series} == {r.series[0].series_uid}
    for s in r.series:
        assert s.qc.status == "unsupported" and s.n_slices == 1
        assert any(x.startswith("single file") for x in s.qc.reasons)
        assert any("split into 7 series" in x for x in s.qc.reasons)
        with pytest.raises(UnsupportedSeriesError, match="unsupported"):
            read_series(s)
    assert len({s.volume_id for s in r.series}) == 7


MR_SMALL = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]


@pytest.mark.parametrize("name", MR_SMALL)
def test_single_files_are_unsupported_but_decode_exactly(tmp_path, name):
    path = TEST_FILES / name
    (s,) = scan_tree(copy_files([path], tmp_path / "one")).series
    assert (
        s.qc.status == "unsupported"
        and s.qc.first_reason == f"single file ({name}): one 2D image is not a volume"
    )
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    expected = ds.pixel_array.astype(np.int16)  # uncompressed reference, decoded by pydicom
    got = read_slices([path])
    assert got.shape == (1, *expected.shape) and got.dtype == np.int16
    np.testing.assert_array_equal(got[0], expected)


def test_truncated_real_file_detected_from_header(tmp_path):
    (s,) = scan_tree(copy_files([TEST_FILES / "MR_truncated.dcm"], tmp_path / "t")).series
    assert any(
        "truncated: PixelData declares 8192 bytes" in x and "62 bytes missing" in x for x in s.qc.reasons
    )
    assert [p.name for p, _ in s.dropped] == ["MR_truncated.dcm"]


@pytest.mark.parametrize(
    "source, reason",
    [
        (
            "emri_small.dcm",  # enhanced MR whose functional groups were stripped (anonymized): no geometry
            "no patient geometry: ImagePositionPatient (0020,0032), ImageOrientationPatient (0020,0037), "
            "PixelSpacing (0028,0030) absent (enhanced multi-frame object, Enhanced MR Image Storage, 10 frames",
        ),
        ("liver_1frame.dcm", "not a cross-sectional image: SOP class Segmentation Storage"),
        ("test-SR.dcm", "not a cross-sectional image: SOP class Comprehensive SR Storage"),
        ("rtdose.dcm", "not a cross-sectional image: SOP class RT Dose Storage"),
    ],
)
def test_unsupported_objects_say_why(tmp_path, source, reason):
    path = pydicom.data.get_testdata_file(source) or str(TEST_FILES / source)
    (s,) = scan_tree(copy_files([path], tmp_path / "x")).series
    assert s.qc.status == "unsupported" and s.qc.first_reason.startswith(reason), s.qc.reasons
    with pytest.raises(UnsupportedSeriesError, match="unsupported: " + reason.split(" (")[0]):
        read_series(s)


def test_siemens_mosaic_is_unsupported(tmp_path):
    import nibabel

    data = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
    folder = tmp_path / "mosaic"
    folder.mkdir()
    shutil.copy(data / "0.dcm", folder / "0.dcm")
    shutil.copy(data / "1.dcm", folder / "1.dcm")
    for gz in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"):
        (folder / gz[:-3]).write_bytes(gzip.decompress((data / gz).read_bytes()))
    r = scan_tree(folder)
    assert r.series
    mosaics = [s for s in r.series if any("Siemens mosaic" in x for x in s.qc.reasons)]
    assert len(mosaics) == len(r.series)
    for s in mosaics:
        assert s.qc.status == "unsupported" and s.qc.first_reason.startswith(
            "Siemens mosaic (ImageType MOSAIC"
        )
        with pytest.raises(UnsupportedSeriesError):
            read_series(s)
    assert os.path.exists(folder / "siemens_dwi_0.dcm")


def _rotation(ax, ay):
    cx, sx, cy, sy = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rx @ ry


PIR = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # ITK direction, columns = ITK axes
PIL = PIR @ np.diag([1.0, 1.0, -1.0])  # left-handed: slices run toward the patient's left


@pytest.mark.parametrize(
    "case, direction, side",
    [
        ("right_pir", PIR, "RIGHT"),
        ("left_pil", PIL, "LEFT"),
        ("oblique", _rotation(0.26, -0.17) @ PIR, "LEFT"),
    ],
)
def test_written_series_match_truth_and_dcm2niix_in_world_space(tmp_path, case, direction, side):
    from dicom_fixtures import OAI_SERIES

    from kneeprep.geometry import Geometry, affine_from_itk
    from kneeprep.synth import write_series

    shape, spacing = (12, 24, 20), (0.7, 0.36, 0.4)
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    arr = (50 + 97 * z + 5 * y + x).astype(np.uint16)
    truth = Geometry(shape, spacing, affine_from_itk((20.0, -35.0, 12.0), spacing[::-1], direction.ravel()))
    folder = tmp_path / "raw" / OAI_SERIES
    write_series(
        arr, truth, folder, tags={"SeriesDescription": f"SAG_3D_DESS_{side}", "PatientID": "9000296"}
    )
    (s,) = scan_tree(tmp_path / "raw").series
    assert s.qc.status == "ok" and s.knee_side == (1 if side == "RIGHT" else 2)
    vol, geo = read_series(s)
    assert_same_in_world(
        vol, geo.affine_lps, arr, truth.affine_lps
    )  # the intended voxels at the intended places
    ref, ref_aff = dcm2niix(folder, tmp_path / "nii")
    assert_same_in_world(vol, geo.affine_lps, ref, ref_aff)


@pytest.mark.parametrize("module", ["fields", "slice_header", "read", "volume_ids"])
def test_doctests(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"kneeprep.dicom.{module}"))
    assert result.attempted > 0 and result.failed == 0
