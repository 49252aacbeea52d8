"""Volume ids and the published split CSVs (``split_files/{train,val,test}_split.csv``).

A volume id is ``<patient_id>_<time>_<study_folder>_<series_folder>_<knee_side>``, e.g.
``9027422_00M_20041222_10312706_2`` (time as in the CSVs, knee side as the OAI code: 1 right, 2 left) --
the key the published baseline scripts use, so annotations and predictions join without a lookup table.
One image set of a series split by echo, time point, diffusion or complex component (multi-echo, DWI,
magnitude + phase; ``kneeprep.dicom.imagesets``) adds ``_<suffix>``: ``9027422_00M_20041222_10312706_2_e2``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from kneeprep.errors import AnnotationError, InputNotFoundError
from kneeprep.files import atomic_path

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = (
    "patient_id",
    "time",
    "study_folder",
    "series_folder",
    "knee_side",
    "path",
    "image_filepath",
    "label_filepath",
)
SIDE_CODES = {"RIGHT": 1, "LEFT": 2}


def make_volume_id(patient_id: str, time: str, study_folder: str, series_folder: str, knee_side: int) -> str:
    """The volume id of a series.

    >>> make_volume_id("9027422", "00M", "20041222", "10312706", 2)
    '9027422_00M_20041222_10312706_2'
    """
    return f"{patient_id}_{time}_{study_folder}_{series_folder}_{int(knee_side)}"


#: an image-set suffix (``e2``, ``t3``, ``b1000-d2``, ``phase``, ``e2-phase``): kneeprep.dicom.imagesets
IMAGE_SET_SUFFIX = re.compile(r"^[a-z]+[0-9.]*(-[a-z]+[0-9.]*)*$")


def image_set_suffix(volume_id: str) -> str:
    """The image-set suffix of a volume id (``""`` for a whole series).

    >>> image_set_suffix("9027422_00M_20041222_10312706_2_e2"), image_set_suffix("9027422_00M_20041222_10312706_2")
    ('e2', '')
    """
    parts = volume_id.split("_")
    return parts[5] if len(parts) == 6 and IMAGE_SET_SUFFIX.match(parts[5]) else ""


def parse_volume_id(volume_id: str) -> dict[str, str | int]:
    """The parts of a volume id (an image-set suffix is accepted and not returned: :func:`image_set_suffix`).

    >>> parse_volume_id("9027422_00M_20041222_10312706_2")["knee_side"]
    2
    """
    parts = volume_id.split("_")
    if image_set_suffix(volume_id):
        parts = parts[:5]
    if len(parts) != 5 or parts[4] not in ("1", "2"):
        raise AnnotationError(f"{volume_id!r}: not a volume id <patient>_<time>_<study>_<series>_<side 1|2>")
    return dict(zip(SPLIT_COLUMNS[:4], parts[:4], strict=True)) | {"knee_side": int(parts[4])}


def visit_to_time(visit_folder: str) -> str:
    """OAI visit folder to the split CSVs' time code.

    >>> visit_to_time("00m")
    '00M'
    """
    return visit_folder.upper()


@dataclass(frozen=True)
class SplitRow:
    split: str
    patient_id: str
    time: str
    study_folder: str
    series_folder: str
    knee_side: int
    path: str
    image_filepath: str
    label_filepath: str
    source: str  # "file:line" it came from

    @property
    def volume_id(self) -> str:
        return make_volume_id(
            self.patient_id, self.time, self.study_folder, self.series_folder, self.knee_side
        )


def read_split_csvs(directory: str | Path) -> list[SplitRow]:
    """Read ``{train,val,test}_split.csv`` from ``directory`` (or its ``split_files/``); missing splits are
    skipped, but at least one must exist. Raises :class:`AnnotationError` naming file and line for a bad row."""
    d = Path(directory)
    if (d / "split_files").is_dir():
        d = d / "split_files"
    files = [(s, d / f"{s}_split.csv") for s in SPLITS if (d / f"{s}_split.csv").is_file()]
    if not files:
        raise InputNotFoundError(
            f"{d}: no split CSVs (expected {', '.join(s + '_split.csv' for s in SPLITS)})"
        )
    rows: list[SplitRow] = []
    for split, f in files:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark; csv reads CRLF line ends as well
        with f.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != SPLIT_COLUMNS:
                raise AnnotationError(
                    f"{f}: columns {reader.fieldnames} differ from the published {list(SPLIT_COLUMNS)}"
                )
            for n, rec in enumerate(reader, start=2):
                where = f"{f}:{n}"
                side = (rec["knee_side"] or "").strip()
                if side not in ("1", "2"):
                    raise AnnotationError(f"{where}: knee_side must be 1 (right) or 2 (left), got {side!r}")
                missing = [c for c in SPLIT_COLUMNS[:4] if not (rec[c] or "").strip()]
                if missing:
                    raise AnnotationError(f"{where}: empty {', '.join(missing)}")
                rows.append(
                    SplitRow(
                        split=split,
                        knee_side=int(side),
                        source=where,
                        **{c: (rec[c] or "").strip() for c in SPLIT_COLUMNS if c != "knee_side"},
                    )
                )
    return rows


def write_split_csv(path: str | Path, rows: list[dict]) -> None:
    """Write rows (dicts with the published columns) as a split CSV, atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=SPLIT_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in SPLIT_COLUMNS})
