"""Readers for annotations: the published formats and kneeprep's own JSONL (``docs/FORMATS.md`` has all of them).

* split CSVs -- :func:`kneeprep.formats.splits.read_split_csvs` (reused as is);
* the question bank JSON ``{"1": "<prompt>", ...}`` -- :func:`read_question_bank`;
* published training items ``[{image, prompt, answer[, final_diagnosis]}]`` -- :func:`read_training_items`;
* kneeprep JSONL, one quintuple annotation per line -- :func:`read_quintuples_jsonl`;
* a whole annotation directory -- :func:`read_annotations`.

Readers never stop at a bad record: each returns its records and a list of :class:`RecordError`
``(source "file:line", kind, message)``. Only a file that cannot be read at all (missing, not JSON at the top
level) raises.

Reasoning steps (:func:`split_reasoning`): if the text has numbered lines (``1.``, ``2)``, ``Step 3:`` at the
start of a line), each numbered item with its continuation lines is a step, and non-empty text before the first
number is a step of its own; otherwise the text is split into sentences at ``.``, ``!`` or ``?`` followed by
whitespace and an upper-case letter. Whitespace inside a step is collapsed to single spaces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kneeprep.errors import AnnotationError, InputNotFoundError
from kneeprep.files import atomic_path
from kneeprep.formats.splits import SplitRow, parse_volume_id, read_split_csvs
from kneeprep.moaks.anatomy import QUESTIONS
from kneeprep.moaks.severity import Severity, find_answer_json, parse_answer


class RecordError(NamedTuple):
    """One record that could not be used: where (``"file:line"``), a short kind, and the reason.

    Kinds: ``json`` (the line or item is not valid JSON), ``schema`` (a field is missing or of the wrong
    type), ``answer`` (the answer JSON does not normalize), ``question`` (unknown question id or a prompt that
    matches no question), ``volume`` (no volume id), ``duplicate`` (a sample id seen before; the first wins),
    ``unknown_question`` (a question bank id kneeprep does not know; the prompt is kept).
    """

    source: str
    kind: str
    message: str


@dataclass(frozen=True)
class AnnotationRecord:
    """One quintuple annotation (without the volume): who, which question, the reasoning and the grades."""

    sample_id: str  # <volume_id>_<question_id>
    volume_id: str
    question_id: str
    question: str
    reasoning: tuple[str, ...]
    answer_json: str  # the original answer object as compact JSON
    severity: Severity
    source: str = field(default="", compare=False)  # "file:line"

    def to_json(self) -> dict[str, Any]:
        """The kneeprep JSONL form (one line of ``quintuples.jsonl``)."""
        return {
            "sample_id": self.sample_id,
            "volume_id": self.volume_id,
            "question_id": self.question_id,
            "question": self.question,
            "reasoning": list(self.reasoning),
            "answer": json.loads(self.answer_json),
        }


@dataclass
class AnnotationSet:
    """What an annotation directory holds, plus the records that could not be used."""

    records: list[AnnotationRecord]
    splits: list[SplitRow]
    questions: dict[str, str]
    errors: list[RecordError]
    #: top-level ``.json`` files that hold no list (so no training items) and were not read, e.g. the sample's
    #: ``truth.json``: listed so nothing is passed over unseen, but not errors.
    ignored: list[str] = field(default_factory=list)


def compact_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------------------
# Reasoning steps

_NUMBERED = re.compile(r"^[ \t]*(?:step[ \t]*)?\d{1,3}[.):][ \t]+", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_reasoning(text: str) -> tuple[str, ...]:
    """Reasoning text to steps (the rule is in the module docstring).

    >>> split_reasoning("1. Look at the femur.\\n2. No lesion\\n   is seen.")
    ('Look at the femur.', 'No lesion is seen.')
    >>> split_reasoning("The cartilage is smooth. Thickness is even.")
    ('The cartilage is smooth.', 'Thickness is even.')
    """
    marks = list(_NUMBERED.finditer(text))
    if marks:
        pieces = [text[: marks[0].start()]]
        pieces += [
            text[m.end() : (marks[i + 1].start() if i + 1 < len(marks) else len(text))]
            for i, m in enumerate(marks)
        ]
    else:
        pieces = _SENTENCE_END.split(" ".join(text.split()))
    return tuple(s for s in (" ".join(p.split()) for p in pieces) if s)


# ----------------------------------------------------------------------------------------------------------
# Volume ids from published image paths

_IMAGE_PATH = re.compile(
    r"(?:^|/)(?P<pid>[^/_]+)/(?P<time>[^/_]+)/(?P<study>[^/_]+)_(?P<series>[^/_]+)_(?P<side>[12])\.nii(?:\.gz)?$"
)
_IMAGE_NAME = re.compile(r"(?:^|/)(?P<vid>[^/_]+_[^/_]+_[^/_]+_[^/_]+_[12])\.nii(?:\.gz)?$")


def volume_id_from_image_path(path: str) -> str:
    """The volume id of a published image path ``.../<pid>/<time>/<study>_<series>_<side>.nii.gz``
    (or of a file already named ``<volume_id>.nii.gz``).

    >>> volume_id_from_image_path("../data/images/9027422/00M/20041222_10312706_2.nii.gz")
    '9027422_00M_20041222_10312706_2'
    """
    p = str(path).replace("\\", "/")
    m = _IMAGE_PATH.search(p)
    if m:
        return "_".join(m.group("pid", "time", "study", "series", "side"))
    m = _IMAGE_NAME.search(p)
    if m:
        return m.group("vid")
    raise AnnotationError(
        f"image path {path!r} is not .../<patient>/<time>/<study>_<series>_<side 1|2>.nii.gz nor <volume_id>.nii.gz"
    )


# ----------------------------------------------------------------------------------------------------------
# Question bank


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


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


class _PromptIndex:
    """Prompt text -> question id: exact match first, then with whitespace normalized."""

    def __init__(self, questions: Mapping[str, str]):
        self.exact = {v: k for k, v in questions.items()}
        self.loose = {_norm_ws(v): k for k, v in questions.items()}

    def find(self, prompt: str) -> str | None:
        return self.exact.get(prompt) or self.loose.get(_norm_ws(prompt))


# ----------------------------------------------------------------------------------------------------------
# Published training items


def _json_array_items(text: str, where: Path) -> Iterable[tuple[int, Any]]:
    """(line, item) of a top-level JSON array, with the line where each item starts."""
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if text[i : i + 1] != "[":
        raise AnnotationError(f"{where}: expected a JSON list of training items")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise AnnotationError(f"{where}: JSON list is not closed")
        if text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            item, i = decoder.raw_decode(text, i)
        except ValueError as e:
            raise AnnotationError(f"{where}:{line}: not valid JSON: {e}") from None
        yield line, item


def read_training_items(
    path: str | Path, questions: Mapping[str, str] | None = None
) -> tuple[list[AnnotationRecord], list[RecordError]]:
    """Read published training items ``[{image, prompt, answer[, final_diagnosis]}, ...]``.

    The volume id comes from ``image`` (:func:`volume_id_from_image_path`); the question id from ``prompt``
    matched against ``questions`` (exact, then whitespace-normalized), else from the answer's key; the
    reasoning is the answer text before the answer JSON (``Final diagnosis:``), split by
    :func:`split_reasoning`. ``final_diagnosis`` (added at inference) is used when the answer text holds no
    JSON; when both are present they must agree.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: file not found")
    text = p.read_text(encoding="utf-8")
    index = _PromptIndex(questions or {})
    records: list[AnnotationRecord] = []
    errors: list[RecordError] = []
    try:
        for line, item in _json_array_items(text, p):
            where = f"{p}:{line}"
            try:
                records.append(_training_item(item, index, where))
            except _RecordFailure as e:
                errors.append(RecordError(where, e.record_kind, str(e)))
    except AnnotationError as e:  # the list itself broke: the items before it are kept
        errors.append(RecordError(str(p), "json", str(e)))
    return records, errors


class _RecordFailure(AnnotationError):
    """One record is unusable; ``record_kind`` is the :class:`RecordError` kind."""

    def __init__(self, record_kind: str, message: str):
        super().__init__(message)
        self.record_kind = record_kind


_fail = _RecordFailure


def _training_item(item: Any, index: _PromptIndex, where: str) -> AnnotationRecord:
    if not isinstance(item, dict):
        raise _fail("schema", f"expected an object {{image, prompt, answer}}, got {type(item).__name__}")
    for k in ("image", "prompt", "answer"):
        if not isinstance(item.get(k), str):
            raise _fail("schema", f"{k!r} must be a string, got {item.get(k)!r}"[:200])
    try:
        volume_id = volume_id_from_image_path(item["image"])
    except AnnotationError as e:
        raise _fail("volume", str(e)) from None
    answer_text = item["answer"]
    try:
        answer_obj, start = find_answer_json(answer_text)
    except AnnotationError as e:
        if "final_diagnosis" not in item:
            raise _fail("answer", str(e)) from None
        answer_obj, start = None, len(answer_text)
    if "final_diagnosis" in item:
        fd = item["final_diagnosis"]
        try:
            fd_obj = find_answer_json(fd)[0] if isinstance(fd, str) else fd
        except AnnotationError as e:
            raise _fail("answer", f"final_diagnosis: {e}") from None
        if answer_obj is not None and _safe_parse(answer_obj) != _safe_parse(fd_obj):
            raise _fail("answer", "the answer's final diagnosis and 'final_diagnosis' differ")
        answer_obj = fd_obj
    qid = index.find(item["prompt"])
    if qid is None:
        try:
            qid = _question_of(parse_answer(answer_obj))
        except AnnotationError:
            raise _fail(
                "question", "prompt matches no question of the bank, and the answer names none"
            ) from None
    if qid not in QUESTIONS:
        raise _fail("question", f"question id {qid!r} is not in the 69-question bank")
    try:
        severity = parse_answer(answer_obj, qid)
    except AnnotationError as e:
        raise _fail("answer", str(e)) from None
    return AnnotationRecord(
        sample_id=f"{volume_id}_{qid}",
        volume_id=volume_id,
        question_id=qid,
        question=item["prompt"],
        reasoning=split_reasoning(answer_text[:start]),
        answer_json=compact_json(answer_obj),
        severity=severity,
        source=where,
    )


def _safe_parse(obj: Any) -> Severity | None:
    try:
        return parse_answer(obj)
    except AnnotationError:
        return None


def _question_of(severity: Severity) -> str:
    g = severity[0]
    for q in QUESTIONS.values():
        if (q.finding, q.region) == (g.finding, g.region):
            return q.id
    raise AnnotationError(f"no question for {g}")  # unreachable: parse_answer resolved one


# ----------------------------------------------------------------------------------------------------------
# kneeprep JSONL

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
            except _RecordFailure as e:
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
        obj = find_answer_json(answer)[0] if isinstance(answer, str) else answer
        severity = parse_answer(obj, qid)
    except AnnotationError as e:
        raise _fail("answer", str(e)) from None
    return AnnotationRecord(
        sample_id=d["sample_id"],
        volume_id=d["volume_id"],
        question_id=qid,
        question=d["question"],
        reasoning=tuple(d["reasoning"]),
        answer_json=compact_json(obj),
        severity=severity,
        source=where,
    )


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
