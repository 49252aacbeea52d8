"""The OAI-like sample generator: DICOM writer, phantom, masks, annotations, CLI."""

from __future__ import annotations

import doctest

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from kneeprep.errors import DicomError
from kneeprep.geometry import Geometry
from kneeprep.synth import dicom_writer


def _read_sitk(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_dicom_writer_doctests():
    result = doctest.testmod(dicom_writer)
    assert result.attempted > 0 and result.failed == 0


def test_write_series_round_trips_through_pydicom_and_simpleitk(synth_series):
    s = synth_series(tags={"PatientID": "9000001", "SeriesDescription": "SAG_3D_DESS_RIGHT"}, rescale=(2.0, -5.0))
    assert [p.name for p in s.files] == [f"{k:03d}" for k in range(1, 9)]
    uids = set()
    for k, path in enumerate(s.files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (32, 32, 16, 12, 11)
        assert ds.InstanceNumber == k + 1 and ds.PatientID == "9000001"
        assert np.array_equal(ds.pixel_array, s.array[k])
        expected = s.geometry.index_to_world([k, 0, 0])
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-4)
        assert float(ds.RescaleSlope) == 2.0 and float(ds.RescaleIntercept) == -5.0
        uids.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID))
    assert len(uids) == 1
    image = _read_sitk(s.folder)
    assert np.allclose(Geometry.from_sitk(image).affine_lps, s.geometry.affine_lps, atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(image), s.array * 2 - 5)


def test_write_series_tags_override_and_delete_per_slice(synth_series):
    s = synth_series(tags={"Manufacturer": "SIEMENS"}, slice_tags=[None] * 7 + [{"ImagePositionPatient": None}])
    assert pydicom.dcmread(s.files[0]).Manufacturer == "SIEMENS"
    assert "ImagePositionPatient" not in pydicom.dcmread(s.files[7])


def test_write_series_is_deterministic(synth_series, tmp_path):
    a = synth_series("a")
    b = synth_series("b")
    assert [p.read_bytes() for p in a.files] == [p.read_bytes() for p in b.files]


def test_write_series_rejects_values_that_do_not_fit(synth_series, tmp_path):
    from kneeprep.synth import write_series

    s = synth_series("ok")
    with pytest.raises(DicomError, match="BitsStored 12"):
        write_series(s.array + 4000, s.geometry, tmp_path / "bad")
    with pytest.raises(DicomError, match="differs from geometry"):
        write_series(s.array[:4], s.geometry, tmp_path / "bad")
