"""Readers for annotations: the published formats and kneeprep's own JSONL (``docs/FORMATS.md`` has all of them).

* split CSVs -- :func:`kneeprep.formats.splits.read_split_csvs` (reused as is);
* the question bank JSON ``{"1": "<prompt>", ...}`` -- :func:`read_question_bank`;
* published training items ``[{image, prompt, answer[, final_diagnosis]}]`` -- :func:`read_training_items`;
* kneeprep JSONL, one quintuple annotation per line -- :func:`read_quintuples_jsonl`;
* a whole annotation directory -- :func:`read_annotations`.

Readers never stop at a bad record: each returns its records and a list of :class:`RecordError`
``(source "file:line", kind, message)``. Only a file that cannot be read at all (missing, not JSON at the top
level) raises.

The records are in :mod:`kneeprep.formats.annotation_records`, the published training items (and the
reasoning-step rule, :func:`split_reasoning`) in :mod:`kneeprep.formats.training_items`; every name callers
use imports from here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kneeprep.errors import AnnotationError, InputNotFoundError
from kneeprep.files import atomic_path
from kneeprep.formats.annotation_records import (
    AnnotationRecord,
    AnnotationSet,
    RecordError,
    RecordFailure,
    compact_json,
)
from kneeprep.formats.splits import parse_volume_id, read_split_csvs
from kneeprep.formats.training_items import read_training_items, split_reasoning, volume_id_from_image_path
from kneeprep.moaks.anatomy import QUESTIONS
from kneeprep.moaks.severity import find_answer_json, parse_answer

_fail = RecordFailure


def _load_json(path: Path) -> tuple[Any, str]:
    if not path.is_file():
        raise InputNotFoundError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text), text
    except ValueError as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from None


def _line_of(text: str, key: str) -> int:
    i = text.find(json.dumps(key))
    return text.count("\n", 0, i) + 1 if i >= 0 else 1


def read_question_bank(path: str | Path) -> tuple[dict[str, str], list[RecordError]]:
    """Read ``{"<id>": "<prompt text>", ...}``. Ids kneeprep does not know (not in ``anatomy.QUESTIONS``) and
    non-string prompts are reported; unknown ids keep their prompt, bad prompts are dropped."""
    p = Path(path)
    data, text = _load_json(p)
    if not isinstance(data, dict):
        raise AnnotationError(f"{p}: expected an object {{id: prompt}}, got {type(data).__name__}")
    bank: dict[str, str] = {}
    errors: list[RecordError] = []
    for qid, prompt in data.items():
        where = f"{p}:{_line_of(text, qid)}"
        if not isinstance(prompt, str) or not prompt.strip():
            errors.append(
                RecordError(where, "schema", f"question {qid!r}: prompt must be a non-empty string")
            )
            continue
        if qid not in QUESTIONS:
            errors.append(
                RecordError(where, "unknown_question", f"question id {qid!r} is not in the 69-question bank")
            )
        bank[qid] = prompt
    return bank, errors


_JSONL_FIELDS = ("sample_id", "volume_id", "question_id", "question", "reasoning", "answer")


def read_quintuples_jsonl(path: str | Path) -> tuple[list[AnnotationRecord], list[RecordError]]:
    """Read kneeprep's ``quintuples.jsonl``: one object per line with ``sample_id``, ``volume_id``,
    ``question_id``, ``question``, ``reasoning`` (list of strings) and ``answer`` (the published answer
    object, or text holding it). Blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: file not found")
    records: list[AnnotationRecord] = []
    errors: list[RecordError] = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}:{n}"
            try:
                records.append(_jsonl_record(line, where))
            except RecordFailure as e:
                errors.append(RecordError(where, e.record_kind, str(e)))
    return records, errors


def _jsonl_record(line: str, where: str) -> AnnotationRecord:
    try:
        d = json.loads(line)
    except ValueError as e:
        raise _fail("json", f"not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise _fail("schema", f"expected an object, got {type(d).__name__}")
    missing = [k for k in _JSONL_FIELDS if k not in d]
    if missing:
        raise _fail("schema", f"missing {', '.join(missing)}")
    for k in ("sample_id", "volume_id", "question_id", "question"):
        if not isinstance(d[k], str):
            raise _fail("schema", f"{k!r} must be a string, got {d[k]!r}"[:200])
    if not isinstance(d["reasoning"], list) or not all(isinstance(s, str) for s in d["reasoning"]):
        raise _fail("schema", "'reasoning' must be a list of strings")
    try:
        parse_volume_id(d["volume_id"])
    except AnnotationError as e:
        raise _fail("volume", str(e)) from None
    qid = d["question_id"]
    if qid not in QUESTIONS:
        raise _fail("question", f"question id {qid!r} is not in the 69-question bank")
    if d["sample_id"] != f"{d['volume_id']}_{qid}":
        raise _fail(
            "schema",
            f"sample_id {d['sample_id']!r} is not <volume_id>_<question_id> = {d['volume_id']}_{qid}",
        )
    answer = d["answer"]
    try:
        if isinstance(answer, str):
            answer_json, severity = _text_answer(answer, qid)
        else:
            answer_json = compact_json(answer)
            severity = _json_answer(answer_json, qid)
    except AnnotationError as e:
        raise _fail("answer", str(e)) from None
    return AnnotationRecord(
        sample_id=d["sample_id"],
        volume_id=d["volume_id"],
        question_id=qid,
        question=d["question"],
        reasoning=tuple(d["reasoning"]),
        answer_json=answer_json,
        severity=severity,
        source=where,
    )


# Answers repeat (a few grade combinations per question over ~7,000 volumes): each distinct one parsed once.
# The results are immutable (a JSON string, a tuple of frozen Grades); a failing answer raises each time.
@functools.lru_cache(maxsize=8192)
def _text_answer(answer: str, qid: str) -> tuple[str, tuple]:
    obj = find_answer_json(answer)[0]
    return compact_json(obj), parse_answer(obj, qid)


@functools.lru_cache(maxsize=8192)
def _json_answer(answer_json: str, qid: str) -> tuple:
    return parse_answer(json.loads(answer_json), qid)


def write_quintuples_jsonl(path: str | Path, records: Iterable[AnnotationRecord]) -> None:
    """Write records as kneeprep JSONL, atomically (:func:`kneeprep.files.atomic_path`)."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(compact_json(r.to_json()) + "\n")


# ----------------------------------------------------------------------------------------------------------
# The annotation directory

QUESTIONS_FILE = "questions.json"
QUINTUPLES_FILE = "quintuples.jsonl"


def read_annotations(directory: str | Path) -> AnnotationSet:
    """Read an annotation directory (``docs/DESIGN.md``, "Annotation directory"): ``split_files/`` (required),
    ``questions.json`` (optional), ``quintuples.jsonl`` and/or training-item ``*.json`` files (every other
    top-level ``.json`` file holding a list; other ``.json`` files are listed in ``ignored``). A sample id
    given twice keeps its first record and reports the others as ``duplicate``."""
    d = Path(directory)
    if not d.is_dir():
        raise InputNotFoundError(f"{d}: annotation directory not found")
    splits = read_split_csvs(d)
    errors: list[RecordError] = []
    questions: dict[str, str] = {}
    if (d / QUESTIONS_FILE).is_file():
        questions, errs = read_question_bank(d / QUESTIONS_FILE)
        errors += errs
    records: list[AnnotationRecord] = []
    ignored: list[str] = []
    if (d / QUINTUPLES_FILE).is_file():
        recs, errs = read_quintuples_jsonl(d / QUINTUPLES_FILE)
        records += recs
        errors += errs
    for f in sorted(d.glob("*.json")):
        if f.name == QUESTIONS_FILE:
            continue
        head = f.read_text(encoding="utf-8")[:4096].lstrip()
        if not head.startswith("["):
            ignored.append(str(f))
            continue
        recs, errs = read_training_items(f, questions)
        records += recs
        errors += errs
    seen: dict[str, str] = {}
    unique: list[AnnotationRecord] = []
    for r in records:
        if r.sample_id in seen:
            errors.append(
                RecordError(
                    r.source, "duplicate", f"sample {r.sample_id} already read from {seen[r.sample_id]}"
                )
            )
            continue
        seen[r.sample_id] = r.source
        unique.append(r)
    return AnnotationSet(records=unique, splits=splits, questions=questions, errors=errors, ignored=ignored)


__all__ = [  # the records and the training-item reader are re-exported: callers import them from here
    "QUESTIONS_FILE",
    "QUINTUPLES_FILE",
    "AnnotationRecord",
    "AnnotationSet",
    "RecordError",
    "compact_json",
    "read_annotations",
    "read_question_bank",
    "read_quintuples_jsonl",
    "read_training_items",
    "split_reasoning",
    "volume_id_from_image_path",
    "write_quintuples_jsonl",
]
