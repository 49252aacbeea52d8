"""Write ``(z, y, x)`` volumes as one Enhanced MR Image Storage file (tests, bench, defect fixtures).

Every volume (e.g. one per echo) contributes one frame per index along array axis 0. Geometry follows
:mod:`kneeprep.synth.dicom_writer` (same affine -> DICOM mapping) but lives in functional groups: the
SharedFunctionalGroupsSequence (5200,9229) holds PlaneOrientationSequence and PixelMeasuresSequence; each
frame's PerFrameFunctionalGroupsSequence (5200,9230) item holds PlanePositionSequence, FrameContentSequence
(InStackPositionNumber, TemporalPositionIndex, DimensionIndexValues), MREchoSequence (EffectiveEchoTime) and,
with ``rescale``, PixelValueTransformationSequence. ``frame_order`` permutes the frames as written (readers
must sort by position); ``frame_items`` adds or overrides per-frame macros (``{frame index: {sequence
keyword: {attribute: value}}}``), which is how defect fixtures break one frame; ``drop`` leaves frames out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RLELossless

from kneeprep.errors import DicomError
from kneeprep.geometry import Geometry
from kneeprep.synth.dicom_writer import _ds, make_uid, slice_geometry

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _item(**kw) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def write_enhanced(
    volumes: np.ndarray | Sequence[np.ndarray],
    geometry: Geometry,
    path: str | Path,
    *,
    echo_times: Sequence[float] | None = None,
    tags: Mapping[str, object] | None = None,
    rescale: Sequence[tuple[float, float]] | None = None,
    frame_order: Sequence[int] | None = None,
    frame_items: Mapping[int, Mapping[str, Mapping[str, object]]] | None = None,
    drop: Sequence[int] = (),
    rle: bool = False,
) -> Path:
    """Write ``volumes`` (one ``(z, y, x)`` unsigned integer array, or a list of them, e.g. echoes) to
    ``path``. Frame ``f`` (before ``frame_order``) is slice ``f % z`` of volume ``f // z``. ``echo_times``
    gives each volume's EffectiveEchoTime (0018,9082) (default 2, 4, 6 ... ms); ``rescale`` a (slope,
    intercept) per frame. ``rle`` writes RLE Lossless (pydicom's encoder) instead of Explicit VR Little
    Endian. Returns ``path``. Raises DicomError for arrays that do not fit the geometry or 16 bits."""
    vols = [np.asarray(v) for v in (volumes if isinstance(volumes, (list, tuple)) else [volumes])]
    path = Path(path)
    for v in vols:
        if (
            v.shape != tuple(geometry.shape)
            or not np.issubdtype(v.dtype, np.integer)
            or v.min() < 0
            or v.max() > 65535
        ):
            raise DicomError(f"{path}: expected unsigned 16-bit volumes of shape {geometry.shape}")
    z = geometry.shape[0]
    n = z * len(vols)
    echo_times = list(echo_times) if echo_times is not None else [2.0 * (i + 1) for i in range(len(vols))]
    order = [int(f) for f in (frame_order if frame_order is not None else range(n)) if f not in set(drop)]
    geo = slice_geometry(geometry)
    series_uid = make_uid("enhanced", path.name, geometry.affine_lps.tobytes().hex(), n)

    ds = Dataset()
    ds.SOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = make_uid(series_uid, "instance")
    ds.StudyInstanceUID = make_uid(series_uid, "study")
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = make_uid(series_uid, "frame")
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.PatientID, ds.PatientName, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "", "", "", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(geometry.shape[1]), int(geometry.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = len(order)
    shared = _item(
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=[_ds(v) for v in geo["ImageOrientationPatient"]])]),
        PixelMeasuresSequence=DicomSequence([_item(
            PixelSpacing=[_ds(v) for v in geo["PixelSpacing"]],
            SliceThickness=_ds(geo["SliceThickness"]),
            SpacingBetweenSlices=_ds(geo["SliceThickness"]),
        )]),
        MRImageFrameTypeSequence=DicomSequence([_item(FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"], ComplexImageComponent="MAGNITUDE")]),
    )  # fmt: skip
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    # what DimensionIndexValues (0020,9157) = [echo, in-stack position] index (PS3.3 C.7.6.17)
    dim_uid = make_uid(series_uid, "dimensions")
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00189082, FunctionalGroupPointer=0x00189114),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057, FunctionalGroupPointer=0x00209111),
    ])  # fmt: skip
    per = []
    for f in order:
        v, k = divmod(f, z)
        item = _item(
            PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[_ds(x) for x in geo["positions"][k].tolist()])]),
            FrameContentSequence=DicomSequence([_item(InStackPositionNumber=k + 1, TemporalPositionIndex=1,
                                                      StackID="1", DimensionIndexValues=[v + 1, k + 1])]),
            MREchoSequence=DicomSequence([_item(EffectiveEchoTime=float(echo_times[v]))]),
        )  # fmt: skip
        if rescale is not None:
            s, i = rescale[f]
            item.PixelValueTransformationSequence = DicomSequence(
                [_item(RescaleSlope=_ds(s), RescaleIntercept=_ds(i), RescaleType="US")]
            )
        for seq, values in (frame_items or {}).get(f, {}).items():
            setattr(item, seq, DicomSequence([_item(**dict(values))]))
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    for k, v in (tags or {}).items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    pixels = np.stack([vols[f // z][f % z] for f in order]).astype("<u2")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    if rle:
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
