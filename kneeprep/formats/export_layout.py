"""The published 3DReasonKnee layout that ``kneeprep export`` writes (``docs/FORMATS.md``, "Export layout"):
file names, NIfTI volumes and the annotation files (split CSVs, training items, question bank).

The driver is :mod:`kneeprep.stages.export`; this module holds what the files are, not how a run goes.

**Axes.** A kneeprep volume is ``(z, y, x)`` with the sagittal slices on axis 0. The NIfTI is written so that
``nibabel.load(p).get_fdata()`` is that same array -- sagittal slices on the *first* axis, which the published
baseline expects -- and its affine is ``diag(-1, -1, 1, 1) @ affine_lps`` (:func:`write_nifti`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from kneeprep.errors import GeometryError, KneeprepError, StoreError
from kneeprep.files import atomic_path, write_text
from kneeprep.formats.shard_reader import iter_quintuples
from kneeprep.formats.splits import SPLITS, image_set_suffix, parse_volume_id, write_split_csv
from kneeprep.moaks.severity import Grade, parse_answer, to_published

LAYOUTS = ("3dreasonknee",)
#: ``original``: the shards' ``answer_json`` verbatim; ``canonical``: ``severity.to_published(severity)``.
ANSWER_MODES = ("original", "canonical")
QUESTIONS = "questions.json"


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


def answer_object(row: dict, mode: str) -> tuple[Any, bool]:
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


def write_annotations(
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
                obj, was_rebuilt = answer_object(row, answer)
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
