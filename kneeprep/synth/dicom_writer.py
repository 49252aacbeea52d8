"""Write a ``(z, y, x)`` integer array as a classic single-frame MR Image Storage series.

One file per index along array axis 0 (``kneeprep.geometry`` conventions), Explicit VR Little Endian, with a
proper file meta header (Part 10). The per-slice geometry is derived from ``Geometry.affine_lps``:

* ImageOrientationPatient (0020,0037) = row cosine (direction of array axis 2, the columns' index)
  followed by column cosine (direction of array axis 1, the rows' index);
* ImagePositionPatient (0020,0032) of file ``k`` = world position of voxel ``(k, 0, 0)``;
* PixelSpacing (0028,0030) = ``[spacing along axis 1 (between rows), spacing along axis 2 (between columns)]``;
* SliceThickness (0018,0050) and SpacingBetweenSlices (0018,0088) = spacing along axis 0;
* SliceLocation (0020,1041) = ImagePositionPatient projected on the slice normal (row x column cosine).

Readers that sort slices by position along the normal (GDCM/SimpleITK, dcm2niix) rebuild exactly this
geometry when array axis 0 runs along ``row x column`` (a right-handed grid such as ``"PIR"``); for a
left-handed grid they rebuild the same voxels in the reverse slice order.

``tags`` overrides or adds any element by DICOM keyword (applied to every file, after the defaults);
``slice_tags`` does the same per file, which is how defect fixtures break one slice. A value of ``None``
deletes the element. Everything is deterministic: default UIDs derive from the pixel data and geometry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from kneeprep.errors import DicomError
from kneeprep.geometry import Geometry

#: UID root for everything the sample writes (pydicom's documented example root, ``2.25``-free and stable).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def make_uid(*parts: object) -> str:
    """A deterministic UID derived from ``parts`` (same parts, same UID).

    >>> make_uid("a", 1) == make_uid("a", 1) != make_uid("a", 2)
    True
    """
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def _ds(value: float) -> str:
    """A decimal string (VR DS, at most 16 characters) for ``value``."""
    s = f"{value:.10g}"
    if len(s) > 16:
        s = f"{value:.8g}"
    return s


def slice_geometry(geometry: Geometry) -> dict:
    """The geometry elements shared by all slices plus the per-slice positions, as plain Python values.

    Returns ``{"ImageOrientationPatient": [6 floats], "PixelSpacing": [row, col], "SliceThickness": t,
    "positions": (n, 3) array, "normal": (3,) array}``.
    """
    a = geometry.affine_lps
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DicomError(f"geometry has a zero-length axis (spacing {spacing.tolist()})")
    row_cos = a[:3, 2] / spacing[2]  # along a row: the column index (array axis 2) increases
    col_cos = a[:3, 1] / spacing[1]  # down a column: the row index (array axis 1) increases
    n = geometry.shape[0]
    positions = a[:3, 3][None, :] + np.arange(n)[:, None] * a[:3, 0][None, :]
    return {
        "ImageOrientationPatient": [*row_cos.tolist(), *col_cos.tolist()],
        "PixelSpacing": [float(spacing[1]), float(spacing[2])],
        "SliceThickness": float(spacing[0]),
        "positions": positions,
        "normal": np.cross(row_cos, col_cos),
    }


def write_series(
    array: np.ndarray,
    geometry: Geometry,
    folder: str | Path,
    *,
    tags: Mapping[str, object] | None = None,
    file_names: Sequence[str] | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    rescale: tuple[float, float] | None = None,
    slice_tags: Sequence[Mapping[str, object] | None] | None = None,
) -> list[Path]:
    """Write ``array`` (``(z, y, x)``, integer) as one MR Image Storage file per slice into ``folder``.

    ``geometry.shape`` must equal ``array.shape``. Pixels are stored with BitsAllocated (0028,0100) 16,
    BitsStored (0028,0101) 12 and HighBit (0028,0102) 11 unless ``tags`` says otherwise;
    PixelRepresentation (0028,0103) is 1 (signed) when the array has negative values, else 0. Values must
    fit in BitsStored bits. ``rescale=(slope, intercept)`` adds RescaleSlope (0028,1053) and
    RescaleIntercept (0028,1052) (stored value * slope + intercept = modality value). File names default to
    ``001``, ``002``, ... (extensionless, as in OAI). InstanceNumber (0020,0013) is ``k + 1`` for array
    index ``k``. Returns the written paths in array order.

    Raises :class:`~kneeprep.errors.DicomError` naming the folder for a non-integer array, a shape that
    differs from the geometry, values that do not fit, or a wrong number of file names.
    """
    folder = Path(folder)
    arr = np.asarray(array)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.integer):
        raise DicomError(f"{folder}: expected a 3D integer array, got {arr.dtype} with shape {arr.shape}")
    if tuple(arr.shape) != tuple(geometry.shape):
        raise DicomError(f"{folder}: array shape {arr.shape} differs from geometry shape {geometry.shape}")
    n = arr.shape[0]
    if file_names is None:
        width = max(3, len(str(n)))
        file_names = [f"{k + 1:0{width}d}" for k in range(n)]
    if len(file_names) != n:
        raise DicomError(f"{folder}: {len(file_names)} file names for {n} slices")
    if slice_tags is not None and len(slice_tags) != n:
        raise DicomError(f"{folder}: {len(slice_tags)} slice_tags entries for {n} slices")
    tags = dict(tags or {})

    bits_stored = int(tags.get("BitsStored", 12))
    signed = bool(arr.min() < 0) if arr.size else False
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise DicomError(
            f"{folder}: values {int(arr.min())}..{int(arr.max())} do not fit BitsStored {bits_stored} "
            f"({'signed' if signed else 'unsigned'} range {lo}..{hi})"
        )
    pixels = arr.astype("<i2" if signed else "<u2", copy=False)

    if series_uid is None or study_uid is None or frame_uid is None:
        h = hashlib.sha256(pixels.tobytes())
        h.update(np.ascontiguousarray(geometry.affine_lps).tobytes())
        content = h.hexdigest()
        study_uid = study_uid or make_uid("study", content)
        series_uid = series_uid or make_uid("series", content)
        frame_uid = frame_uid or make_uid("frame", content)

    geo = slice_geometry(geometry)
    normal = geo["normal"]
    common = {
        "SOPClassUID": MRImageStorage,
        "Modality": "MR",
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_uid,
        "PositionReferenceIndicator": "",
        "PatientName": "",
        "PatientID": "",
        "PatientBirthDate": "",
        "PatientSex": "",
        "StudyDate": "",
        "StudyTime": "",
        "StudyID": "",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "SeriesNumber": 1,
        "Manufacturer": "",
        "ScanningSequence": "GR",
        "SequenceVariant": "SP",
        "ScanOptions": "",
        "MRAcquisitionType": "3D",
        "EchoTrainLength": 1,
        "ImageOrientationPatient": [_ds(v) for v in geo["ImageOrientationPatient"]],
        "PixelSpacing": [_ds(v) for v in geo["PixelSpacing"]],
        "SliceThickness": _ds(geo["SliceThickness"]),
        "SpacingBetweenSlices": _ds(geo["SliceThickness"]),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": int(arr.shape[1]),
        "Columns": int(arr.shape[2]),
        "BitsAllocated": 16,
        "BitsStored": bits_stored,
        "HighBit": bits_stored - 1,
        "PixelRepresentation": 1 if signed else 0,
    }
    if rescale is not None:
        common["RescaleSlope"] = _ds(float(rescale[0]))
        common["RescaleIntercept"] = _ds(float(rescale[1]))
        common["RescaleType"] = "US"

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(n):
        sop_uid = make_uid(series_uid, "instance", k)
        pos = geo["positions"][k]
        elements = dict(common)
        elements.update(
            SOPInstanceUID=sop_uid,
            InstanceNumber=k + 1,
            ImagePositionPatient=[_ds(v) for v in pos.tolist()],
            SliceLocation=_ds(float(pos @ normal)),
        )
        elements.update(tags)
        if slice_tags is not None and slice_tags[k]:
            elements.update(slice_tags[k])
        ds = Dataset()
        for keyword, value in elements.items():
            if value is not None:
                setattr(ds, keyword, value)
        ds.PixelData = pixels[k].tobytes()

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", MRImageStorage)
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "KNEEPREP_SYNTH"
        ds.file_meta = meta

        path = folder / file_names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
