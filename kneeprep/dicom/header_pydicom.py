"""A :class:`~kneeprep.dicom.slice_header.SliceHeader` from a pydicom dataset: the path for every file the
plain Little Endian parser (:mod:`kneeprep.dicom.plain_le`) leaves alone, and the one that words errors.
"""

from __future__ import annotations

from pathlib import Path

from kneeprep.dicom.fields import complex_component
from kneeprep.dicom.slice_header import NATIVE_SYNTAXES, PIXEL_DATA, SliceHeader, pixel_problem


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _int(value, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def header_from_dataset(p: Path, ds, size: int) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not ts:
        ts = "1.2.840.10008.1.2.1" if not ds.is_implicit_VR else "1.2.840.10008.1.2"
        if ds.is_little_endian is False:
            ts = "1.2.840.10008.1.2.2"
    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
    n_frames = max(1, _int(ds.get("NumberOfFrames"), 1))
    spp = max(1, _int(ds.get("SamplesPerPixel"), 1))
    bits_allocated = _int(ds.get("BitsAllocated"), 0)
    raw = ds._dict.get(PIXEL_DATA)
    has_pixels = raw is not None
    problem = ""
    if has_pixels and ts in NATIVE_SYNTAXES and ts != "1.2.840.10008.1.2.1.99":
        problem = pixel_problem(
            getattr(raw, "value_tell", None), getattr(raw, "length", None), size, rows, cols, spp, n_frames,
            bits_allocated,
        )  # fmt: skip
    mosaic = _int(ds.get((0x0019, 0x100A)).value if (0x0019, 0x100A) in ds else 0)
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):  # one value: pydicom gives a str, not a list of one
        image_type = (image_type,)
    image_type = tuple(str(v).upper() for v in image_type)
    if "MOSAIC" in image_type and mosaic <= 1:
        mosaic = max(mosaic, 2)
    inst = ds.get("InstanceNumber")
    return SliceHeader(
        path=p,
        sop_class_uid=str(
            ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")
        ),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_uid=str(ds.get("FrameOfReferenceUID", "")),
        series_number=str(ds.get("SeriesNumber", "") or ""),
        instance_number=_int(inst, None) if inst not in (None, "") else None,
        patient_id=str(ds.get("PatientID", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        time_point=str(ds.get("ClinicalTrialTimePointID", "") or ""),
        description=str(ds.get("SeriesDescription", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        laterality=str(ds.get("Laterality", "") or ""),
        image_laterality=str(ds.get("ImageLaterality", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        transfer_syntax=ts,
        image_type=image_type,
        rows=rows,
        cols=cols,
        n_frames=n_frames,
        samples_per_pixel=spp,
        bits_allocated=bits_allocated,
        bits_stored=_int(ds.get("BitsStored"), bits_allocated),
        pixel_representation=_int(ds.get("PixelRepresentation"), 0),
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),
        spacing_between_slices=(_floats([ds.get("SpacingBetweenSlices")], 1) or (None,))[0]
        if ds.get("SpacingBetweenSlices") not in (None, "")
        else None,
        mosaic_images=mosaic,
        has_pixels=has_pixels,
        pixel_problem=problem,
        echo_number=_opt(ds, "EchoNumbers", int),
        echo_time=_opt(ds, "EchoTime", float),
        temporal_position=_opt(ds, "TemporalPositionIdentifier", int),
        trigger_time=_opt(ds, "TriggerTime", float),
        b_value=_opt(ds, "DiffusionBValue", float),
        b_direction=_floats(ds.get("DiffusionGradientOrientation"), 3),
        acquisition_number=_opt(ds, "AcquisitionNumber", int),
        complex_component=complex_component(str(ds.get("ComplexImageComponent", "") or ""), image_type),
    )


def _opt(ds, keyword: str, kind):
    """One value of ``keyword`` as ``kind`` (int or float); None when absent, empty, multi-valued or bad."""
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    if value is None or value == "" or isinstance(value, MultiValue | list | tuple):
        return None
    try:
        x = kind(value)
    except (TypeError, ValueError):
        return None
    return None if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))) else x
