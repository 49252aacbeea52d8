"""The annotation records every reader returns: :class:`AnnotationRecord` (one quintuple annotation, its JSONL
form), :class:`AnnotationSet` (what an annotation directory holds), :class:`RecordError` (a record that could
not be used, and why) and :class:`RecordFailure`, which a reader raises for one record and turns into a
:class:`RecordError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kneeprep.errors import AnnotationError
from kneeprep.formats.splits import SplitRow
from kneeprep.moaks.severity import Severity


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


class RecordFailure(AnnotationError):
    """One record is unusable; ``record_kind`` is the :class:`RecordError` kind."""

    def __init__(self, record_kind: str, message: str):
        super().__init__(message)
        self.record_kind = record_kind
