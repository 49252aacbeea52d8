"""The convert stage: selected DICOM series -> normalized volumes (+ masks, boxes) in the Zarr store.

``run_convert`` (the driver) scans the raw tree, selects series by the recipe, resolves each volume's mask,
decides what is already done, and maps :func:`~kneeprep.stages.convert_series.convert_series` over the rest --
one task per series (up to :data:`SERIES_PER_TASK` a task while a backlog waits), on local worker processes or
a Dask cluster (:mod:`kneeprep.parallel`). Each series' call reads it, transforms it, places its mask, computes
boxes, writes its own volume atomically and returns a small :class:`~kneeprep.formats.report.ItemResult`
(:mod:`kneeprep.stages.convert_series`); it never raises.

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

When the store is the staging copy of one on an object store (:mod:`kneeprep.remote`), each task uploads the
volume it wrote, from its worker (:mod:`kneeprep.publish`); a failed upload is a warning on that volume.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

from kneeprep import __version__
from kneeprep.dicom import scan_tree
from kneeprep.dicom.imagesets import image_set_selected
from kneeprep.errors import InputNotFoundError, KneeprepError, RecipeError
from kneeprep.formats import store as vstore
from kneeprep.formats.box import BOXES_TABLE
from kneeprep.formats.report import ItemResult, RunReport
from kneeprep.formats.splits import read_split_csvs
from kneeprep.formats.store_upgrade import upgrade_store
from kneeprep.publish import Publisher, publish_or_warn, publisher_for
from kneeprep.recipe import Recipe
from kneeprep.remote import named_by_url
from kneeprep.stages.boxes import mark_boxes_table_stale, settle_boxes_table
from kneeprep.stages.convert_series import convert_series
from kneeprep.stages.early import ConvertTask, EarlyStarts, previously_revised
from kneeprep.stages.harness import Progress, Stage
from kneeprep.stages.resume import content_hash, input_fingerprint, series_key, vanished
from kneeprep.stages.resume import source_of as _source

#: The record a convert task returns (status written/skipped/failed, kind, message, timings in ``details``).
ConvertResult = ItemResult


# ----------------------------------------------------------------------------------------------------------
# one series: the task (kneeprep.stages.convert_series) and what the driver knows of it


#: at most this many series in one convert task, when a backlog waits (:class:`kneeprep.parallel.TaskStream`):
#: fewer tasks for the client and the scheduler; a worker that dies takes the others of its batch with it,
#: and they are resubmitted on their own
SERIES_PER_TASK = 4


def _run_task(
    task: ConvertTask, recipe: Recipe, store_path: str, publish: Publisher | None = None
) -> ItemResult:
    r = convert_series(
        task.info, recipe, store_path, task.mask_path, verify=task.verify,
        force=task.force,
    )  # fmt: skip
    if publish is not None and r.status == "written":  # to the object store, from here (kneeprep.publish)
        if warned := publish_or_warn(publish.volume, store_path, r.item):
            r = dataclasses.replace(r, warnings=r.warnings + warned)
    return r


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
    raw_id: str | None = None,
) -> RunReport:
    """Convert every selected series under ``raw`` into ``store``; returns the report (also written beside the
    store, :func:`kneeprep.formats.store.report_path`). ``workers=0`` runs in this process without Dask;
    ``executor`` (a :mod:`kneeprep.parallel` executor the caller owns) overrides ``workers``/``scheduler``.
    ``progress``: see :class:`kneeprep.stages.harness.Progress` (tasks ``scan`` and ``convert``). ``verify``:
    re-hash the input bytes of volumes whose fingerprint is unchanged (``--verify``; reads every input file).
    ``raw_id``: what names the raw tree in the report and ``sources.json`` (default: ``raw``'s absolute path;
    the URL when ``raw`` is the staging copy of a tree at a URL).

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
    raw_root = raw_id or os.path.abspath(raw)
    plan = _Planner(recipe, store, annotations, masks, verify)
    context = {
        "raw": raw_id or str(raw), "store": str(store), "annotations": str(annotations) if annotations else None,
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
        publish = publisher_for(store)
        # on an object store the root goes first: a listing recognizes the volumes by it
        if publish is not None and publish_or_warn(publish.root, store):
            publish = None  # it could not be uploaded: no task uploads, the final push publishes everything
        stream = ex.stream(
            _run_task, on_error=_task_lost, max_batch=SERIES_PER_TASK, recipe=recipe, store_path=str(store),
            publish=publish,
        )  # fmt: skip
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
            # the scan's wall once its tasks could run, and before that the wait for the cluster's start
            waited = ex.start_wait(t)
            report.context["cluster_start_seconds"] = round(waited, 3)
            report.context["scan_seconds"] = round(time.perf_counter() - t - waited, 3)
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
        if raw_id is not None:  # a staging copy of a tree at a URL: the report names the URL's objects
            _rename_sources(report, os.path.abspath(raw), raw_id)
        st.finish()
    return report


def _rename_sources(report: RunReport, local: str, url: str) -> None:
    def named(text: str) -> str:
        return named_by_url(text, local, url)

    report.items[:] = [
        dataclasses.replace(r, source=named(r.source), message=named(r.message)) for r in report.items
    ]
    report.context["unreadable_files"] = [
        [named(p), r] for p, r in report.context.get("unreadable_files", [])
    ]


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
