"""The record of one DICOM file's header, :class:`SliceHeader` (what scan needs; no pixels), and the checks
both header paths share: is it DICOM at all (:func:`looks_like_dicom`), and can its native pixel data be
complete (:func:`pixel_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kneeprep.errors import DicomError

PIXEL_DATA = 0x7FE00010
#: the value length that means "undefined" (sequences, encapsulated pixel data)
UNDEFINED_LENGTH = 0xFFFFFFFF
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
    # what tells the images at one position apart (kneeprep.dicom.imagesets); enhanced frames set them from
    # their functional groups (kneeprep.dicom.enhanced)
    echo_number: int | None = None  # EchoNumbers (0018,0086)
    echo_time: float | None = None  # EchoTime (0018,0081); EffectiveEchoTime (0018,9082) of a frame
    temporal_position: int | None = (
        None  # TemporalPositionIdentifier (0020,0100); TemporalPositionIndex (0020,9128)
    )
    trigger_time: float | None = None  # TriggerTime (0018,1060)
    b_value: float | None = None  # DiffusionBValue (0018,9087)
    b_direction: tuple[float, ...] | None = None  # DiffusionGradientOrientation (0018,9089)
    acquisition_number: int | None = None  # AcquisitionNumber (0020,0012): a repeated acquisition
    complex_component: str = ""  # ComplexImageComponent (0008,9208), else from ImageType: MAGNITUDE/PHASE/...
    frame: int | None = None  # 1-based frame number in a multi-frame file; None for a single-frame file

    @property
    def label(self) -> str:
        """The file name, with the frame number for a frame of a multi-frame file (for messages)."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"


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


def pixel_problem(tell, length, size, rows, cols, spp, n_frames, bits_allocated) -> str:
    """Why native PixelData whose value starts at ``tell`` and claims ``length`` bytes cannot be complete, or
    ``""``: it runs past the end of the file, or it is shorter than the image it must hold."""
    if length is None or length == UNDEFINED_LENGTH:
        return ""
    if tell is not None and tell + length > size:
        return (
            f"truncated: PixelData declares {length} bytes from offset {tell} but the file ends at "
            f"{size} ({tell + length - size} bytes missing)"
        )
    expected = rows * cols * spp * n_frames * bits_allocated // 8
    if length < expected:
        return (
            f"short pixel data: {length} bytes, Rows x Columns x SamplesPerPixel x NumberOfFrames x "
            f"BitsAllocated/8 = {rows}x{cols}x{spp}x{n_frames}x{bits_allocated}/8 = {expected}"
        )
    return ""
