"""The convert stage: selected DICOM series -> normalized volumes (+ masks, boxes) in the Zarr store.

``run_convert`` (the driver) scans the raw tree, selects series by the recipe, resolves each volume's mask,
decides what is already done, and maps :func:`convert_series` over the rest -- one task per series, on local
worker processes or a Dask cluster (:mod:`kneeprep.parallel`). Each task reads its series, transforms it,
places its mask, computes boxes, writes its own volume atomically (:mod:`kneeprep.formats.store`) and returns a small
:class:`~kneeprep.formats.report.ItemResult`; a task never raises: a :class:`~kneeprep.errors.KneeprepError` becomes a
``failed`` record of its kind, anything else a ``failed`` record of kind ``unexpected``.

Per series (``convert_series``)::

    read_series -> orient -> mirror (left knees) -> resample -> normalize -> write
                                         └─ mask (world space, nearest) onto the final grid -> boxes

Resume (:mod:`kneeprep.stages.resume`). Every selected series is a task; the task itself decides whether its
volume is ``unchanged`` (stored ``provenance.convert_hash`` equal to ``recipe.stage_hash("convert")`` and either
its ``source.fingerprint`` -- file names, sizes, mtimes, series UID, the mask file's name, size and mtime: stat
only -- or, when the fingerprint changed or ``verify`` is on, its ``source.content_hash`` -- sha256 of the
series' and mask's bytes -- unchanged). The driver neither stats input files nor reads volume attrs. Otherwise
the volume is (re)written and atomically replaces the old one. After the tasks, volumes of the same raw root
whose series vanished, now fail QC or are no longer selected are removed (``removed`` records; exit code 1).
Stale work-area entries of an interrupted run are removed first (under the store lock), and the store's
boxes table is rewritten whenever a run changed a volume or an earlier run stopped before rewriting it.

The run report goes to ``<store>/report.json`` (also written when interrupted, with ``interrupted: true``).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import traceback
from pathlib import Path

from kneeprep import FORMAT_VERSION, __version__
from kneeprep.boxes import boxes_for_volume
from kneeprep.dicom import read_series, scan_tree
from kneeprep.dicom.imagesets import image_set_selected
from kneeprep.errors import InputNotFoundError, KneeprepError, RecipeError
from kneeprep.formats import store as vstore
from kneeprep.formats.box import BOXES_TABLE
from kneeprep.formats.masks import file_hash, load_mask_onto
from kneeprep.formats.report import ItemResult, RunReport
from kneeprep.formats.splits import read_split_csvs
from kneeprep.formats.store_upgrade import upgrade_store
from kneeprep.recipe import Recipe
from kneeprep.stages.boxes import mark_boxes_table_stale, settle_boxes_table
from kneeprep.stages.early import ConvertTask, EarlyStarts, previously_revised
from kneeprep.stages.harness import Progress, Stage
from kneeprep.stages.resume import (
    content_hash,
    hash_mask,
    input_fingerprint,
    refresh_source,
    same_recipe,
    series_key,
    stored_attrs,
    vanished,
)
from kneeprep.stages.resume import source_of as _source
from kneeprep.transforms import (
    apply_mirror,
    apply_normalize,
    apply_orient,
    apply_resample,
    plan_mirror,
    plan_normalize,
    plan_orient,
    plan_resample,
)

#: The record a convert task returns (status written/skipped/failed, kind, message, timings in ``details``).
ConvertResult = ItemResult


# ----------------------------------------------------------------------------------------------------------
# one series


def convert_series(
    info,
    recipe: Recipe,
    store_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    *,
    verify: bool = False,
    force: bool = False,
) -> ItemResult:
    """Convert one series into ``store_path`` and return its record; never raises for a bad series.

    Skips (``unchanged``) a volume already stored from the same inputs with the same convert settings
    (module docstring); ``verify`` also hashes the input bytes when the fingerprint matches, ``force`` never
    skips."""
    t0 = time.perf_counter()
    source = _source(info)
    try:
        result = _convert(info, recipe, Path(store_path), mask_path, (verify, force), t0)
    except KneeprepError as e:
        return ItemResult(info.volume_id, "failed", e.kind, str(e), time.perf_counter() - t0, source)
    except Exception as e:  # a bug or an environment problem: recorded, never raised out of the pool
        where = traceback.extract_tb(e.__traceback__)[-1]
        return ItemResult(
            info.volume_id,
            "failed",
            "unexpected",
            f"series {source}: {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})",
            time.perf_counter() - t0,
            source,
        )
    return result


def _convert(info, recipe: Recipe, store: Path, mask_path, how, t0: float) -> ItemResult:
    verify, force = how
    vid = info.volume_id
    source = _source(info)
    convert_hash = recipe.stage_hash("convert")
    fingerprint = input_fingerprint(info, mask_path)  # stat of every input: here, in the task
    previous = stored_attrs(store, vid)
    unchanged = same_recipe(previous, convert_hash) and not force
    stored = (previous or {}).get("source") or {}
    if unchanged and stored.get("fingerprint") == fingerprint:
        why = "inputs and recipe unchanged"
        if verify:  # the bytes too (no pixel decode): an in-place edit with its mtime restored is caught
            if content_hash(info.files, mask_path) != stored.get("content_hash"):
                unchanged = False
            why = "inputs (bytes verified) and recipe unchanged"
        if unchanged:
            refresh_source(store, vid, previous, fingerprint)
            return ItemResult(vid, "skipped", "unchanged", why, time.perf_counter() - t0, source)
    timings = {}
    t = time.perf_counter()
    hasher = hashlib.sha256()
    raw, acquired = read_series(info, hasher=hasher)  # one pass over the files: pixels and content hash
    chash = hash_mask(hasher, mask_path)
    timings["read"] = time.perf_counter() - t
    if unchanged and stored.get("content_hash") == chash:
        refresh_source(store, vid, previous, fingerprint)
        return ItemResult(
            vid, "skipped", "unchanged", "same input bytes and recipe (files touched or moved): fingerprint refreshed",
            time.perf_counter() - t0, source,
        )  # fmt: skip

    t = time.perf_counter()
    g = recipe.geometry
    orient = plan_orient(acquired, g.orientation)
    array, geometry = apply_orient(raw, acquired, orient)
    mirror = plan_mirror(geometry, info.knee_side, g.mirror_left)
    array, geometry = apply_mirror(array, geometry, mirror)
    resample = plan_resample(geometry, g.spacing, g.shape, g.interpolator)
    array, geometry = apply_resample(array, geometry, resample)
    i = recipe.intensity
    normalization = plan_normalize(array, i.method, i.lower, i.upper, i.dtype)
    if normalization.method == "none" and array.dtype == normalization.dtype:
        image = array  # exact values already in the stored dtype: no copy (one volume less in memory)
    else:
        image = apply_normalize(array, normalization)
    del raw, array
    timings["transform"] = time.perf_counter() - t

    layers, label_attrs, boxes, warnings = {}, {}, [], []
    # a series converted with QC warnings (a duplicate slice dropped, a renamed id ...) says so in the report
    warnings += [f"QC warn: {r}" for r in info.qc.reasons] if info.qc.status == "warn" else []
    if mask_path:
        t = time.perf_counter()
        placed = load_mask_onto(mask_path, geometry, recipe.labels.map)
        layers[recipe.masks.name] = (placed.labels, recipe.labels.map)
        label_attrs[recipe.masks.name] = {
            "label_map": {str(k): v for k, v in sorted(recipe.labels.map.items())},
            "source": Path(mask_path).name,
            "content_hash": file_hash(mask_path),
            "present": list(placed.present),
            "unknown_labels": list(placed.unknown_labels),
            "grid_coverage": round(placed.grid_coverage, 6),
            "label_coverage": round(placed.label_coverage, 6),
            "acquired_geometry": placed.source_geometry.to_json(),
        }
        warnings += placed.warnings()
        timings["mask"] = time.perf_counter() - t
        t = time.perf_counter()
        boxes = [b.to_json() for b in boxes_for_volume(placed.labels, geometry, recipe)]
        timings["boxes"] = time.perf_counter() - t

    attrs = {
        "format_version": FORMAT_VERSION,
        "kneeprep_version": __version__,
        "volume_id": vid,
        "patient_id": info.patient_id,
        "time": info.time,
        "study_folder": info.study_folder,
        "series_folder": info.series_folder,
        "knee_side": int(info.knee_side),
        "acquired_geometry": acquired.to_json(),
        "mirrored": mirror.mirrored,
        "dtype": image.dtype.name,
        "transforms": {
            "orient": orient.to_json(),
            "mirror": mirror.to_json(),
            "resample": resample.to_json(),
        },
        "normalization": normalization.to_json(),
        "source": {
            "series_uid": info.series_uid,
            "n_files": len(info.files),
            "files": [Path(f).name for f in info.files],
            "content_hash": chash,
            "fingerprint": fingerprint,
            # free text only when the recipe asks ([privacy] keep_free_text)
            **(
                {"description": info.description, "study_description": info.study_description}
                if recipe.privacy.keep_free_text
                else {}
            ),
        },
        "dicom": dict(info.technical or {}),
        "image_set": getattr(info, "image_set", None),  # which echo / time point / ... (docs/DESIGN.md)
        "qc": info.qc.to_json(),
        "labels": label_attrs,
        "boxes": boxes,
        "provenance": {
            "recipe_name": recipe.name,
            "recipe_hash": recipe.hash,
            "convert_hash": convert_hash,
            "boxes_hash": recipe.stage_hash("boxes") if layers else None,
        },
    }
    t = time.perf_counter()
    path = vstore.write_volume(store, vid, image, geometry, attrs, layers)
    timings["write"] = time.perf_counter() - t
    details = {k: round(v, 4) for k, v in timings.items()}
    details["stored_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    details["replaced"] = previous is not None
    message = "replaced (inputs or recipe changed)" if previous is not None else ""
    return ItemResult(vid, "written", "", message, time.perf_counter() - t0, source, tuple(warnings), details)


def _run_task(task: ConvertTask, recipe: Recipe, store_path: str) -> ItemResult:
    return convert_series(
        task.info, recipe, store_path, task.mask_path, verify=task.verify,
        force=task.force,
    )  # fmt: skip


def _task_lost(task: ConvertTask, exc: BaseException) -> ItemResult:
    """The ``failed`` record of a task that never returned: its worker died (every retry) or the cluster
    failed it. ``kind`` is ``worker_lost`` for a dead worker, else ``unexpected``."""
    info = task.info
    source = _source(info)
    lost = type(exc).__name__ == "KilledWorker"
    why = (
        "the worker process converting it died on every attempt (killed by the OS or out of memory, or a crash "
        "in native code); nothing of it was written"
        if lost
        else "the task did not return a result"
    )
    return ItemResult(
        info.volume_id, "failed", "worker_lost" if lost else "unexpected",
        f"series {source}: {why} ({type(exc).__name__}: {str(exc)[:300]})", 0.0, source,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# the driver


def select(info, recipe: Recipe) -> ItemResult | None:
    """``None`` if the series is to be converted, else its ``skipped`` record (not selected, or QC)."""
    source = _source(info)
    if not re.search(recipe.select.series_description, info.description or ""):
        return ItemResult(
            info.volume_id, "skipped", "not_selected",
            f"SeriesDescription {info.description!r} does not match select.series_description"
            if recipe.privacy.keep_free_text  # free text quoted only when the recipe asks
            else "SeriesDescription does not match select.series_description", 0.0, source,
        )  # fmt: skip

    image_set = getattr(info, "image_set", None)
    if not image_set_selected(image_set, recipe.select.image_sets):
        why = f"image set {image_set['suffix']} ({image_set['index']} of {image_set['count']}) not selected by select.image_sets"
        return ItemResult(info.volume_id, "skipped", "not_selected", why, 0.0, source)
    status = info.qc.status
    if status in ("fail", "unsupported") or (status == "warn" and recipe.select.min_qc == "ok"):
        why = f"QC {status}: {info.qc.first_reason}" if info.qc.first_reason else f"QC {status}"
        if status == "warn":
            why += " (select.min_qc = 'ok')"
        return ItemResult(info.volume_id, "skipped", "qc", why, 0.0, source)
    return None


def mask_finder(recipe: Recipe, annotations=None, masks=None):
    """A function ``info -> Path | KneeprepError | None``: a volume's mask file (or the error that makes its
    volume fail; ``None`` for no mask), from ``masks.pattern`` or the split CSVs' ``label_filepath`` (read once,
    here): tried relative to the annotations directory, then to ``masks``, then its base name in ``masks``."""
    if recipe.masks.pattern:
        base = Path(masks or annotations or ".")
        example = {"volume_id": "9000000_00M_20040101_10000000_1", "patient_id": "9000000", "time": "00M",
                   "study_folder": "20040101", "series_folder": "10000000", "knee_side": 1}  # fmt: skip
        names = tuple(example)
        try:  # a bad placeholder is a recipe error, found before any series is read
            recipe.masks.pattern.format(**example)
        except (KeyError, IndexError, ValueError) as e:
            raise RecipeError(f"masks.pattern {recipe.masks.pattern!r}: bad placeholder {e}") from None

        def by_pattern(info) -> Path | None:
            p = base / recipe.masks.pattern.format(**{name: getattr(info, name) for name in names})
            return p if p.is_file() else None

        return by_pattern
    if annotations is None:
        if masks is not None:
            raise RecipeError(
                "--masks needs --annotations (split CSVs with label_filepath) or a recipe masks.pattern"
            )
        return lambda info: None
    rows = {row.volume_id: row for row in read_split_csvs(annotations) if row.label_filepath}

    def by_split(info) -> Path | KneeprepError | None:
        row = rows.get(info.volume_id)
        if row is None:
            return None
        rel = Path(row.label_filepath)
        candidates = [Path(annotations) / rel]
        if masks is not None:
            candidates += [Path(masks) / rel, Path(masks) / rel.name]
        found = next((c for c in candidates if c.is_file()), None)
        return found or InputNotFoundError(
            f"{row.source}: mask {row.label_filepath!r} not found (tried {', '.join(str(c) for c in candidates)})"
        )

    return by_split


class _Planner:
    """Decides, in the driver, what happens to one series: a :class:`ConvertTask`, or its ``skipped`` /
    ``failed`` record (not selected, QC, mask missing). From the scan's record alone: no input file is
    stat'ed and no volume attrs read here (the task decides "unchanged?")."""

    def __init__(self, recipe: Recipe, store: Path, annotations, masks, verify: bool = False):
        self.recipe, self.store, self.verify = recipe, store, verify
        self.convert_hash = recipe.stage_hash("convert")
        self.mask_of = mask_finder(recipe, annotations, masks)

    def __call__(self, info, *, redo: bool = False) -> ConvertTask | ItemResult:
        skipped = select(info, self.recipe)
        if skipped is not None:
            return skipped
        source = _source(info)
        mask = self.mask_of(info)
        if isinstance(mask, KneeprepError):
            return ItemResult(info.volume_id, "failed", mask.kind, str(mask), 0.0, source)
        return ConvertTask(info, str(mask) if mask else None, series_key(info), self.verify, force=redo)


def run_convert(
    raw: str | os.PathLike,
    store: str | os.PathLike,
    recipe: Recipe,
    *,
    annotations: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Progress | None = None,
    executor=None,
    verify: bool = False,
) -> RunReport:
    """Convert every selected series under ``raw`` into ``store``; returns the report (also written beside the
    store, :func:`kneeprep.formats.store.report_path`). ``workers=0`` runs in this process without Dask;
    ``executor`` (a :mod:`kneeprep.parallel` executor the caller owns) overrides ``workers``/``scheduler``.
    ``progress``: see :class:`kneeprep.stages.harness.Progress` (tasks ``scan`` and ``convert``). ``verify``:
    re-hash the input bytes of volumes whose fingerprint is unchanged (``--verify``; reads every input file).

    Volumes of this raw tree that a clean run would not have (series gone, refused by QC, not selected) are
    removed and reported ``removed`` (:func:`kneeprep.stages.resume.vanished`).

    With Dask, conversion overlaps the scan (:class:`EarlyStarts`; ``context.converted_early`` counts the
    series started early, ``context.revised`` those the finished scan overruled)."""
    raw, store = Path(raw), Path(store)
    if not raw.is_dir():
        raise InputNotFoundError(f"{raw}: raw DICOM folder not found (or not a directory)")
    for name, p in (("annotations", annotations), ("masks", masks)):
        if p is not None and not Path(p).is_dir():
            raise InputNotFoundError(f"{p}: {name} directory not found")
    raw_root = os.path.abspath(raw)
    plan = _Planner(recipe, store, annotations, masks, verify)
    context = {
        "raw": str(raw), "store": str(store), "annotations": str(annotations) if annotations else None,
        "masks": str(masks) if masks else None, "recipe_name": recipe.name, "recipe_hash": recipe.hash,
        "convert_hash": plan.convert_hash, "recipe_file": recipe.source_path, "workers": workers,
        "scheduler": scheduler, "verify": verify, "kneeprep_version": __version__,
    }  # fmt: skip
    vstore.init_store(store)
    # the stage's lock, report and boxes table are beside the store (vstore.kneeprep_dir); the volumes' own
    # temporary groups live in the work area (vstore.clean_work_area)
    with Stage(
        "convert", vstore.kneeprep_dir(store), partials=(f"*{BOXES_TABLE}*",), report_name=vstore.REPORT_NAME,
        context=context, progress=progress, workers=workers, scheduler=scheduler, executor=executor,
    ) as st:  # fmt: skip
        report = st.report
        if upgraded := upgrade_store(store):
            report.context["upgraded_store"] = upgraded
        report.context["cleaned_work_area"] = vstore.clean_work_area(store)
        stale_table = mark_boxes_table_stale(store)  # before any volume can change: a kill leaves the mark
        ex = st.executor()  # the scan's tasks and the conversions run on it
        stream = ex.stream(_run_task, on_error=_task_lost, recipe=recipe, store_path=str(store))
        early = EarlyStarts(plan, stream, previously_revised(store))

        def take_finished() -> None:  # on Ctrl-C: series finished but not yet taken are in the store
            report.context["converted_early"] = len(early.submitted)
            reported = {r.item for r in report.items}
            report.add_all(r for r in stream.drain() if r.item not in reported and early.stands(r))

        st.on_interrupt(take_finished)
        try:
            t = time.perf_counter()
            scan = scan_tree(
                raw,
                recipe.qc,
                st.ticker("scan"),
                on_series=early.start if ex.runs_ahead else None,
                executor=ex,
            )
            report.context["scan_seconds"] = round(time.perf_counter() - t, 3)
            report.context["unreadable_files"] = [[str(p), r] for p, r in scan.unreadable]
            report.context["converted_early"] = len(early.submitted)
            n_tasks = early.reconcile({info.volume_id: info for info in scan.series}, report)
            if early.revised:
                report.context["revised"] = dict(sorted(early.revised.items()))
            report.add_all(st.track(early.results(stream.results(), store), n_tasks, "convert"))
        finally:
            stream.cancel()  # nothing is left running on an error (a no-op after a full run)
            vstore.sync_collection(store)  # the root's OME listing, here in the driver under the lock
        removed = vanished(store, raw_root, report.items)  # and records which tree each volume is from
        if removed:
            gone = {r.item for r in removed}
            report.items[:] = [r for r in report.items if r.item not in gone] + removed
        changed = stale_table or any(r.status in ("written", "removed") for r in report.items)
        table = settle_boxes_table(store, changed)
        if table is not None:
            report.context["boxes_table"] = str(table)
        vstore.sync_collection(store)  # after the removals: the listing names exactly the volumes kept
        st.finish()
    return report


__all__ = [
    "ConvertResult",
    "ConvertTask",
    "EarlyStarts",
    "content_hash",  # kneeprep.stages.resume's, re-exported
    "convert_series",
    "input_fingerprint",
    "mask_finder",
    "run_convert",
    "select",
]
