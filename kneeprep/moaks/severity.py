"""Graded answers (MOAKS severity) in one canonical form, and the parser for the published answer JSON.

A **severity** is a tuple of :class:`Grade` records ``(finding, region, component, grade)``: ``finding`` one of
:data:`kneeprep.moaks.anatomy.FINDINGS`, ``region`` the question's region (``""`` for whole-knee findings),
``component`` a canonical name from :data:`kneeprep.moaks.anatomy.COMPONENTS`, ``grade`` an int in ``0..max``. Grades
are ordered as the question lists its components (then, for ligaments, the published extra fields), so two
severities of the same answer compare equal.

:func:`parse_answer` accepts every quirk of the published answers (and of model outputs that imitate them):

* the wrapper ``MOAKS_scores``, ``MOAKS_grade`` or none; other top-level keys (``"bbox"``, ...) are ignored;
* a grade as a bare integer or ``{"grade": n}`` (either form for any one-component question);
* answer keys spaced or snake_case, any case (``"femur medial central BML"`` = ``"Femur_Medial_Central_BML"``),
  including the published bank's spellings that differ from :mod:`kneeprep.moaks.anatomy`'s answer keys
  (``"medial meniscus anterior extrusion"``, ``"pes_anserine_bursitis_presence"``, ...);
* component keys in the published spelling or the canonical name, any case, spaces or underscores;
* text: the JSON after the last ``Final diagnosis:``, else inside the last fenced block (```` ```json ````),
  else the last JSON object found in the prose.

:func:`to_published` writes a severity back in the published style, and ``parse_answer(to_published(s, q),
q.id) == s``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kneeprep.errors import AnnotationError
from kneeprep.moaks.anatomy import COMPONENTS, FINDINGS, QUESTIONS, Question, find_question


@dataclass(frozen=True)
class Grade:
    """One graded component of an answer, e.g. ``Grade("bml", "femur medial central", "bml_size", 2)``."""

    finding: str
    region: str
    component: str
    grade: int

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "region": self.region,
            "component": self.component,
            "grade": self.grade,
        }


#: The canonical structure of a graded answer.
Severity = tuple[Grade, ...]


def severity_to_json(severity: Severity) -> list[dict[str, Any]]:
    """The list-of-dicts form stored in shards and JSONL (``[{finding, region, component, grade}, ...]``)."""
    return [g.to_json() for g in severity]


def severity_from_json(items: Iterable[Mapping[str, Any]]) -> Severity:
    """Inverse of :func:`severity_to_json`; checks vocabulary and grade ranges."""
    out = []
    for i, d in enumerate(items):
        try:
            finding, region, component, grade = d["finding"], d["region"], d["component"], d["grade"]
        except (KeyError, TypeError):
            raise AnnotationError(
                f"severity item {i}: expected {{finding, region, component, grade}}, got {d!r}"
            ) from None
        if finding not in FINDINGS:
            raise AnnotationError(f"severity item {i}: unknown finding {finding!r}")
        if component not in COMPONENTS:
            raise AnnotationError(f"severity item {i}: unknown component {component!r}")
        out.append(
            Grade(finding, region or "", component, _check_grade(component, grade, f"severity item {i}"))
        )
    return tuple(out)


def allowed_components(question: Question | str) -> tuple[str, ...]:
    """The components an answer to ``question`` may grade, in canonical order."""
    return tuple(_question(question).components)


def make_severity(question: Question | str, grades: Mapping[str, int]) -> Severity:
    """A severity for ``question`` from ``{canonical component: grade}``, in canonical order, range-checked;
    a component the question does not grade (:func:`allowed_components`) is an error."""
    q = _question(question)
    allowed = allowed_components(q)
    for c in grades:
        if c not in allowed:
            raise AnnotationError(
                f"question {q.id}: component {c!r} is not graded here (expected {', '.join(allowed)})"
            )
    return tuple(
        Grade(q.finding, q.region, c, _check_grade(c, grades[c], f"question {q.id}"))
        for c in allowed
        if c in grades
    )


# ----------------------------------------------------------------------------------------------------------
# Published spellings


def _norm(s: str) -> str:
    return " ".join(s.replace("_", " ").replace("-", " ").lower().split())


#: question id -> the answer key :func:`to_published` writes (the published bank's spelling).
PUBLISHED_KEYS: dict[str, str] = {qid: q.answer_key for qid, q in QUESTIONS.items()}
_COMPONENT_BY_KEY: dict[str, str] = {}
for _c, (_spelling, _max) in COMPONENTS.items():
    _COMPONENT_BY_KEY[_norm(_c)] = _c
    _COMPONENT_BY_KEY[_norm(_spelling)] = _c
_WRAPPERS = {"moaks scores", "moaks grade", "moaks grades", "moaks score"}


def resolve_question(answer_key: str) -> Question | None:
    """The question an answer key belongs to (the published spelling; case and spaces/underscores/hyphens
    ignored); ``None`` if it names no question."""
    return find_question(answer_key)


def _question(question: Question | str) -> Question:
    if isinstance(question, Question):
        return question
    q = QUESTIONS.get(str(question))
    if q is None:
        raise AnnotationError(f"unknown question id {question!r} (known: 1..{len(QUESTIONS)})")
    return q


def _check_grade(component: str, value: Any, where: str) -> int:
    top = COMPONENTS[component][1]
    if isinstance(value, bool):
        raise AnnotationError(f"{where}: {component} must be an integer 0..{top}, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise AnnotationError(f"{where}: {component} must be an integer 0..{top}, got {value!r}")
    if not 0 <= value <= top:
        raise AnnotationError(f"{where}: {component} grade {value} is out of range 0..{top}")
    return value


# ----------------------------------------------------------------------------------------------------------
# Finding the JSON in answer text

_FINAL = re.compile(r"final\s+diagnosis\s*:?", re.IGNORECASE)
_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)


def find_answer_json(text: str) -> tuple[Any, int]:
    """The answer JSON inside ``text`` and the offset where the answer part starts (reasoning ends).

    Rule, in order: the text after the last ``Final diagnosis:`` (case-insensitive) is searched if present;
    within it (or the whole text), the content of the last fenced block if there is one; within that, the
    whole string as JSON, else the last top-level ``{...}`` that decodes as JSON. Raises
    :class:`AnnotationError` when no JSON object is found.
    """
    start = 0
    marks = list(_FINAL.finditer(text))
    if marks:
        start = marks[-1].start()
        search_from = marks[-1].end()
    else:
        search_from = 0
    region = text[search_from:]
    fences = list(_FENCE.finditer(region))
    if fences:
        if not marks:
            start = search_from + fences[-1].start()
        region = fences[-1].group(1)
    stripped = region.strip()
    try:
        return json.loads(stripped), start
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    found, found_at, i = None, -1, region.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(region, i)
        except ValueError:
            i = region.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found, found_at = obj, i
        i = region.find("{", end)
    if found is None:
        snippet = stripped[:80] + ("..." if len(stripped) > 80 else "")
        raise AnnotationError(f"no JSON object in the answer text ({snippet!r})")
    if not marks and not fences:
        start = found_at
    return found, start


# ----------------------------------------------------------------------------------------------------------
# Parsing and writing


def parse_answer(obj_or_text: Any, question_id: str | None = None) -> Severity:
    """Normalize an answer (parsed JSON or text containing it) to a :data:`Severity`.

    With ``question_id`` the answer must contain that question's key; without it, exactly one question's key.
    Raises :class:`AnnotationError` naming the reason (no JSON, unknown key or component, bad or
    out-of-range grade, no grades).
    """
    obj = find_answer_json(obj_or_text)[0] if isinstance(obj_or_text, str) else obj_or_text
    if not isinstance(obj, Mapping):
        raise AnnotationError(f"answer must be a JSON object, got {type(obj).__name__}: {obj!r}"[:200])
    inner: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, str) and _norm(k) in _WRAPPERS:
            if not isinstance(v, Mapping):
                raise AnnotationError(f"answer wrapper {k!r} must hold an object, got {v!r}"[:200])
            inner.update(v)
        else:
            inner[k] = v
    entries = [(k, q, v) for k, v in inner.items() if isinstance(k, str) and (q := resolve_question(k))]
    if question_id is not None:
        want = _question(question_id)
        entries = [e for e in entries if e[1].id == want.id]
        if not entries:
            raise AnnotationError(
                f"answer has no key for question {want.id} ({PUBLISHED_KEYS[want.id]!r}); keys: {list(inner)}"
            )
    elif not entries:
        raise AnnotationError(f"answer names no known question; keys: {list(inner)}")
    if len({e[1].id for e in entries}) > 1 or len(entries) > 1:
        raise AnnotationError(f"answer has keys for several questions: {[e[0] for e in entries]}")
    key, q, value = entries[0]
    where = f"question {q.id} ({key!r})"
    grades: dict[str, int] = {}
    if isinstance(value, Mapping):
        if len(q.components) == 1 and len(value) == 1 and _norm(str(next(iter(value)))) == "grade":
            value = {q.components[0]: next(iter(value.values()))}
        for ck, cv in value.items():
            comp = _COMPONENT_BY_KEY.get(_norm(str(ck)))
            if comp is None:
                raise AnnotationError(f"{where}: unknown component {ck!r}")
            if comp in grades:
                raise AnnotationError(f"{where}: component {comp!r} given twice")
            grades[comp] = _check_grade(comp, cv, where)
    elif len(q.components) == 1:
        grades[q.components[0]] = _check_grade(q.components[0], value, where)
    else:
        raise AnnotationError(
            f"{where}: expected an object of {len(q.components)} component grades, got {value!r}"
        )
    if not grades:
        raise AnnotationError(f"{where}: no grades")
    return make_severity(q, grades)


def to_published(severity: Severity, question: Question | str) -> dict[str, Any]:
    """The published answer JSON for ``severity``: the question's wrapper (or none), the published key, a bare
    grade for the bare-grade questions (meniscal extrusion), component keys in the published spelling."""
    q = _question(question)
    if not severity:
        raise AnnotationError(f"question {q.id}: empty severity has no published form")
    other = [g for g in severity if (g.finding, g.region) != (q.finding, q.region)]
    if other:
        raise AnnotationError(
            f"question {q.id} ({q.finding}, {q.region!r}): severity holds grades of {other[0]}"
        )
    comps = {g.component: g.grade for g in severity}
    if q.bare_grade and list(comps) == list(q.components):
        value: Any = comps[q.components[0]]
    else:
        value = {COMPONENTS[c][0]: g for c, g in comps.items()}
    body = {PUBLISHED_KEYS[q.id]: value}
    return {q.wrapper: body} if q.wrapper else body
