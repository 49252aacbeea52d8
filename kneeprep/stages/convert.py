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

Resume. A volume is skipped as ``unchanged`` when its stored ``provenance.convert_hash``
(``recipe.stage_hash("convert")``) equals the recipe's and either its ``source.fingerprint`` (file names,
sizes, mtimes, series UID and the mask file's name, size and mtime -- stat only, decided in the driver without
reading pixels) or, when the fingerprint changed, its ``source.content_hash`` (sha256 of the series' and mask's
bytes, computed in the task) is unchanged; then only the fingerprint is refreshed. Otherwise the volume is
(re)written and atomically replaces the old one. Stale work-area entries of an interrupted run are removed
first (under the store lock).

The run report goes to ``<store>/report.json`` (also written when interrupted, with ``interrupted: true``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kneeprep import FORMAT_VERSION, __version__
from kneeprep.boxes import boxes_for_volume
from kneeprep.dicom import read_series, scan_tree
from kneeprep.dicom.imagesets import image_set_selected
from kneeprep.errors import InputNotFoundError, KneeprepError, RecipeError
from kneeprep.files import sha256_file
from kneeprep.formats import store as vstore
from kneeprep.formats.masks import file_hash, load_mask_onto
from kneeprep.formats.report import ItemResult, RunReport
from kneeprep.formats.splits import read_split_csvs
from kneeprep.formats.store_upgrade import upgrade_store
from kneeprep.recipe import Recipe
from kneeprep.stages.boxes import write_boxes_table
from kneeprep.stages.harness import Progress, Stage
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


@dataclass(frozen=True)
class ConvertTask:
    """What the driver sends to a worker for one series: paths and small records only."""

    info: object  # kneeprep.dicom.SeriesInfo
    mask_path: str | None
    fingerprint: str


# ----------------------------------------------------------------------------------------------------------
# fingerprints


def _source(info) -> str:
    """The series folder as an absolute path (the report's ``source``; export's ``path`` column): a path
    relative to where convert ran would mean nothing to a later command run elsewhere."""
    return os.path.abspath(info.files[0].parent) if info.files else ""


def _stat_entry(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def input_fingerprint(info, mask_path: str | os.PathLike | None) -> str:
    """Cheap identity of a series' inputs from ``stat`` alone (no pixel reads)."""
    try:
        entries = [_stat_entry(Path(f)) for f in info.files]
        mask = _stat_entry(Path(mask_path)) if mask_path else None
    except OSError as e:
        raise InputNotFoundError(f"{e.filename}: input disappeared since the scan ({e.strerror})") from None
    blob = json.dumps({"uid": info.series_uid, "files": entries, "mask": mask}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(files, mask_path: str | os.PathLike | None = None) -> str:
    """sha256 over the series' file names and bytes (in slice order), then the mask file's. (The convert task
    computes the same while it reads the series: :func:`kneeprep.dicom.read_series` ``hasher``.)"""
    h = hashlib.sha256()
    for p in files:
        _hash_file(h, Path(p))
    return _hash_mask(h, mask_path)


def _hash_file(h, p: Path) -> None:
    h.update(p.name.encode() + b"\0")
    try:
        sha256_file(p, h)
    except OSError as e:
        raise InputNotFoundError(f"{p}: cannot read input ({e.strerror})") from None


def _hash_mask(h, mask_path) -> str:
    """Add the mask file (if any) to a content hash of the series' files; return the hash."""
    if mask_path:
        _hash_file(h, Path(mask_path))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# one series


def convert_series(
    info,
    recipe: Recipe,
    store_path: str | os.PathLike,
    mask_path: str | os.PathLike | None = None,
    *,
    fingerprint: str | None = None,
) -> ItemResult:
    """Convert one series into ``store_path`` and return its record; never raises for a bad series."""
    t0 = time.perf_counter()
    source = _source(info)
    try:
        result = _convert(info, recipe, Path(store_path), mask_path, fingerprint, t0)
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


def _convert(info, recipe: Recipe, store: Path, mask_path, fingerprint, t0: float) -> ItemResult:
    vid = info.volume_id
    source = _source(info)
    convert_hash = recipe.stage_hash("convert")
    fingerprint = fingerprint or input_fingerprint(info, mask_path)
    timings = {}
    t = time.perf_counter()
    hasher = hashlib.sha256()
    raw, acquired = read_series(info, hasher=hasher)  # one pass over the files: pixels and content hash
    chash = _hash_mask(hasher, mask_path)
    timings["read"] = time.perf_counter() - t
    previous = _stored_attrs(store, vid)
    if previous is not None and (previous.get("provenance") or {}).get("convert_hash") == convert_hash:
        if (previous.get("source") or {}).get("content_hash") == chash:
            vstore.update_attrs(store, vid, {"source": {**previous["source"], "fingerprint": fingerprint}})
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


def _stored_attrs(store: Path, volume_id: str) -> dict | None:
    try:
        return vstore.read_attrs(store, volume_id)
    except InputNotFoundError:
        return None
    except KneeprepError:
        return {}  # unreadable metadata: treat as changed, the volume is rewritten


def _run_task(task: ConvertTask, recipe: Recipe, store_path: str) -> ItemResult:
    return convert_series(task.info, recipe, store_path, task.mask_path, fingerprint=task.fingerprint)


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
    ``failed`` record (not selected, QC, mask missing, inputs gone, unchanged since the last run)."""

    def __init__(self, recipe: Recipe, store: Path, annotations, masks):
        self.recipe, self.store = recipe, store
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
        try:
            fp = input_fingerprint(info, mask)
        except KneeprepError as e:
            return ItemResult(info.volume_id, "failed", e.kind, str(e), 0.0, source)
        if not redo:
            previous = _stored_attrs(self.store, info.volume_id) or {}
            if (previous.get("provenance") or {}).get("convert_hash") == self.convert_hash and (
                previous.get("source") or {}
            ).get("fingerprint") == fp:
                return ItemResult(
                    info.volume_id, "skipped", "unchanged", "inputs and recipe unchanged", 0.0, source
                )
        return ConvertTask(info, str(mask) if mask else None, fp)


def _previously_revised(store: Path) -> dict[str, str]:
    """``context.revised`` of the store's last convert report: provisional series (volume id -> input
    fingerprint) that the finished scan contradicted."""
    try:
        revised = json.loads(vstore.report_path(store).read_text()).get("context", {}).get("revised") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in revised.items()} if isinstance(revised, dict) else {}


class EarlyStarts:
    """Series converted while the scan still runs, and what the finished scan says of them.

    The scan hands out *provisional* series (:func:`kneeprep.dicom.scan_tree`'s ``on_series``, once the folder
    holding one has been read); :meth:`start` plans each and submits its task at once. The finished scan is
    authoritative (:meth:`reconcile`): an early task stands when the final series equals the provisional one;
    otherwise its result is dropped when it returns and a redo follows -- or, when the series no longer exists
    or is no longer to be converted, what the early task wrote is deleted (:meth:`results`). ``revised`` (volume
    id -> input fingerprint) lists the contradicted early tasks; the next run does not start them early again
    (``held_back``).
    """

    def __init__(self, plan: _Planner, stream, held_back: dict[str, str]):
        self.plan, self.stream, self.held_back = plan, stream, held_back
        #: volume id -> (provisional series, the plan made for it)
        self.provisional: dict[str, tuple[object, ConvertTask | ItemResult]] = {}
        #: ids submitted before the scan finished
        self.submitted: set[str] = set()
        #: early tasks the finished scan contradicts -> their input fingerprint
        self.revised: dict[str, str] = {}
        #: volume id -> its redo once the early task has returned (None: delete what that task wrote)
        self.after: dict[str, ConvertTask | None] = {}

    def start(self, info) -> None:
        decision = self.plan(info)
        self.provisional[info.volume_id] = (info, decision)
        if isinstance(decision, ConvertTask) and self.held_back.get(info.volume_id) != decision.fingerprint:
            self.stream.submit(decision)
            self.submitted.add(info.volume_id)

    def reconcile(self, final: dict[str, object], report: RunReport) -> int:
        """Plan every series of the finished scan (``final``: volume id -> series) against what started early,
        submit what is left, add the skipped/failed records to ``report``; returns how many results to await."""
        early = self.submitted
        self.revised.update(
            (v, d.fingerprint)
            for v, (i, d) in self.provisional.items()
            if isinstance(d, ConvertTask) and final.get(v) != i
        )
        n_tasks = len(early)
        for vid, info in final.items():
            if vid in early and vid not in self.revised:
                continue  # submitted early, and right
            seen, decision = self.provisional.get(vid, (None, None))
            if seen != info or vid in early:  # not planned while scanning, or planned for another series
                decision = self.plan(info, redo=vid in early)
            if vid in early:
                self.after[vid] = decision if isinstance(decision, ConvertTask) else None
            if isinstance(decision, ConvertTask):
                if vid not in early:
                    self.stream.submit(decision)
                    n_tasks += 1
            else:
                report.add(decision)
                n_tasks -= vid in early
        for vid in early - final.keys():
            self.after[vid] = None
            n_tasks -= 1
        return n_tasks

    def results(self, results: Iterable[ItemResult], store: Path) -> Iterator[ItemResult]:
        """The results to report: an early task's result that the scan overruled is dropped, then its redo is
        submitted or its volume deleted."""
        for r in results:
            if r.item in self.after:
                redo = self.after.pop(r.item)
                if redo is not None:
                    self.stream.submit(redo)
                elif r.status == "written":
                    vstore.delete_volume(store, r.item)
                continue
            yield r

    def stands(self, r: ItemResult) -> bool:
        """Whether a result taken after an interrupt counts (not an overruled early task's)."""
        return r.item not in self.after and r.item not in self.revised


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
) -> RunReport:
    """Convert every selected series under ``raw`` into ``store``; returns the report (also written to
    ``<store>/report.json``). ``workers=0`` runs in this process without Dask; ``executor`` (a
    :mod:`kneeprep.parallel` executor the caller owns) overrides ``workers``/``scheduler``. ``progress``: see
    :class:`kneeprep.stages.harness.Progress` (tasks ``scan`` and ``convert``).

    With Dask, conversion overlaps the scan (:class:`EarlyStarts`; ``context.converted_early`` counts the
    series started early, ``context.revised`` those the finished scan overruled)."""
    raw, store = Path(raw), Path(store)
    if not raw.is_dir():
        raise InputNotFoundError(f"{raw}: raw DICOM folder not found (or not a directory)")
    for name, p in (("annotations", annotations), ("masks", masks)):
        if p is not None and not Path(p).is_dir():
            raise InputNotFoundError(f"{p}: {name} directory not found")
    plan = _Planner(recipe, store, annotations, masks)
    context = {
        "raw": str(raw), "store": str(store), "annotations": str(annotations) if annotations else None,
        "masks": str(masks) if masks else None, "recipe_name": recipe.name, "recipe_hash": recipe.hash,
        "convert_hash": plan.convert_hash, "recipe_file": recipe.source_path, "workers": workers,
        "scheduler": scheduler, "kneeprep_version": __version__,
    }  # fmt: skip
    vstore.init_store(store)
    # the stage's lock and report are beside the store (vstore.kneeprep_dir); the volumes' own temporary groups
    # live in the work area (vstore.clean_work_area): no partial globs here
    with Stage(
        "convert", vstore.kneeprep_dir(store), partials=(), report_name=vstore.REPORT_NAME, context=context,
        progress=progress, workers=workers, scheduler=scheduler, executor=executor,
    ) as st:  # fmt: skip
        report = st.report
        if upgraded := upgrade_store(store):
            report.context["upgraded_store"] = upgraded
        report.context["cleaned_work_area"] = vstore.clean_work_area(store)
        ex = st.executor()  # the scan's tasks and the conversions run on it
        stream = ex.stream(_run_task, on_error=_task_lost, recipe=recipe, store_path=str(store))
        early = EarlyStarts(plan, stream, _previously_revised(store))

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
        if any(r.status == "written" for r in report.items):
            report.context["boxes_table"] = str(write_boxes_table(store))
        st.finish()
    return report


__all__ = [
    "ConvertResult",
    "ConvertTask",
    "EarlyStarts",
    "content_hash",
    "convert_series",
    "input_fingerprint",
    "mask_finder",
    "run_convert",
    "select",
]
