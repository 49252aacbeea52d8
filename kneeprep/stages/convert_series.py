"""One convert task: a selected DICOM series -> one normalized volume (+ mask, boxes) in the Zarr store.

:func:`convert_series` is what :func:`kneeprep.stages.convert.run_convert` maps over the selected series --
one call per series, in tasks on local worker processes or a Dask cluster. It reads its series, transforms it, places
its mask, computes boxes, builds the volume's :class:`~kneeprep.formats.volume_attrs.VolumeAttrs`, writes its
own volume atomically (:mod:`kneeprep.formats.store`) and returns a small
:class:`~kneeprep.formats.report.ItemResult`; it never raises: a :class:`~kneeprep.errors.KneeprepError` becomes
a ``failed`` record of its kind, anything else a ``failed`` record of kind ``unexpected``::

    read_series -> orient -> mirror (left knees) -> resample -> normalize -> write
                                         └─ mask (world space, nearest) onto the final grid -> boxes

Whether the volume is ``unchanged`` is decided here, in the task (:mod:`kneeprep.stages.resume`; the driver
neither stats input files nor reads volume attrs).
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from pathlib import Path

from kneeprep import FORMAT_VERSION, __version__
from kneeprep.boxes import boxes_for_volume
from kneeprep.dicom import read_series
from kneeprep.errors import KneeprepError
from kneeprep.formats import store as vstore
from kneeprep.formats.masks import file_hash, load_mask_onto
from kneeprep.formats.report import ItemResult
from kneeprep.formats.volume_attrs import LabelLayer, Provenance, Qc, Source, VolumeAttrs
from kneeprep.recipe import Recipe
from kneeprep.stages.resume import (
    content_hash,
    hash_mask,
    input_fingerprint,
    refresh_source,
    same_recipe,
    stored_attrs,
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
    stored = (previous.source if previous is not None else None) or Source()
    if unchanged and stored.fingerprint == fingerprint:
        why = "inputs and recipe unchanged"
        if verify:  # the bytes too (no pixel decode): an in-place edit with its mtime restored is caught
            if content_hash(info.files, mask_path) != stored.content_hash:
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
    if unchanged and stored.content_hash == chash:
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
        label_attrs[recipe.masks.name] = LabelLayer.new(
            label_map={str(k): v for k, v in sorted(recipe.labels.map.items())},
            source=Path(mask_path).name,
            content_hash=file_hash(mask_path),
            present=tuple(placed.present),
            unknown_labels=tuple(placed.unknown_labels),
            grid_coverage=round(placed.grid_coverage, 6),
            label_coverage=round(placed.label_coverage, 6),
            acquired_geometry=placed.source_geometry,
        )
        warnings += placed.warnings()
        timings["mask"] = time.perf_counter() - t
        t = time.perf_counter()
        boxes = [b.to_json() for b in boxes_for_volume(placed.labels, geometry, recipe)]
        timings["boxes"] = time.perf_counter() - t

    free_text = (
        recipe.privacy.keep_free_text
    )  # free text only when the recipe asks ([privacy] keep_free_text)
    attrs = VolumeAttrs.new(
        format_version=FORMAT_VERSION,
        kneeprep_version=__version__,
        volume_id=vid,
        patient_id=info.patient_id,
        time=info.time,
        study_folder=info.study_folder,
        series_folder=info.series_folder,
        knee_side=int(info.knee_side),
        acquired_geometry=acquired,
        mirrored=mirror.mirrored,
        dtype=image.dtype.name,
        transforms={"orient": orient.to_json(), "mirror": mirror.to_json(), "resample": resample.to_json()},
        normalization=normalization.to_json(),
        source=Source.new(
            series_uid=info.series_uid,
            n_files=len(info.files),
            files=tuple(Path(f).name for f in info.files),
            content_hash=chash,
            fingerprint=fingerprint,
            **(
                {"description": info.description, "study_description": info.study_description}
                if free_text
                else {}
            ),
        ),
        dicom=dict(info.technical or {}),
        image_set=getattr(info, "image_set", None),  # which echo / time point / ... (docs/DESIGN.md)
        qc=Qc.new(status=info.qc.status, reasons=tuple(info.qc.reasons)),
        labels=label_attrs,
        boxes=tuple(boxes),
        provenance=Provenance.new(
            recipe_name=recipe.name,
            recipe_hash=recipe.hash,
            convert_hash=convert_hash,
            boxes_hash=recipe.stage_hash("boxes") if layers else None,
        ),
        geometry=geometry,
    )
    t = time.perf_counter()
    path = vstore.write_volume(store, vid, image, geometry, attrs, layers)
    timings["write"] = time.perf_counter() - t
    details = {k: round(v, 4) for k, v in timings.items()}
    details["stored_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    details["replaced"] = previous is not None
    message = "replaced (inputs or recipe changed)" if previous is not None else ""
    return ItemResult(vid, "written", "", message, time.perf_counter() - t0, source, tuple(warnings), details)
