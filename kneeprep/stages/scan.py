"""The scan stage's outputs: one inventory row per DICOM series (:func:`kneeprep.dicom.scan_tree` finds them)
and the table file (Parquet or CSV) ``kneeprep scan --out`` writes."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep.files import PARTIAL, atomic_path

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


def write_table(rows: list[dict], out: Path, *, fsync: bool = True) -> None:
    """Write rows as Parquet (``.parquet``) or CSV (``.csv``), atomically (:func:`kneeprep.files.atomic_path`)."""
    with atomic_path(out, fsync=fsync) as tmp:
        if out.suffix == ".parquet":
            int_columns = ("knee_side", "n_files", "n_dropped", "rows", "cols", "n_slices")
            schema = pa.schema([(c, pa.int64() if c in int_columns else pa.string()) for c in SCAN_COLUMNS])
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        else:
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=SCAN_COLUMNS, lineterminator="\n")
                w.writeheader()
                w.writerows(rows)


class InventoryParts:
    """The inventory as it grows: while the scan runs, each task's provisional rows are one file of the folder
    ``<out>.partial/`` (``part-000000.parquet`` ... or ``.csv``, each written whole: a Parquet *dataset* that
    pandas, pyarrow or DuckDB read while the scan goes on). The rows are what the scan knows at that point (a
    series spread over several parts, or an id taken twice, is settled at the end); the file ``out`` itself is
    written only once, whole, from the final records, and the folder is removed then, on an error, or at the
    next run into ``out`` after a kill."""

    def __init__(self, out: Path):
        import shutil

        self.out = Path(out)
        self.folder = self.out.with_name(self.out.name + PARTIAL)
        shutil.rmtree(self.folder, ignore_errors=True)  # left by a killed run
        self.folder.mkdir(parents=True)
        self.rows = 0

    def add(self, index: int, rows: list[dict]) -> None:
        """One task's rows (``index``: the task's number)."""
        write_table(rows, self.folder / f"part-{index:06d}{self.out.suffix}", fsync=False)
        self.rows += len(rows)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> InventoryParts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
