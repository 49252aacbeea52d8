"""Reading one DICOM file's header into a small :class:`SliceHeader` record, without decoding pixels.

The PixelData (7FE0,0010) element is *deferred*: pydicom records where its value starts and how long it
claims to be, and seeks past it. That is enough to tell, from the header alone, whether the file is
truncated (the value runs past the end of the file) or its pixel data is shorter than Rows x Columns x
SamplesPerPixel x BitsAllocated/8 x NumberOfFrames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DicomError

PIXEL_DATA = 0x7FE00010
#: Transfer syntaxes whose PixelData is native (not encapsulated): (uid, byte order).
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "<",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": "<",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99": "<",  # Deflated Explicit VR Little Endian (pydicom inflates it)
    "1.2.840.10008.1.2.2": ">",  # Explicit VR Big Endian (retired)
}


class NotDicomError(DicomError):
    """The file is not DICOM at all (no ``DICM`` prefix, no plausible first element)."""

    kind = "not_dicom"


@dataclass(frozen=True)
class SliceHeader:
    """What scan needs from one file. Geometry values are ``None`` when the element is absent."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    frame_uid: str
    series_number: str
    instance_number: int | None
    patient_id: str
    study_date: str
    time_point: str  # ClinicalTrialTimePointID (0012,0051)
    description: str
    study_description: str
    laterality: str
    image_laterality: str
    modality: str
    transfer_syntax: str
    image_type: tuple[str, ...]
    rows: int
    cols: int
    n_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    spacing_between_slices: float | None  # SpacingBetweenSlices (0018,0088)
    mosaic_images: int  # Siemens NumberOfImagesInMosaic (0019,100A), 0 if absent
    has_pixels: bool
    pixel_problem: str  # "" or why the pixel data cannot be complete (truncated / short)


def looks_like_dicom(head: bytes) -> bool:
    """Whether the first bytes of a file are DICOM: ``DICM`` at offset 128 (Part 10), or a headerless
    dataset starting with a group 0x0002 or 0x0008 element in either byte order (what old scanners wrote).

    >>> looks_like_dicom(bytes(128) + b"DICM"), looks_like_dicom(b"\\x08\\x00\\x05\\x00CS\\x0a\\x00"), looks_like_dicom(b"# text")
    (True, True, False)
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


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


def read_header(path: str | Path) -> SliceHeader:
    """Read the header of ``path`` (pixel data deferred, never decoded).

    Raises :class:`NotDicomError` for a file that is not DICOM and :class:`~kneeprep.errors.DicomError`
    naming the file and the reason for an empty, unreadable or malformed one.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise DicomError(f"{p}: cannot open: {e.strerror or e}") from None
    if size == 0:
        raise DicomError(f"{p}: empty file (0 bytes)")
    if not looks_like_dicom(head):
        raise NotDicomError(f"{p}: not DICOM (no 'DICM' prefix at byte 128, no plausible first element)")
    try:
        ds = pydicom.dcmread(p, defer_size=1024, force=head[128:132] != b"DICM")
    except InvalidDicomError as e:
        raise DicomError(f"{p}: not a readable DICOM file: {e}") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, IndexError, OverflowError) as e:
        raise DicomError(
            f"{p}: header cannot be parsed (truncated or corrupt): {type(e).__name__}: {e}"
        ) from None
    try:
        return _slice_header(p, ds, size)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DicomError(f"{p}: bad header value: {type(e).__name__}: {e}") from None


def _slice_header(p: Path, ds, size: int) -> SliceHeader:
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
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        expected = rows * cols * spp * n_frames * bits_allocated // 8
        if length is not None and length != 0xFFFFFFFF:
            if tell is not None and tell + length > size:
                problem = (
                    f"truncated: PixelData declares {length} bytes from offset {tell} but the file ends at "
                    f"{size} ({tell + length - size} bytes missing)"
                )
            elif length < expected:
                problem = (
                    f"short pixel data: {length} bytes, Rows x Columns x SamplesPerPixel x NumberOfFrames x "
                    f"BitsAllocated/8 = {rows}x{cols}x{spp}x{n_frames}x{bits_allocated}/8 = {expected}"
                )
    mosaic = _int(ds.get((0x0019, 0x100A)).value if (0x0019, 0x100A) in ds else 0)
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
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
    )
