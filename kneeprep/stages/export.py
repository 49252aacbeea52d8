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
import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import SimpleITK as sitk

from kneeprep import __version__
from kneeprep.errors import GeometryError, InputNotFoundError, KneeprepError, StoreError, ValidationError
from kneeprep.files import atomic_path, write_text
from kneeprep.formats.report import ItemResult, RunReport
from kneeprep.formats.shard_reader import iter_quintuples, read_manifest, read_row_group
from kneeprep.formats.splits import SPLITS, image_set_suffix, parse_volume_id, write_split_csv
from kneeprep.formats.store import (
    find_report,
    label_names,
    list_volumes,
    read_attrs,
    read_labels,
    read_volume,
)
from kneeprep.moaks.severity import Grade, parse_answer, to_published
from kneeprep.stages.harness import Progress, Stage

#: Version of what export writes; part of every source key, so a change of it rewrites every volume.
EXPORT_VERSION = 1
LAYOUTS = ("3dreasonknee",)
#: ``original``: the shards' ``answer_json`` verbatim; ``canonical``: ``severity.to_published(severity)``.
ANSWER_MODES = ("original", "canonical")
MANIFEST = "export_manifest.json"
REPORT = "report.json"
QUESTIONS = "questions.json"
LOCK = ".kneeprep-export-lock"
#: where a killed run can leave temporary files (:func:`kneeprep.files.atomic_path`), cleaned under the lock
PARTIALS = ("*", "split_files/*", "images/**/*", "masks/**/*")
#: the export manifest is saved at most this often while volumes complete (and always at the end).
SAVE_EVERY_S = 2.0


# ----------------------------------------------------------------------------------------------------------
# names and NIfTI


def volume_file_name(volume_id: str) -> str:
    """The published relative file name of a volume.

    >>> volume_file_name("9027422_00M_20041222_10312706_2")
    '9027422/00M/20041222_10312706_2.nii.gz'
    """
    p = parse_volume_id(volume_id)
    suffix = image_set_suffix(volume_id)
    s = f"_{suffix}" if suffix else ""  # one echo, time point ...
    return (
        f"{p['patient_id']}/{p['time']}/{p['study_folder']}_{p['series_folder']}_{p['knee_side']}{s}.nii.gz"
    )


def image_relpath(volume_id: str) -> str:
    return f"images/{volume_file_name(volume_id)}"


def mask_relpath(volume_id: str) -> str:
    return f"masks/{volume_file_name(volume_id)}"


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine_lps) -> int:
    """Write ``array`` (kneeprep order, index ``(i, j, k)`` = array axes 0, 1, 2) as NIfTI, atomically; returns
    the file size.

    nibabel reads NIfTI voxels in the file's ``(i, j, k)`` order, the reverse of SimpleITK's numpy order, so the
    array is handed to SimpleITK transposed: ``nibabel.load(path).get_fdata()[i, j, k] == array[i, j, k]``. ITK
    axis ``n`` is then array axis ``n``, so origin, spacing and direction come straight from the columns of
    ``affine_lps`` (not :func:`kneeprep.geometry.itk_from_affine`, which is for the numpy order); SimpleITK
    turns LPS into RAS itself and nibabel's affine is ``diag(-1, -1, 1, 1) @ affine_lps`` (float32 precision).
    """
    final = Path(path)
    a = np.asarray(affine_lps, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if a.shape != (4, 4) or not np.all(spacing > 0) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError(f"{final}: affine_lps must be a non-singular 4x4 matrix, got {a.tolist()}")
    data = array.astype(np.uint8) if array.dtype == bool else array
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(a[:3, 3].tolist())
    image.SetDirection((a[:3, :3] / spacing[None, :]).ravel().tolist())
    if not final.name.endswith(".nii.gz"):
        raise StoreError(f"{final}: NIfTI outputs must end in .nii.gz")
    try:
        with atomic_path(final) as tmp:
            sitk.WriteImage(image, str(tmp), True)
    except RuntimeError as e:  # SimpleITK's; an OSError is already a StoreError naming the file
        raise StoreError(f"{final}: could not write the NIfTI: {e}") from e
    return final.stat().st_size


# ----------------------------------------------------------------------------------------------------------
# inputs


def detect_input(path: str | os.PathLike) -> str:
    """``"shards"`` for a directory with ``manifest.json``, ``"store"`` for a kneeprep volume store."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return "shards"
    meta = p / "zarr.json"
    if meta.is_file():
        try:
            kind = (
                json.loads(meta.read_text(encoding="utf-8"))
                .get("attributes", {})
                .get("kneeprep", {})
                .get("kind")
            )
        except (OSError, ValueError) as e:
            raise StoreError(f"{meta}: unreadable zarr metadata: {e}") from e
        if kind == "volume_store":
            return "store"
        raise ValidationError(
            f"{p}: a zarr group, but not a kneeprep volume store (kneeprep.kind = {kind!r})"
        )
    raise InputNotFoundError(
        f"{p}: neither a shards directory (no manifest.json) nor a volume store (no zarr.json)"
    )


@dataclass(frozen=True)
class VolumeTask:
    """One volume to export: where its voxels (and mask) come from and where they go. Small and picklable."""

    volume_id: str
    source_key: str
    out_dir: str
    #: shards input: the shard file (absolute) and the row group holding the volume's image
    shard: str | None = None
    row_group: int | None = None
    #: store input: the store the image comes from; shards input with --store: the store of the mask
    store: str | None = None
    #: the label layer to export as mask (None: no mask)
    label_layer: str | None = None


def _key(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in (EXPORT_VERSION, *parts):
        h.update(json.dumps(p, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class _Plan:
    tasks: list[VolumeTask]
    split_of: dict[str, str]  # volume id -> split (shards input only)
    raw_path: dict[str, str]  # volume id -> raw series folder, when known
    warnings: dict[str, list[str]]  # volume id -> warnings (e.g. no mask in the store)


def _store_info(store: Path) -> tuple[set[str], dict[str, str]]:
    """The complete volumes of a store and the raw series folder of each, from its last convert report."""
    vids = set(list_volumes(store))
    raw: dict[str, str] = {}
    rep = find_report(store)
    if rep is not None:
        try:
            items = json.loads(rep.read_text(encoding="utf-8")).get("items", [])
        except (OSError, ValueError):
            items = []  # the report only adds raw paths; without it `path` stays empty
        raw = {i["item"]: i["source"] for i in items if i.get("source") and i.get("status") != "failed"}
    return vids, raw


def _mask_layer(store: Path, vid: str, layer: str | None) -> tuple[str | None, str | None]:
    """(layer to export or None, warning or None)."""
    names = label_names(store, vid)
    if not names:
        return None, f"no label layer in {store / vid}: no mask"
    if layer is None:
        return names[0], None
    if layer not in names:
        return None, f"no label layer {layer!r} in {store / vid} (has {', '.join(names)}): no mask"
    return layer, None


def _plan_shards(shards: Path, out: Path, store: Path | None, layer: str | None) -> _Plan:

    m = read_manifest(shards)
    store_vids, raw = _store_info(store) if store else (set(), {})
    tasks, split_of, warnings = [], {}, {}
    for e in m["shards"]:
        path = (shards / e["path"]).resolve()
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["volume_id", "split"])
            for vid, split in dict.fromkeys(
                zip(t.column("volume_id").to_pylist(), t.column("split").to_pylist(), strict=True)
            ):
                if vid in split_of:
                    raise ValidationError(
                        f"{path}: volume {vid} also in another shard or split ({split_of[vid]})"
                    )
                split_of[vid] = split
                mask_layer, mask_attrs = None, None
                if store is not None:
                    if vid in store_vids:
                        mask_layer, warn = _mask_layer(store, vid, layer)
                        mask_attrs = read_attrs(store, vid) if mask_layer else None
                    else:
                        warn = f"volume {vid} is not in the store {store}: no mask"
                    if warn:
                        warnings[vid] = [warn]
                key = _key("shards", e["sha256"], vid, mask_layer, mask_attrs)
                tasks.append(
                    VolumeTask(
                        vid, key, str(out), str(path), g, str(store) if mask_layer else None, mask_layer
                    )
                )
    return _Plan(tasks, split_of, {v: raw[v] for v in split_of if v in raw}, warnings)


def _plan_store(store: Path, out: Path, layer: str | None) -> _Plan:
    vids, raw = _store_info(store)
    tasks, warnings = [], {}
    for vid in sorted(vids):
        mask_layer, warn = _mask_layer(store, vid, layer)
        if warn:
            warnings[vid] = [warn]
        tasks.append(
            VolumeTask(
                vid,
                _key("store", read_attrs(store, vid), mask_layer),
                str(out),
                store=str(store),
                label_layer=mask_layer,
            )
        )
    return _Plan(tasks, {}, {v: raw[v] for v in vids if v in raw}, warnings)


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
        store_affine = read_attrs(task.store, vid)["geometry"]["affine_lps"]
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
# annotations: split CSVs, training items, question bank


def answer_text(reasoning, answer: Any) -> str:
    """The published answer text: numbered reasoning steps, a blank line, ``Final diagnosis: <JSON>``.

    >>> answer_text(["Look at the femur.", "No lesion."], {"grade": 0})
    '1. Look at the femur.\\n2. No lesion.\\n\\nFinal diagnosis: {"grade": 0}'
    """
    steps = [s for s in (" ".join(str(x).split()) for x in reasoning) if s]
    final = "Final diagnosis: " + json.dumps(answer, ensure_ascii=False)
    body = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, start=1))
    return f"{body}\n\n{final}" if body else final


def _answer_object(row: dict, mode: str) -> tuple[Any, bool]:
    """The answer JSON object of a shard row and whether it had to be rebuilt from the severity."""
    severity = tuple(Grade(**g) for g in row["severity"])
    if mode == "original":
        try:
            obj = json.loads(row["answer_json"])
            if parse_answer(obj, row["question_id"]) == severity:
                return obj, False
        except (ValueError, KneeprepError):
            pass  # unreadable or disagreeing with the canonical grades: fall back to them (counted)
    return to_published(severity, row["question_id"]), mode == "original"


def _write_annotations(
    shards: Path, out: Path, exported: set[str], split_of: dict[str, str], raw: dict[str, str],
    masks: dict[str, str | None], answer: str, prefix: str,
) -> dict[str, Any]:  # fmt: skip
    """Split CSVs, per-split training items and the question bank for the exported volumes."""
    for split in SPLITS:
        rows = []
        for vid in sorted(v for v in exported if split_of.get(v) == split):
            parts = parse_volume_id(vid)
            m = masks.get(vid)
            rows.append(
                parts | {"path": raw.get(vid, ""), "image_filepath": prefix + image_relpath(vid),
                         "label_filepath": prefix + m if m else ""}
            )  # fmt: skip
        write_split_csv(out / "split_files" / f"{split}_split.csv", rows)
    bank: dict[str, str] = {}
    conflicts: set[str] = set()
    items: dict[str, int] = {}
    rebuilt = 0
    for split in SPLITS:
        n = 0
        with atomic_path(out / f"{split}.json") as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.write("[")
            for row in iter_quintuples(shards, split=split):
                if row["volume_id"] not in exported:
                    continue
                qid = row["question_id"]
                if bank.setdefault(qid, row["question"]) != row["question"]:
                    conflicts.add(qid)
                obj, was_rebuilt = _answer_object(row, answer)
                rebuilt += was_rebuilt
                item = {"image": prefix + image_relpath(row["volume_id"]), "prompt": row["question"],
                        "answer": answer_text(row["reasoning"], obj)}  # fmt: skip
                fh.write(("\n" if n == 0 else ",\n") + json.dumps(item, ensure_ascii=False))
                n += 1
            fh.write("\n]\n")
        items[split] = n
    order = sorted(bank, key=lambda q: (0, int(q), q) if q.isdigit() else (1, 0, q))
    write_text(out / QUESTIONS, json.dumps({q: bank[q] for q in order}, indent=1, ensure_ascii=False) + "\n")
    return {"items": items, "answers_from_severity": rebuilt, "questions": len(bank),
            "questions_with_several_prompts": sorted(conflicts)}  # fmt: skip


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
            _plan_shards(src, out, store, label_layer)
            if kind == "shards"
            else _plan_store(src, out, label_layer)
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
            report.context["annotations"] = _write_annotations(
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
