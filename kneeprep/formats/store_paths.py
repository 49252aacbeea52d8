"""Where a volume store's parts are: the volume groups, the sibling ``<store>.kneeprep`` folder (report, boxes
table, sources, lock, work area), listing the complete volumes, the work area's clean-up, reading a
``zarr.json``.

Layout: :mod:`kneeprep.formats.store` (and ``docs/DESIGN.md``, "Volume store"). Importers use
:mod:`kneeprep.formats.store`, which re-exports everything here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kneeprep.errors import InputNotFoundError, StoreError
from kneeprep.formats import ome
from kneeprep.formats.box import BOXES_TABLE

#: suffix of the folder beside the store that holds kneeprep's own files (``volumes.zarr.kneeprep``).
KNEEPREP_DIR_SUFFIX = ".kneeprep"
#: the work area's name inside :func:`kneeprep_dir`.
WORK_DIR_NAME = "work"
#: the convert report's file name inside :func:`kneeprep_dir`.
REPORT_NAME = "report.json"
#: where stores written before the sibling folder kept kneeprep's files: inside the store.
LEGACY_FILES = (REPORT_NAME, BOXES_TABLE)
LEGACY_WORK_DIR = ".kneeprep-tmp"
#: volume id -> the absolute raw tree it was converted from, inside :func:`kneeprep_dir` (written by convert;
#: kneeprep.stages.resume)
SOURCES_FILE = "sources.json"


# ----------------------------------------------------------------------------------------------------------
# where things are


def kneeprep_dir(store: str | os.PathLike) -> Path:
    """The folder beside the store for kneeprep's own files: ``<store>.kneeprep`` (``volumes.zarr.kneeprep``)."""
    p = Path(store)
    if not p.name:  # "." or "/"-ended forms
        p = p.resolve()
    return p.with_name(p.name + KNEEPREP_DIR_SUFFIX)


def report_path(store: str | os.PathLike) -> Path:
    """Where the convert stage writes its run report."""
    return kneeprep_dir(store) / REPORT_NAME


def boxes_table_path(store: str | os.PathLike) -> Path:
    """Where the boxes table (every volume's boxes, ``kneeprep.formats.box.boxes_schema``) is written."""
    return kneeprep_dir(store) / BOXES_TABLE


def work_dir(store: str | os.PathLike) -> Path:
    """The work area: volumes being written, renamed into the store when complete (never a zarr node)."""
    return kneeprep_dir(store) / WORK_DIR_NAME


def find_report(store: str | os.PathLike) -> Path | None:
    """The store's last convert report: :func:`report_path`, else where an older kneeprep wrote it (inside
    the store), else None."""
    for p in (report_path(store), Path(store) / REPORT_NAME):
        if p.is_file():
            return p
    return None


def check_store(store: str | os.PathLike) -> Path:
    """``store`` as a Path; ``InputNotFoundError`` when it holds no root ``zarr.json``."""
    p = Path(store)
    if not (p / "zarr.json").is_file():
        raise InputNotFoundError(f"{p}: no volume store here (expected a zarr.json)")
    return p


def is_volume_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and name != ome.OME_GROUP


def list_volumes(store: str | os.PathLike) -> list[str]:
    """Ids of the complete volumes, sorted: the store's groups other than ``OME`` (work-area entries never)."""
    p = check_store(store)
    return sorted(
        e.name
        for e in os.scandir(p)
        if e.is_dir() and is_volume_name(e.name) and (Path(e.path) / "zarr.json").is_file()
    )


def volume_path(store: str | os.PathLike, volume_id: str) -> Path:
    p = Path(store) / volume_id
    if not is_volume_name(volume_id) or not (p / "zarr.json").is_file():
        raise InputNotFoundError(f"{p}: no such volume in the store")
    return p


def clean_work_area(store: str | os.PathLike) -> list[str]:
    """Remove leftovers of interrupted writes (``.partial``/``.old`` in the work area); returns their names.

    Call only while holding the store's lock (:func:`kneeprep.files.lock` on :func:`kneeprep_dir`) (no writer
    is active then)."""
    work = work_dir(store)
    if not work.is_dir():
        return []
    removed = []
    for e in os.scandir(work):
        shutil.rmtree(e.path, ignore_errors=True) if e.is_dir() else os.unlink(e.path)
        removed.append(e.name)
    return sorted(removed)


def read_metadata(path: Path) -> dict:
    """A ``zarr.json`` (or any JSON file of the store) as a dict; errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable zarr metadata: {e}") from e
