"""The scan stage's outputs: one inventory row per DICOM series (:func:`kneeprep.dicom.scan_tree` finds them)
and the table file (Parquet or CSV) ``kneeprep scan --out`` writes."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep.files import atomic_path

#: Columns of the table file (one row per series); list values are joined with " | ".
SCAN_COLUMNS = (
    "volume_id", "patient_id", "time", "study_folder", "series_folder", "knee_side", "description",
    "study_description", "series_uid", "n_files", "n_dropped", "rows", "cols", "n_slices", "spacing_mm",
    "orientation", "orientation_code", "modality", "transfer_syntax", "qc_status", "qc_reasons", "first_file",
    "id_source",
)  # fmt: skip


def series_row(s) -> dict:
    """One table row for a :class:`~kneeprep.dicom.SeriesInfo` (strings and ints only)."""
    fmt = lambda v: " ".join(f"{x:.6g}" for x in v) if v is not None else ""  # noqa: E731
    return {
        "volume_id": s.volume_id,
        "patient_id": s.patient_id,
        "time": s.time,
        "study_folder": s.study_folder,
        "series_folder": s.series_folder,
        "knee_side": s.knee_side,
        "description": s.description,
        "study_description": s.study_description,
        "series_uid": s.series_uid,
        "n_files": len(s.files),
        "n_dropped": len(s.dropped),
        "rows": s.rows,
        "cols": s.cols,
        "n_slices": s.n_slices,
        "spacing_mm": fmt(s.spacing),
        "orientation": fmt(s.orientation),
        "orientation_code": s.orientation_code,
        "modality": s.modality,
        "transfer_syntax": s.transfer_syntax,
        "qc_status": s.qc.status,
        "qc_reasons": " | ".join(s.qc.reasons),
        "first_file": str(s.files[0]) if s.files else "",
        "id_source": s.id_source,
    }


def write_table(rows: list[dict], out: Path) -> None:
    """Write rows as Parquet (``.parquet``) or CSV (``.csv``), atomically (:func:`kneeprep.files.atomic_path`)."""
    with atomic_path(out) as tmp:
        if out.suffix == ".parquet":
            int_columns = ("knee_side", "n_files", "n_dropped", "rows", "cols", "n_slices")
            schema = pa.schema([(c, pa.int64() if c in int_columns else pa.string()) for c in SCAN_COLUMNS])
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        else:
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=SCAN_COLUMNS, lineterminator="\n")
                w.writeheader()
                w.writerows(rows)
