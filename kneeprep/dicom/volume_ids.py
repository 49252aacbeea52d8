"""The parts of a series' volume id (``kneeprep.formats.splits.make_volume_id``), from its first file.

From the OAI layout ``<visit>/<release>/<patient>/<YYYYMMDD>/<8-digit series>/<file>`` when the file sits in
one (``id_source="path"``); otherwise from tags (``id_source="tags"``): PatientID (0010,0020), the visit from
ClinicalTrialTimePointID (0012,0051) or the StudyDescription ``OAI^MR^<visit>^...``, StudyDate (0008,0020),
SeriesNumber (0020,0011); a missing part becomes ``NA``, and ``_``, ``/`` or spaces inside a part become
``-`` so the id still splits into five parts. Making ids unique within a scan is
:func:`kneeprep.dicom.scan.unique_ids`.
"""

from __future__ import annotations

import re
from pathlib import Path

from kneeprep.dicom.fields import visit_from_text
from kneeprep.dicom.slice_header import SliceHeader
from kneeprep.formats.splits import visit_to_time

_VISIT_DIR = re.compile(r"^\d{1,3}m$", re.IGNORECASE)
_RELEASE_DIR = re.compile(r"^\d+\.[A-Z]\.\d+$", re.IGNORECASE)
_DATE_DIR = re.compile(r"^\d{8}$")
_SERIES_DIR = re.compile(r"^\d{8}$")


def parse_oai_path(path: Path) -> dict[str, str] | None:
    """The OAI parts of a file path ``…/<visit>/<release>/<patient>/<YYYYMMDD>/<series>/<file>``, or None.

    >>> parse_oai_path(Path("raw/00m/0.C.2/9000296/20040909/10693717/001"))["time"]
    '00M'
    >>> parse_oai_path(Path("elsewhere/series/001")) is None
    True
    """
    parts = path.parts
    if len(parts) < 6:
        return None
    visit, release, pid, date, series = parts[-6:-1]
    if not (
        _VISIT_DIR.match(visit)
        and _RELEASE_DIR.match(release)
        and _DATE_DIR.match(date)
        and _SERIES_DIR.match(series)
    ):
        return None
    if not pid.isalnum():
        return None
    return {"patient_id": pid, "time": visit_to_time(visit), "study_folder": date, "series_folder": series}


def _clean(part: str) -> str:
    part = re.sub(r"[_/\\\s]+", "-", part.strip())
    return part or "NA"


def volume_id_parts(h: SliceHeader) -> tuple[dict[str, str], str]:
    oai = parse_oai_path(h.path)
    if oai is not None:
        return oai, "path"
    time = visit_from_text(h.time_point) or visit_from_text(h.study_description)
    return {
        "patient_id": _clean(h.patient_id),
        "time": _clean(time),
        "study_folder": _clean(h.study_date),
        "series_folder": _clean(h.series_number),
    }, "tags"
