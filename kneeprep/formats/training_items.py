"""Reading the published training items ``[{image, prompt, answer[, final_diagnosis]}, ...]``
(:func:`read_training_items`), with what they need: volume ids from published image paths
(:func:`volume_id_from_image_path`), prompts matched to the question bank, and reasoning text split into steps.

Reasoning steps (:func:`split_reasoning`): if the text has numbered lines (``1.``, ``2)``, ``Step 3:`` at the
start of a line), each numbered item with its continuation lines is a step, and non-empty text before the first
number is a step of its own; otherwise the text is split into sentences at ``.``, ``!`` or ``?`` followed by
whitespace and an upper-case letter. Whitespace inside a step is collapsed to single spaces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kneeprep.errors import AnnotationError, InputNotFoundError
from kneeprep.formats.annotation_records import AnnotationRecord, RecordError, RecordFailure, compact_json
from kneeprep.moaks.anatomy import QUESTIONS
from kneeprep.moaks.severity import Severity, find_answer_json, parse_answer

_fail = RecordFailure

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


def _norm_ws(s: str) -> str:
    return " ".join(s.split())


class _PromptIndex:
    """Prompt text -> question id: exact match first, then with whitespace normalized."""

    def __init__(self, questions: Mapping[str, str]):
        self.exact = {v: k for k, v in questions.items()}
        self.loose = {_norm_ws(v): k for k, v in questions.items()}

    def find(self, prompt: str) -> str | None:
        return self.exact.get(prompt) or self.loose.get(_norm_ws(prompt))


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
            except RecordFailure as e:
                errors.append(RecordError(where, e.record_kind, str(e)))
    except AnnotationError as e:  # the list itself broke: the items before it are kept
        errors.append(RecordError(str(p), "json", str(e)))
    return records, errors


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
