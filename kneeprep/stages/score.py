"""ReasonKnee-Bench scoring: graded-answer accuracy and 3D box IoU (``kneeprep score``).

Box conventions (``docs/DESIGN.md``): kneeprep boxes are voxel indices of the stored volume, array order
``(z, y, x)``, **half-open** ``[z0, y0, x0, z1, y1, x1]`` (``image[z0:z1, y0:y1, x0:x1]`` is the region). The
3DReasonKnee list form is ``[start_slice, end_slice, x_min, x_max, y_min, y_max]`` with **inclusive** ends:
``start_slice = z0, end_slice = z1 - 1, x_min = x0, x_max = x1 - 1, y_min = y0, y_max = y1 - 1``.

Definitions (all pure functions of predictions and truth):

* **Diagnostic accuracy** -- each graded component of a truth answer is one trial; it is correct when the
  prediction parses (:func:`kneeprep.moaks.severity.parse_answer` with the truth's question id) and gives the same
  grade for that component. A missing prediction, an unparseable answer or a missing component makes the
  component wrong; missing and unparseable answers are also counted separately. ``answer_accuracy`` is the
  share of answers with every component right. Both are reported overall, per finding family, per region and
  per question.
* **Localization** -- over truth samples that have a box: the true 3D IoU ``|A ∩ B| / |A ∪ B|`` of the voxel
  sets of the two half-open boxes (not M3D's intersection over the enclosing box). A missing or unreadable
  predicted box has IoU 0 and is counted in ``no_box``. Reported: mean IoU, share with IoU ≥ 0.25 and ≥ 0.5,
  overall and per region. Predicted boxes for samples without a truth box are only counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kneeprep.errors import AnnotationError, InputNotFoundError
from kneeprep.formats.box import Voxels, check_voxels, iou, list_form_to_voxels
from kneeprep.moaks.anatomy import FINDINGS
from kneeprep.moaks.severity import Severity, find_answer_json, parse_answer

#: keys under which a predicted box is looked for (case-insensitive), in this order.
BOX_KEYS = ("box", "bbox", "bounding_box", "box_voxels")
#: how many unparseable answers are listed (with their reason) in the report; all are counted.
MAX_LISTED = 100
#: the published zero-shot scripts (3DReasonKnee ``code/zero_shot/*.py``) store each answer as
#: ``{"question": ..., "<model>_result": <answer>, "<model>_total_tokens": ..., ...}``; the suffix, any case.
RESULT_SUFFIX = "_result"


# ----------------------------------------------------------------------------------------------------------
# Boxes


def parse_box(value: Any) -> Voxels:
    """A predicted box: a list is the 3DReasonKnee list form; ``{"voxels": [...]}`` is kneeprep's half-open
    form (``{"list": [...]}`` is accepted for the list form)."""
    if isinstance(value, Mapping):
        keys = {str(k).lower(): v for k, v in value.items()}
        if "voxels" in keys:
            return check_voxels(keys["voxels"])
        if "list" in keys:
            return list_form_to_voxels(keys["list"])
        raise AnnotationError(
            f"box object needs 'voxels' (half-open) or 'list' (inclusive), got keys {list(value)}"
        )
    return list_form_to_voxels(value)


# ----------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Prediction:
    """A model's output for one sample: the answer (text or object, as given) and its box, if any.

    ``box_error`` says why a box that was given could not be read (the box then counts as missing);
    ``answer_error``, when set, why there is no answer to parse (the answer then counts as unparseable)."""

    answer: Any
    box: Voxels | None = None
    box_error: str | None = None
    answer_error: str | None = None


@dataclass(frozen=True)
class TruthRecord:
    sample_id: str
    question_id: str
    finding: str
    region: str  # the region the per-region tables group by
    severity: Severity
    box: Voxels | None = None  # half-open voxels, or None when the question has no box


def _find_box(obj: Mapping) -> tuple[Voxels | None, str | None]:
    lower = {str(k).lower(): v for k, v in obj.items()}
    for k in BOX_KEYS:
        if k in lower and lower[k] is not None:
            try:
                return parse_box(lower[k]), None
            except AnnotationError as e:
                return None, str(e)
    return None, None


def _zero_shot_result(value: Mapping) -> Prediction | None:
    """A record of the published zero-shot scripts, ``{"question", "<model>_result", ...}``: the prediction is
    the ``*_result`` value. The scripts' own fallbacks are understood: ``{"response": text}`` (the model's
    text did not decode as JSON) is the text, ``{"error": message}`` (the model call failed) no answer."""
    keys = [k for k in value if isinstance(k, str) and k.lower().endswith(RESULT_SUFFIX)]
    if not keys:
        return None
    if len(keys) > 1:
        return Prediction(None, answer_error=f"several result keys {keys}: cannot tell which model's answer")
    result = value[keys[0]]
    if isinstance(result, Mapping) and set(result) == {"response"} and isinstance(result["response"], str):
        result = result["response"]
    elif isinstance(result, Mapping) and set(result) == {"error"}:
        return Prediction(None, answer_error=f"{keys[0]} is an error, not an answer: {result['error']}"[:300])
    elif isinstance(result, Mapping) and not result:
        return Prediction(None, answer_error=f"{keys[0]} is empty")
    return parse_prediction(result)


def parse_prediction(value: Any) -> Prediction:
    """One prediction value: answer text (the box, if any, is looked for in its JSON), an answer object with
    a box key beside the grades, ``{"answer": ..., "box": ...}``, or a published zero-shot record
    ``{"question": ..., "<model>_result": <answer text or object>, ...}``."""
    if isinstance(value, Mapping) and "answer" not in value and (zs := _zero_shot_result(value)) is not None:
        return zs
    if isinstance(value, Mapping) and "answer" in value:
        box, err = _find_box(value)
        if box is None and err is None and isinstance(value["answer"], Mapping):
            box, err = _find_box(value["answer"])
        return Prediction(value["answer"], box, err)
    if isinstance(value, Mapping):
        return Prediction(value, *_find_box(value))
    if isinstance(value, str):
        try:
            obj = find_answer_json(value)[0]
        except AnnotationError:
            return Prediction(value)
        return Prediction(value, *(_find_box(obj) if isinstance(obj, Mapping) else (None, None)))
    return Prediction(value)


def read_predictions(path: str | Path) -> tuple[dict[str, Prediction], list[tuple[str, str, str]]]:
    """Read predictions: a JSON object ``{sample_id: value}`` (the published zero-shot scripts' result files
    as they are, among others: see :func:`parse_prediction`) or JSONL lines ``{"sample_id", "answer",
    "box"?}``. Returns predictions and ``(source "file:line", kind, message)`` for lines that could not be
    read; a sample id given twice keeps the first."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: predictions file not found")
    text = p.read_text(encoding="utf-8")
    errors: list[tuple[str, str, str]] = []
    out: dict[str, Prediction] = {}
    if p.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and "sample_id" not in data:
            return {str(k): parse_prediction(v) for k, v in data.items()}, errors
        if data is not None and not isinstance(data, dict):
            raise AnnotationError(
                f"{p}: expected a JSON object {{sample_id: answer}} or JSONL, got {type(data).__name__}"
            )
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            d = json.loads(line)
        except ValueError as e:
            errors.append((where, "json", f"not valid JSON: {e}"))
            continue
        if not isinstance(d, dict) or not isinstance(d.get("sample_id"), str) or "answer" not in d:
            errors.append((where, "schema", "expected an object with 'sample_id' (string) and 'answer'"))
            continue
        if d["sample_id"] in out:
            errors.append((where, "duplicate", f"sample {d['sample_id']} given twice; the first is kept"))
            continue
        out[d["sample_id"]] = parse_prediction(d)
    return out, errors


# ----------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Accuracy:
    components: int = 0
    correct_components: int = 0
    answers: int = 0
    correct_answers: int = 0
    missing: int = 0
    unparseable: int = 0

    @property
    def component_accuracy(self) -> float | None:
        return self.correct_components / self.components if self.components else None

    @property
    def answer_accuracy(self) -> float | None:
        return self.correct_answers / self.answers if self.answers else None

    def to_json(self) -> dict[str, Any]:
        return {
            "components": self.components,
            "correct_components": self.correct_components,
            "component_accuracy": self.component_accuracy,
            "answers": self.answers,
            "correct_answers": self.correct_answers,
            "answer_accuracy": self.answer_accuracy,
            "missing": self.missing,
            "unparseable": self.unparseable,
        }


@dataclass
class Localization:
    boxes: int = 0
    no_box: int = 0
    iou_sum: float = 0.0
    at_025: int = 0
    at_050: int = 0

    def add(self, value: float, had_box: bool) -> None:
        self.boxes += 1
        self.no_box += not had_box
        self.iou_sum += value
        self.at_025 += value >= 0.25
        self.at_050 += value >= 0.5

    def to_json(self) -> dict[str, Any]:
        n = self.boxes
        return {
            "boxes": n,
            "no_box": self.no_box,
            "mean_iou": self.iou_sum / n if n else None,
            "iou_ge_0.25": self.at_025 / n if n else None,
            "iou_ge_0.5": self.at_050 / n if n else None,
        }


@dataclass
class ScoreReport:
    overall: Accuracy = field(default_factory=Accuracy)
    by_family: dict[str, Accuracy] = field(default_factory=lambda: defaultdict(Accuracy))
    by_region: dict[str, Accuracy] = field(default_factory=lambda: defaultdict(Accuracy))
    by_question: dict[str, Accuracy] = field(default_factory=lambda: defaultdict(Accuracy))
    localization: Localization = field(default_factory=Localization)
    localization_by_region: dict[str, Localization] = field(default_factory=lambda: defaultdict(Localization))
    truth: int = 0
    predictions: int = 0
    extra_predictions: int = 0  # predictions whose sample id is not in the truth
    boxes_without_truth: int = 0
    unparseable_examples: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def table(d: Mapping[str, Any]) -> dict[str, Any]:
            return {k: d[k].to_json() for k in sorted(d, key=_sort_key)}

        return {
            "truth": self.truth,
            "predictions": self.predictions,
            "extra_predictions": self.extra_predictions,
            "boxes_without_truth": self.boxes_without_truth,
            "accuracy": {
                "overall": self.overall.to_json(),
                "by_family": table(self.by_family),
                "by_region": table(self.by_region),
                "by_question": table(self.by_question),
            },
            "localization": {
                "overall": self.localization.to_json(),
                "by_region": table(self.localization_by_region),
            },
            "unparseable_examples": self.unparseable_examples,
        }

    def format_table(self) -> str:
        """A plain-text summary: accuracy per family and region, localization per region."""

        def pct(v: float | None) -> str:
            return "   -  " if v is None else f"{100 * v:5.1f}%"

        o = self.overall
        lines = [
            f"samples: {self.truth} in truth, {self.predictions} predicted, {o.missing} missing, "
            f"{o.unparseable} unparseable, {self.extra_predictions} not in truth",
            "",
            f"{'accuracy':<32} {'components':>10} {'comp acc':>8} {'answers':>8} {'exact':>7} {'unparse':>8}",
        ]

        def row(name: str, a: Accuracy) -> str:
            return (
                f"{name:<32} {a.components:>10} {pct(a.component_accuracy):>8} {a.answers:>8} "
                f"{pct(a.answer_accuracy):>7} {a.unparseable:>8}"
            )

        lines.append(row("overall", o))
        for k in sorted(self.by_family):
            lines.append(row(f"  family {k}", self.by_family[k]))
        for k in sorted(self.by_region):
            lines.append(row(f"  region {k}", self.by_region[k]))
        if self.localization.boxes:
            lines += [
                "",
                f"{'localization':<32} {'boxes':>10} {'mean IoU':>8} {'>=0.25':>8} {'>=0.5':>7} {'no box':>8}",
            ]

            def lrow(name: str, loc: Localization) -> str:
                j = loc.to_json()
                return (
                    f"{name:<32} {loc.boxes:>10} {j['mean_iou']:>8.3f} {pct(j['iou_ge_0.25']):>8} "
                    f"{pct(j['iou_ge_0.5']):>7} {loc.no_box:>8}"
                )

            lines.append(lrow("overall", self.localization))
            for k in sorted(self.localization_by_region):
                lines.append(lrow(f"  region {k}", self.localization_by_region[k]))
        return "\n".join(lines)


def _sort_key(k: str) -> tuple:
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


def score(predictions: Mapping[str, Prediction], truth: Iterable[TruthRecord]) -> ScoreReport:
    """Score ``predictions`` (sample id -> :class:`Prediction`) against ``truth`` (definitions in the module
    docstring). Raises :class:`AnnotationError` if a truth sample id repeats."""
    r = ScoreReport(predictions=len(predictions))
    seen: set[str] = set()
    for t in truth:
        if t.sample_id in seen:
            raise AnnotationError(f"truth sample {t.sample_id} appears twice")
        seen.add(t.sample_id)
        r.truth += 1
        groups = [
            r.overall,
            r.by_family[FINDINGS.get(t.finding, t.finding)],
            r.by_region[t.region or "whole knee"],
            r.by_question[t.question_id],
        ]
        pred = predictions.get(t.sample_id)
        got: dict[str, int] = {}
        if pred is None:
            for g in groups:
                g.missing += 1
        else:
            try:
                if pred.answer_error is not None:
                    raise AnnotationError(pred.answer_error)
                got = {gr.component: gr.grade for gr in parse_answer(pred.answer, t.question_id)}
            except AnnotationError as e:
                for g in groups:
                    g.unparseable += 1
                if len(r.unparseable_examples) < MAX_LISTED:
                    r.unparseable_examples.append({"sample_id": t.sample_id, "reason": str(e)})
        right = sum(got.get(gr.component) == gr.grade for gr in t.severity)
        for g in groups:
            g.components += len(t.severity)
            g.correct_components += right
            g.answers += 1
            g.correct_answers += bool(t.severity) and right == len(t.severity)
        if t.box is not None:
            pbox = pred.box if pred is not None else None
            value = iou(t.box, pbox) if pbox is not None else 0.0
            for loc in (r.localization, r.localization_by_region[t.region or "whole knee"]):
                loc.add(value, pbox is not None)
        elif pred is not None and pred.box is not None:
            r.boxes_without_truth += 1
    r.extra_predictions = sum(1 for k in predictions if k not in seen)
    return r
