"""``kneeprep export``: shards or a volume store -> the published 3DReasonKnee layout (NIfTI + CSV + JSON).

The published baseline and fine-tuning code reads NIfTI volumes at the paths of the split CSVs and a JSON list
of training items. :func:`run_export` writes exactly that, so the code runs unchanged (``docs/FORMATS.md``,
"Export layout")::

    OUT/
      images/<patient_id>/<time>/<study_folder>_<series_folder>_<knee_side>.nii.gz   every volume
      masks/<same name>.nii.gz                       the volume's label layer, when the store has one
      split_files/{train,val,test}_split.csv         published columns; paths relative to OUT
      {train,val,test}.json                          [{image, prompt, answer}] training items per split
      questions.json                                 {"<id>": "<prompt>"}: the question bank of the shards
      export_manifest.json                           per volume: source key and output files (resuming)
      report.json                                    the last run's report (written/skipped/failed per volume)

What each input gives:

* **shards** (a directory with ``manifest.json``): volumes decoded from the shards, quintuples (splits, prompts,
  reasoning, answers) -- everything but masks and raw paths; ``store=`` adds masks (the store's label layer,
  checked to lie on the shard volume's grid) and the raw series folders (``path``, from the store's last
  convert report).
* **store** (a ``volumes.zarr``): volumes and masks only. A store holds no annotations or splits, so no split
  CSVs, training items or question bank are written; export the shards for those.

The layout's files (names, NIfTI, split CSVs, items, question bank) are :mod:`kneeprep.formats.export_layout`;
turning the input into one task per volume is :mod:`kneeprep.stages.export_plan`; this module runs them.

**Axes.** A kneeprep volume is ``(z, y, x)`` with the sagittal slices on axis 0. The NIfTI is written so that
``nibabel.load(p).get_fdata()`` is that same array -- sagittal slices on the *first* axis, which the published
baseline expects -- and its affine is ``diag(-1, -1, 1, 1) @ affine_lps`` (:func:`write_nifti`).

**Resuming.** Each volume has a *source key*: the shard's sha256 + volume id (+ the store attrs of its mask), or
the store attrs of the volume. A volume whose key and output files are as recorded in ``export_manifest.json``
is skipped; a changed one is rewritten. Writes are atomic (:mod:`kneeprep.files`: a temporary name renamed into
place; leftovers are removed by the next run); files of volumes no longer in the input are removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from kneeprep import __version__
from kneeprep.errors import GeometryError, KneeprepError, ValidationError
from kneeprep.files import write_text
from kneeprep.formats.export_layout import (
    ANSWER_MODES,
    LAYOUTS,
    QUESTIONS,
    answer_text,
    image_relpath,
    mask_relpath,
    volume_file_name,
    write_annotations,
    write_nifti,
)
from kneeprep.formats.report import ItemResult, RunReport
from kneeprep.formats.shard_reader import read_row_group
from kneeprep.formats.splits import SPLITS
from kneeprep.formats.store import read_labels, read_volume, read_volume_attrs
from kneeprep.stages.export_plan import EXPORT_VERSION, VolumeTask, detect_input, plan_shards, plan_store
from kneeprep.stages.harness import Progress, Stage

MANIFEST = "export_manifest.json"
REPORT = "report.json"
LOCK = ".kneeprep-export-lock"
#: where a killed run can leave temporary files (:func:`kneeprep.files.atomic_path`), cleaned under the lock
PARTIALS = ("*", "split_files/*", "images/**/*", "masks/**/*")
#: the export manifest is saved at most this often while volumes complete (and always at the end).
SAVE_EVERY_S = 2.0


# ----------------------------------------------------------------------------------------------------------
# one volume (runs in a worker)


def export_volume(task: VolumeTask) -> ItemResult:
    """Write one volume's image (and mask) NIfTI; never raises for a bad volume (the error is in the result)."""
    t0 = time.perf_counter()
    source = task.shard or task.store or ""
    try:
        details = _export_volume(task)
    except KneeprepError as e:
        return ItemResult(task.volume_id, "failed", e.kind, str(e), time.perf_counter() - t0, source)
    except Exception as e:  # a bug or an environment problem: recorded, never raised out of the pool
        where = traceback.extract_tb(e.__traceback__)[-1]
        msg = f"volume {task.volume_id} ({source}): {type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})"
        return ItemResult(task.volume_id, "failed", "unexpected", msg, time.perf_counter() - t0, source)
    return ItemResult(task.volume_id, "written", "", "", time.perf_counter() - t0, source, details=details)


def _export_volume(task: VolumeTask) -> dict[str, Any]:
    vid, out = task.volume_id, Path(task.out_dir)
    if task.shard is not None:
        rows, volumes = read_row_group(task.shard, task.row_group, columns=["image", "image_affine_lps"])
        if vid not in volumes:
            raise ValidationError(f"{task.shard}: row group {task.row_group} holds no image of volume {vid}")
        image = volumes[vid]
        affine = np.asarray(next(r["image_affine_lps"] for r in rows if r["volume_id"] == vid)).reshape(4, 4)
    else:
        image, geometry = read_volume(task.store, vid)
        affine = geometry.affine_lps
    mask = None
    if task.label_layer is not None:
        mask = read_labels(task.store, vid, task.label_layer)
        store_affine = read_volume_attrs(task.store, vid).geometry.affine_lps
        if task.shard is not None and (
            mask.shape != image.shape or not np.allclose(store_affine, affine, atol=1e-4)
        ):
            raise GeometryError(
                f"{Path(task.store) / vid}: the store's volume (shape {mask.shape}) does not lie on the grid of "
                f"the exported one ({task.shard}, shape {image.shape}); the store changed after the shards were "
                "written: rebuild the shards, or export without --store"
            )
    details: dict[str, Any] = {"source_key": task.source_key, "image": image_relpath(vid), "mask": None}
    details["image_bytes"] = write_nifti(out / image_relpath(vid), image, affine)
    if mask is not None:
        details["mask"] = mask_relpath(vid)
        details["mask_bytes"] = write_nifti(out / mask_relpath(vid), mask, affine)
    else:
        (out / mask_relpath(vid)).unlink(missing_ok=True)  # a mask of an earlier export would be stale
    details["shape"] = list(image.shape)
    return details


# ----------------------------------------------------------------------------------------------------------
# the run


class _Manifest:
    """``export_manifest.json``: per volume its source key and output files; saved atomically, throttled."""

    def __init__(self, out: Path, source: str, kind: str):
        self.path = out / MANIFEST
        self.volumes: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
                if old.get("format") == "kneeprep-export":
                    self.volumes = dict(old.get("volumes", {}))
            except (OSError, ValueError):
                pass  # an unreadable manifest only means nothing is skipped
        self.head = {"format": "kneeprep-export", "export_version": EXPORT_VERSION, "kneeprep_version": __version__,
                     "layout": "3dreasonknee", "input": source, "input_kind": kind}  # fmt: skip
        self.saved = time.monotonic()

    def unchanged(self, out: Path, task: VolumeTask) -> dict[str, Any] | None:
        e = self.volumes.get(task.volume_id)
        if not e or e.get("source_key") != task.source_key:
            return None
        for f, n in (("image", "image_bytes"), ("mask", "mask_bytes")):
            if e.get(f) and not ((out / e[f]).is_file() and (out / e[f]).stat().st_size == e.get(n)):
                return None
        return e

    def save(self, force: bool = True) -> None:
        if force or time.monotonic() - self.saved > SAVE_EVERY_S:
            body = self.head | {"volumes": dict(sorted(self.volumes.items()))}
            write_text(self.path, json.dumps(body, indent=1) + "\n")
            self.saved = time.monotonic()


def run_export(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str = "3dreasonknee",
    store: str | os.PathLike | None = None,
    label_layer: str | None = None,
    answer: str = "original",
    path_prefix: str = "",
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> RunReport:
    """Export ``source`` (shards directory or volume store) to ``out`` in ``layout``; returns the run report
    (also written to ``out/report.json``). ``report.context`` holds items per split and where things are.

    ``store`` (shards input only) adds masks and raw series paths; ``answer`` picks the answer JSON of the
    training items (:data:`ANSWER_MODES`); ``path_prefix`` is prepended to every path in the CSVs and items
    (e.g. ``"../data/"`` for the published scripts' working directory). ``workers=0`` runs in this process.
    """
    if layout not in LAYOUTS:
        raise ValidationError(f"layout {layout!r}: known layouts are {', '.join(LAYOUTS)}")
    if answer not in ANSWER_MODES:
        raise ValidationError(f"answer {answer!r}: expected one of {', '.join(ANSWER_MODES)}")
    src, out = Path(source).resolve(), Path(out).resolve()
    kind = detect_input(src)
    if store is not None:
        if kind != "shards":
            raise ValidationError(
                f"{store}: --store only adds masks to a shards input; {src} is itself a store"
            )
        store = Path(store).resolve()
        if detect_input(store) != "store":
            raise ValidationError(f"{store}: not a volume store (it holds shards)")
    if out == src or out == store:
        raise ValidationError(f"{out}: the export directory must not be the input")
    context = {
        "input": str(src), "input_kind": kind, "store": str(store) if store else None, "out": str(out),
        "layout": layout, "answer": answer, "path_prefix": path_prefix, "workers": workers,
        "scheduler": scheduler, "kneeprep_version": __version__,
    }  # fmt: skip
    with Stage(
        "export", out, what="export", lock_name=LOCK, partials=PARTIALS, report_name=REPORT, context=context,
        progress=progress, workers=workers, scheduler=scheduler,
    ) as st:  # fmt: skip
        report = st.report
        report.context["cleaned"] = st.cleaned
        plan = (
            plan_shards(src, out, store, label_layer)
            if kind == "shards"
            else plan_store(src, out, label_layer)
        )
        manifest = _Manifest(out, str(src), kind)
        current = {t.volume_id for t in plan.tasks}
        report.context["removed"] = _remove_stale(out, manifest, current)
        todo = []
        for t in plan.tasks:
            e = None if force else manifest.unchanged(out, t)
            if e is None:
                todo.append(t)
            else:
                report.add(ItemResult(t.volume_id, "skipped", "unchanged", "source unchanged", 0.0,
                                      t.shard or t.store or "", tuple(plan.warnings.get(t.volume_id, ())), e))  # fmt: skip
        st.on_interrupt(manifest.save)
        results = st.executor().map_unordered(export_volume, todo) if todo else iter(())
        for r in st.track(results, len(todo), "export"):
            if plan.warnings.get(r.item):
                r = dataclasses.replace(r, warnings=(*r.warnings, *plan.warnings[r.item]))
            report.add(r)
            if r.status == "written":
                manifest.volumes[r.item] = r.details
                manifest.save(force=False)
        manifest.save()
        done = {r.item: r.details for r in report.items if r.status != "failed"}
        report.context["volumes"] = {
            "images": len(done), "masks": sum(1 for d in done.values() if d.get("mask")),
            "per_split": {s: sum(plan.split_of.get(v) == s for v in done) for s in SPLITS} if kind == "shards" else None,
        }  # fmt: skip
        report.context["outputs"] = {"images": str(out / "images"), "masks": str(out / "masks"),
                                     "manifest": str(out / MANIFEST), "report": str(out / REPORT)}  # fmt: skip
        if kind == "shards":
            masks = {v: d.get("mask") for v, d in done.items()}
            report.context["annotations"] = write_annotations(
                src, out, set(done), plan.split_of, plan.raw_path, masks, answer, path_prefix
            )
            report.context["outputs"] |= {"split_files": str(out / "split_files"), "questions": str(out / QUESTIONS),
                                          "items": {s: str(out / f"{s}.json") for s in SPLITS}}  # fmt: skip
        st.finish()
    return report


def _remove_stale(out: Path, manifest: _Manifest, current: set[str]) -> list[str]:
    """Delete the files of volumes an earlier export wrote that the input no longer holds."""
    removed = []
    for vid in sorted(set(manifest.volumes) - current):
        for f in ("image", "mask"):
            rel = manifest.volumes[vid].get(f)
            if rel and (out / rel).resolve().is_relative_to(out):
                (out / rel).unlink(missing_ok=True)
        del manifest.volumes[vid]
        removed.append(vid)
    if removed:
        manifest.save()
    return removed


def summary(report: RunReport) -> str:
    """The lines the CLI prints after the run table: volumes, items per split, where things are."""
    c = report.context
    v = c.get("volumes", {})
    lines = [f"images: {v.get('images', 0)} NIfTI, masks: {v.get('masks', 0)}  in {c['out']}"]
    if c.get("removed"):
        lines.append(f"removed {len(c['removed'])} volume(s) no longer in the input")
    a = c.get("annotations")
    if a:
        lines.append("volumes: " + ", ".join(f"{s} {n}" for s, n in v["per_split"].items()))
        lines.append("items:   " + ", ".join(f"{s} {n}" for s, n in a["items"].items())
                     + f" (total {sum(a['items'].values())}); {a['questions']} questions")  # fmt: skip
        if a["answers_from_severity"]:
            lines.append(f"  {a['answers_from_severity']} answer(s) rebuilt from the canonical severity "
                         "(original answer JSON unreadable or disagreeing)")  # fmt: skip
        if a["questions_with_several_prompts"]:
            lines.append("  questions with several prompt texts (questions.json keeps the first): "
                         + ", ".join(a["questions_with_several_prompts"]))  # fmt: skip
        lines.append(f"split files: {c['out']}/split_files/{{train,val,test}}_split.csv; "
                     f"items: {c['out']}/{{train,val,test}}.json; questions: {c['out']}/{QUESTIONS}")  # fmt: skip
    else:
        lines.append(
            "input is a volume store: images and masks only (no splits or annotations; export the shards for those)"
        )
    lines.append(f"report: {c['out']}/{REPORT}; manifest: {c['out']}/{MANIFEST}")
    return "\n".join(lines)


__all__ = [
    "ANSWER_MODES", "EXPORT_VERSION", "LAYOUTS", "MANIFEST", "QUESTIONS", "REPORT", "VolumeTask", "answer_text",
    "detect_input", "export_volume", "image_relpath", "mask_relpath", "run_export", "summary", "volume_file_name",
    "write_nifti",
]  # fmt: skip
