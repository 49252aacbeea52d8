"""``kneeprep validate STORE``: check a volume store's derived boxes table against its volumes.

The boxes table (``<store>/boxes.parquet``) is derived from the volumes' ``boxes`` attrs; it must hold, for
every volume, exactly the rows its current attrs give (:func:`kneeprep.stages.boxes.table_rows`), and no row of
a volume that is not in the store. A ``.boxes-stale`` mark left by a run that stopped before rewriting the
table is reported too (the next ``convert`` or ``boxes`` run rewrites it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep.errors import KneeprepError
from kneeprep.formats import store
from kneeprep.formats.box import BOXES_TABLE, BOXES_TABLE_STALE, boxes_schema
from kneeprep.stages.boxes import store_boxes_table, table_rows
from kneeprep.stages.validate import Problem


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a kneeprep volume store (its root ``zarr.json`` says so)."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("attributes") or {}).get("kneeprep", {}).get("kind") == "volume_store"


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=str)


def _rows_of(attrs_of: dict, problems: list[Problem]) -> dict[str, list[dict]]:
    """Each volume's boxes table rows (:func:`table_rows`); a volume whose boxes cannot be read is a problem."""
    rows_of = {}
    for vid, attrs in attrs_of.items():
        try:
            rows_of[vid] = table_rows(attrs)
        except (KeyError, TypeError, ValueError) as e:
            problems.append(Problem(vid, "attrs", f"boxes attrs unreadable: {e}"))
    return rows_of


def validate_store(store_path: str | os.PathLike) -> list[Problem]:
    """Check the store's boxes table (``<store>.kneeprep/boxes.parquet``) against every volume's attrs; an empty list means they agree."""
    root = Path(store_path)
    vids = store.list_volumes(root)
    table = store.boxes_table_path(root)
    problems: list[Problem] = []
    if (store.kneeprep_dir(root) / BOXES_TABLE_STALE).is_file():
        problems.append(
            Problem(BOXES_TABLE_STALE, "boxes_table", "a run stopped before it rewrote the boxes table")
        )
    attrs_of = {}
    for vid in vids:
        try:
            attrs_of[vid] = store.read_volume_attrs(root, vid)
        except (KneeprepError, KeyError, TypeError, ValueError) as e:
            problems.append(Problem(vid, "attrs", f"boxes attrs unreadable: {e}"))
    if not table.is_file():
        if any(_rows_of(attrs_of, problems).values()):
            problems.append(Problem(BOXES_TABLE, "boxes_table", "missing, but volumes have boxes"))
        return problems
    try:
        stored = pq.read_table(table)
    except (OSError, pa.ArrowException) as e:
        return problems + [Problem(BOXES_TABLE, "unreadable", str(e))]
    try:  # the table write_boxes_table would write now (in a rebuild, the one it wrote): equal, nothing to say
        if not problems and stored.equals(store_boxes_table([attrs_of[v] for v in sorted(attrs_of)])):
            return problems
    except (KeyError, TypeError, ValueError, pa.ArrowException):
        pass  # a volume's rows do not fit the schema: found below
    schema = boxes_schema()
    rows_of = _rows_of(attrs_of, problems)
    expected: dict[str, list[str]] = {}
    for vid, vrows in rows_of.items():
        try:
            vrows = pa.Table.from_pylist(vrows, schema=schema).to_pylist()  # as the table stores them
            expected[vid] = sorted(_key(r) for r in vrows)
        except (TypeError, ValueError, pa.ArrowException) as e:
            problems.append(Problem(vid, "attrs", f"boxes attrs unreadable: {e}"))
    rows = stored.to_pylist()
    found: dict[str, list[str]] = {}
    for r in rows:
        found.setdefault(r["volume_id"], []).append(_key(r))
    for vid in sorted(found.keys() - expected.keys()):
        problems.append(
            Problem(BOXES_TABLE, "boxes_table", f"{len(found[vid])} rows of volume {vid}, not in the store")
        )
    for vid, want in expected.items():
        have = sorted(found.get(vid, []))
        if have != want:
            what = (
                f"{len(have)} rows, its attrs give {len(want)}"
                if len(have) != len(want)
                else "rows differ from its attrs"
            )
            problems.append(Problem(BOXES_TABLE, "boxes_table", f"volume {vid}: {what} (stale table)"))
    return problems


__all__ = ["is_store", "validate_store"]
