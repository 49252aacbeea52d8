"""The boxes stage: every volume's boxes recomputed from its stored labels, and ``<store>/boxes.parquet``."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kneeprep import files
from kneeprep.boxes import boxes_from_stats, boxes_hash, label_stats
from kneeprep.errors import KneeprepError
from kneeprep.formats import store
from kneeprep.formats.box import BOXES_TABLE, BOXES_TABLE_STALE, boxes_schema
from kneeprep.formats.store_upgrade import upgrade_store
from kneeprep.formats.volume_attrs import Provenance, VolumeAttrs
from kneeprep.publish import Publisher, publish_or_warn, publisher_for
from kneeprep.stages.harness import Progress, Stage


def write_boxes_table(store_path: str | os.PathLike) -> Path:
    """Write ``<store>/boxes.parquet`` from every complete volume's ``kneeprep.boxes`` attrs; return its path
    (atomically: readers never see half a table)."""
    store_path = Path(store_path)
    table = store_boxes_table(
        [store.read_volume_attrs(store_path, v) for v in store.list_volumes(store_path)]
    )
    out = store.boxes_table_path(store_path)
    with files.atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def boxes_table(rows: list[dict]) -> pa.Table:
    """The boxes table of these rows (:func:`table_rows` of every volume, in volume id order)."""
    schema = boxes_schema()
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def store_boxes_table(attrs: list[VolumeAttrs]) -> pa.Table:
    """The boxes table of these volumes (their attrs in volume id order): what :func:`write_boxes_table` writes
    and validate expects. Made once for the same records inside :func:`kneeprep.formats.store.attrs_cache`
    (``rebuild``: convert writes it, validate checks the file against it)."""
    return store.derived_once(
        "boxes_table", tuple(attrs), lambda: boxes_table([r for a in attrs for r in table_rows(a)])
    )


def table_rows(attrs: VolumeAttrs) -> list[dict]:
    """The boxes table's rows of one volume, from its attrs (what :func:`write_boxes_table` writes): each stored
    box as :meth:`Box.from_json <kneeprep.formats.box.Box.from_json>` reads it, without making the records
    (the table is written after every convert run and checked by validate: 43 boxes a volume; tested equal)."""
    return [_row(attrs.volume_id, b) for b in attrs.boxes or ()]


def _row(vid: str, d: dict) -> dict:
    def seq(key, kind):
        v = d.get(key)
        return None if v is None else list(map(kind, v))

    count = d.get("voxel_count")
    return {
        "volume_id": vid,
        "region": str(d["region"]),
        "label_ids": list(map(int, d.get("label_ids") or ())),
        "voxels": seq("voxels", int),
        "voxel_count": None if count is None else int(count),
        "centroid": seq("centroid", float),
        "size_mm": seq("size_mm", float),
        "center_lps": seq("center_lps", float),
        "normalized": seq("normalized", float),
        "list_form": seq("list_form", int),
        "empty": bool(d.get("empty", d.get("voxels") is None)),
        "margin_mm": float(d.get("margin_mm", 0.0)),
    }


def mark_boxes_table_stale(store_path: str | os.PathLike) -> bool:
    """Mark the boxes table as possibly stale before volumes may change (``<store>.kneeprep/.boxes-stale``); returns
    whether a mark was already there (an earlier run stopped before it rewrote the table)."""
    mark = store.kneeprep_dir(store_path) / BOXES_TABLE_STALE
    was = mark.is_file()
    if not was:
        files.write_text(mark, "volumes may have changed since boxes.parquet was written\n")
    return was


def settle_boxes_table(store_path: str | os.PathLike, changed: bool) -> Path | None:
    """End a run begun with :func:`mark_boxes_table_stale`: rewrite the table when ``changed`` (a volume was
    written, removed or had its boxes updated, or the mark was already there) or when the store has volumes
    and no table; then drop the mark. Returns the table's path when it was written."""
    store_path = Path(store_path)
    out = None
    if changed or (not store.boxes_table_path(store_path).is_file() and store.list_volumes(store_path)):
        out = write_boxes_table(store_path)
    (store.kneeprep_dir(store_path) / BOXES_TABLE_STALE).unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class BoxesSummary:
    """What :func:`recompute_store_boxes` did."""

    volumes: int
    boxes: int
    empty: int
    #: volume id -> {label id: voxel count} of labels in no region.
    unknown_labels: dict[str, dict[int, int]]
    #: ``(volume_id, kind, message)`` of volumes whose boxes could not be recomputed.
    failures: tuple[tuple[str, str, str], ...]
    table: str
    boxes_hash: str
    #: volumes left as they were (``stale_only``: boxes already made with this recipe, or no labels).
    unchanged: int = 0

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("volumes", "boxes", "empty", "table", "boxes_hash", "unchanged")}
        d["unknown_labels"] = {v: {str(i): c for i, c in u.items()} for v, u in self.unknown_labels.items()}
        d["failures"] = [list(f) for f in self.failures]
        return json.loads(json.dumps(d))


def recompute_store_boxes(
    store_path: str | os.PathLike,
    recipe,
    *,
    lock: bool = True,
    stale_only: bool = False,
    current: Collection[str] = (),
    progress: Progress | None = None,
    workers: int | None = 0,
    scheduler: str | None = None,
    executor=None,
) -> BoxesSummary:
    """Recompute every volume's boxes from its stored labels (layer ``recipe.masks.name``) with ``recipe``.

    With ``stale_only``, volumes whose ``provenance.boxes_hash`` already equals this recipe's boxes-stage hash,
    and volumes without that label layer, are left alone (counted in ``unchanged``); ``boxes.parquet`` is
    rewritten only if some volume changed or it is missing. ``current`` (with ``stale_only``): volume ids known
    to hold this recipe's boxes already (``rebuild``: those its convert stage has just written), counted in
    ``unchanged`` without a task.

    One task per :data:`VOLUMES_PER_TASK` volumes (:func:`recompute_volume`: the "stale?" check, the labels read and the attrs update
    happen in the task) on ``executor``, or on one made from ``workers``/``scheduler`` (default ``workers=0``:
    this process). Updates the volume attrs ``boxes`` and ``provenance.boxes_hash``, rewrites
    ``boxes.parquet`` and returns a summary. A volume that fails (no labels, bad geometry) is recorded in
    ``failures``, never raised. Holds the store's writer lock (:func:`kneeprep.files.lock`) unless
    ``lock=False`` (a caller already holding it). ``progress("boxes", done, total, volume_id)`` is called after
    each volume.
    """
    store_path = Path(store_path)
    store.list_volumes(store_path)  # a missing store is an error before anything is locked or written
    with Stage(
        "boxes",
        store.kneeprep_dir(store_path),
        partials=(f"*{BOXES_TABLE}*",),
        report_name=None,
        progress=progress,
        lock=lock,
        workers=workers,
        scheduler=scheduler,
        executor=executor,
    ) as st:
        upgrade_store(store_path)  # an older store's boxes.parquet moves beside it before it is rewritten
        return _recompute(
            store_path, recipe, stale_only, frozenset(current) if stale_only else frozenset(), st
        )


@dataclass(frozen=True)
class VolumeBoxes:
    """What one boxes task did to one volume (a few hundred bytes back to the driver)."""

    item: str
    status: str  # "recomputed" | "unchanged" | "failed"
    boxes: int = 0
    empty: int = 0
    unknown: dict[int, int] | None = None
    failure: tuple[str, str, str] | None = None


def recompute_volume(vid: str, store_path: str, recipe, stale_only: bool) -> VolumeBoxes:
    """The boxes task: recompute one volume's boxes from its labels and update its attrs."""
    root = Path(store_path)
    h = boxes_hash(recipe)
    try:
        attrs = store.read_volume_attrs(root, vid)
        if stale_only and (attrs.boxes_hash == h or recipe.masks.name not in store.label_names(root, vid)):
            return VolumeBoxes(vid, "unchanged")
        regions = recipe.labels.region_labels()
        geometry = attrs.geometry
        if geometry is None:
            raise KeyError("geometry")
        labels = np.asarray(store.read_labels(root, vid, recipe.masks.name))
        stats = label_stats(labels)
        boxes = boxes_from_stats(stats, regions, geometry, recipe.boxes.margin_mm)
        provenance = dataclasses.replace(attrs.provenance or Provenance(), boxes_hash=h)
        store.update_volume_attrs(
            root, vid, boxes=tuple(b.to_json() for b in boxes.values()), provenance=provenance
        )
    except KneeprepError as e:
        return VolumeBoxes(vid, "failed", failure=(vid, e.kind, str(e)))
    except KeyError as e:
        return VolumeBoxes(vid, "failed", failure=(vid, "store", f"{root / vid}: attrs lack {e}"))
    return VolumeBoxes(
        vid,
        "recomputed",
        sum(not b.empty for b in boxes.values()),
        sum(b.empty for b in boxes.values()),
        stats.unknown_labels(regions) or None,
    )


#: volumes per boxes task: a task costs the driver a few milliseconds of scheduling, a volume whose boxes are
#: current costs the task one attrs read
VOLUMES_PER_TASK = 8


def recompute_volumes(
    vids: tuple[str, ...], store_path: str, recipe, stale_only: bool, publish: Publisher | None = None
) -> list[VolumeBoxes]:
    """The boxes task: :func:`recompute_volume` for a few volumes, each recomputed one published to the object
    store the run writes to, if any (:mod:`kneeprep.publish`; a failure there is left to the final push)."""
    out = [recompute_volume(v, store_path, recipe, stale_only) for v in vids]
    for r in out:
        if publish is not None and r.status == "recomputed":
            publish_or_warn(publish.volume, store_path, r.item)
    return out


def _lost(vids: tuple[str, ...], exc: BaseException) -> list[VolumeBoxes]:
    return [
        VolumeBoxes(v, "failed", failure=(v, "worker", f"{v}: the boxes task was lost: {exc}")) for v in vids
    ]


def _recompute(
    store_path: Path, recipe, stale_only: bool, current: frozenset[str], st: Stage
) -> BoxesSummary:
    listed = store.list_volumes(store_path)
    vids = sorted(v for v in listed if v not in current)
    stale_table = mark_boxes_table_stale(store_path)  # before any attrs change: a kill leaves the mark
    chunks = [tuple(vids[i : i + VOLUMES_PER_TASK]) for i in range(0, len(vids), VOLUMES_PER_TASK)]
    results = st.executor().map_unordered(
        recompute_volumes, chunks, on_error=_lost, store_path=str(store_path), recipe=recipe,
        stale_only=stale_only, publish=publisher_for(store_path),
    ) if chunks else iter(())  # fmt: skip
    done: list[VolumeBoxes] = []
    for rs in results:
        for r in rs:
            done.append(r)
            st.tick("boxes", len(done), len(vids), r.item)
    done.sort(key=lambda r: r.item)
    got = [r for r in done if r.status == "recomputed"]
    failures = tuple(r.failure for r in done if r.failure is not None)
    table = settle_boxes_table(store_path, bool(got or failures or stale_table)) or store.boxes_table_path(
        store_path
    )
    return BoxesSummary(
        len(got),
        sum(r.boxes for r in got),
        sum(r.empty for r in got),
        {r.item: r.unknown for r in got if r.unknown},
        failures,
        str(table),
        boxes_hash(recipe),
        sum(r.status == "unchanged" for r in done) + len(listed) - len(vids),
    )
