"""Which DICOM header fields kneeprep keeps, and the small facts it derives from a header.

:func:`technical_fields` is a **whitelist**: only acquisition and encoding parameters listed in
:data:`TECHNICAL_KEYWORDS` ever leave the DICOM files (into scan tables and volume attributes). Names, birth
dates, addresses, accession numbers, institutions, physicians, device serial numbers, dates and every UID or
other identifier are never copied, because nothing outside the whitelist is.
"""

from __future__ import annotations

import re
from typing import Any

#: Technical fields safe to store, by DICOM keyword (tag in the comment).
TECHNICAL_KEYWORDS: tuple[str, ...] = (
    "Modality",  # (0008,0060)
    "Manufacturer",  # (0008,0070)
    "ManufacturerModelName",  # (0008,1090)
    "SoftwareVersions",  # (0018,1020)
    "MagneticFieldStrength",  # (0018,0087)
    "ImagingFrequency",  # (0018,0084)
    "ScanningSequence",  # (0018,0020)
    "SequenceVariant",  # (0018,0021)
    "ScanOptions",  # (0018,0022)
    "MRAcquisitionType",  # (0018,0023)
    "SequenceName",  # (0018,0024)
    "RepetitionTime",  # (0018,0080)
    "EchoTime",  # (0018,0081)
    "InversionTime",  # (0018,0082)
    "EchoTrainLength",  # (0018,0091)
    "FlipAngle",  # (0018,1314)
    "NumberOfAverages",  # (0018,0083)
    "PixelBandwidth",  # (0018,0095)
    "ReceiveCoilName",  # (0018,1250)
    "TransmitCoilName",  # (0018,1251)
    "AcquisitionMatrix",  # (0018,1310)
    "InPlanePhaseEncodingDirection",  # (0018,1312)
    "SliceThickness",  # (0018,0050)
    "SpacingBetweenSlices",  # (0018,0088)
    "PixelSpacing",  # (0028,0030)
    "Rows",  # (0028,0010)
    "Columns",  # (0028,0011)
    "SamplesPerPixel",  # (0028,0002)
    "PhotometricInterpretation",  # (0028,0004)
    "BitsAllocated",  # (0028,0100)
    "BitsStored",  # (0028,0101)
    "HighBit",  # (0028,0102)
    "PixelRepresentation",  # (0028,0103)
    "RescaleSlope",  # (0028,1053)
    "RescaleIntercept",  # (0028,1052)
    "RescaleType",  # (0028,1054)
    "ImageType",  # (0008,0008)
    "BodyPartExamined",  # (0018,0015)
    "Laterality",  # (0020,0060)
    "PatientPosition",  # (0018,5100)
    "SOPClassUID",  # (0008,0016) -- a class, not an instance: identifies the kind of object only
)

#: Free-text fields where sites routinely type names or notes (PS3.15's basic profile removes or cleans them):
#: read to select series and find the visit, never written to an output unless a recipe sets
#: ``[privacy] keep_free_text = true`` (then SeriesDescription and StudyDescription go to ``source``).
FREE_TEXT_KEYWORDS: tuple[str, ...] = ("SeriesDescription", "StudyDescription", "ProtocolName")

#: Transfer syntax (0002,0010) is in the file meta group; stored under this key.
TRANSFER_SYNTAX_KEY = "TransferSyntaxUID"


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a pydicom element value (DS/IS to numbers, multi-values to lists)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat, PersonName

    if isinstance(value, (list, tuple, MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, PersonName):  # never whitelisted; defensive
        raise TypeError("person names are not technical fields")
    if isinstance(value, DSfloat):
        return float(value)
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, str):
        return str(value)  # a UID (a str subclass) as its plain dotted string
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value)


def technical_fields(ds) -> dict[str, Any]:
    """The whitelisted technical fields of a pydicom ``Dataset``, as JSON-serializable values.

    Only keywords in :data:`TECHNICAL_KEYWORDS` (plus the file meta TransferSyntaxUID (0002,0010)) are
    copied; absent or empty elements are left out. Multi-valued fields become lists, DS/IS numbers become
    floats/ints, UIDs their dotted string.
    """
    out: dict[str, Any] = {}
    for kw in TECHNICAL_KEYWORDS:
        elem = ds.get(kw)
        if (
            elem is None
            or elem == ""
            or (hasattr(elem, "__len__") and not isinstance(elem, str) and len(elem) == 0)
        ):
            continue
        try:
            out[kw] = _plain(elem)
        except (TypeError, ValueError):
            continue
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        out[TRANSFER_SYNTAX_KEY] = str(ts)
    return out


_SIDE_SUFFIX = re.compile(r"_(RIGHT|LEFT)\s*$", re.IGNORECASE)
_LATERALITY = {"R": 1, "L": 2}


def knee_side(series_description: str, laterality: str = "", image_laterality: str = "") -> int:
    """OAI knee side code: 1 right, 2 left, 0 unknown.

    From the SeriesDescription (0008,103E) suffix ``_RIGHT``/``_LEFT`` (OAI's convention), else Laterality
    (0020,0060), else ImageLaterality (0020,0062) (``R``/``L``; ``B``/``U`` give 0).

    >>> knee_side("SAG_3D_DESS_LEFT"), knee_side("SAG_3D_DESS", "R"), knee_side("T1", "", "B")
    (2, 1, 0)
    """
    m = _SIDE_SUFFIX.search(series_description or "")
    if m:
        return 1 if m.group(1).upper() == "RIGHT" else 2
    for value in (laterality, image_laterality):
        code = _LATERALITY.get((value or "").strip().upper())
        if code:
            return code
    return 0


_VISIT = re.compile(r"^(\d{1,3})\s*M(?:ONTHS?)?$", re.IGNORECASE)


def visit_from_text(text: str) -> str:
    """A visit code like ``"00M"`` from a free-text time point (ClinicalTrialTimePointID (0012,0051) or
    the third part of an OAI StudyDescription ``OAI^MR^<VISIT>^<SIDE>``); ``""`` if none.

    >>> visit_from_text("12m"), visit_from_text("OAI^MR^24 MONTH^LEFT"), visit_from_text("ENROLLMENT")
    ('12M', '24M', '')
    """
    for part in [text, *str(text or "").split("^")]:
        m = _VISIT.match(str(part or "").strip())
        if m:
            return f"{int(m.group(1)):02d}M"
    return ""


#: ImageType (0008,0008) values (from the third on) that name the complex component of the image
_COMPONENTS = {
    "M": "MAGNITUDE", "MAGNITUDE": "MAGNITUDE", "M_FFE": "MAGNITUDE", "M_SE": "MAGNITUDE", "M_IR": "MAGNITUDE",
    "P": "PHASE", "PHASE": "PHASE", "P_FFE": "PHASE", "P_SE": "PHASE", "P_IR": "PHASE",
    "R": "REAL", "REAL": "REAL", "R_FFE": "REAL", "R_SE": "REAL", "R_IR": "REAL",
    "I": "IMAGINARY", "IMAGINARY": "IMAGINARY", "I_FFE": "IMAGINARY", "I_SE": "IMAGINARY", "I_IR": "IMAGINARY",
}  # fmt: skip


def complex_component(declared: str, image_type: tuple[str, ...]) -> str:
    """MAGNITUDE, PHASE, REAL or IMAGINARY: ComplexImageComponent (0008,9208) when given (enhanced objects),
    else the first ImageType (0008,0008) value from the third on that names one (Siemens ``M``/``P``, Philips
    ``M_FFE``/``P_FFE``); ``""`` when neither says.

    >>> complex_component("", ("ORIGINAL", "PRIMARY", "P", "ND")), complex_component("MAGNITUDE", ())
    ('PHASE', 'MAGNITUDE')
    """
    declared = (declared or "").strip().upper()
    if declared and declared != "MIXED":
        return declared
    for v in image_type[2:]:
        if v in _COMPONENTS:
            return _COMPONENTS[v]
    return ""
