"""DICOM in: ``scan`` (headers -> :class:`SeriesInfo` records with a QC verdict) and ``read_series``
(pixels -> array + :class:`~kneeprep.geometry.Geometry`). Technical header fields leave DICOM only through
the whitelist in :func:`technical_fields`."""

from kneeprep.dicom.fields import TECHNICAL_KEYWORDS, knee_side, technical_fields
from kneeprep.dicom.qc_records import QCVerdict
from kneeprep.dicom.read import apply_rescale, read_series, read_slices, rescale_dtype, stored_values
from kneeprep.dicom.scan_tasks import scan_tree
from kneeprep.dicom.series import ScanResult, SeriesInfo
from kneeprep.dicom.volume_ids import parse_oai_path

__all__ = [
    "TECHNICAL_KEYWORDS",
    "QCVerdict",
    "ScanResult",
    "SeriesInfo",
    "apply_rescale",
    "knee_side",
    "parse_oai_path",
    "read_series",
    "read_slices",
    "rescale_dtype",
    "scan_tree",
    "stored_values",
    "technical_fields",
]
