"""The join: annotations x volumes x boxes -> :class:`Quintuple` records (one per training sample).

A quintuple is (volume, question, box, reasoning, severity). :func:`build_quintuples` joins the annotation
records with the volume store's attributes (geometry, boxes, patient) and assigns splits by patient. It returns
the quintuples *and* a :class:`Rejected` record for every annotation that cannot become a row -- nothing is
dropped silently. Rejection kinds (``Rejected.reason_kind``):

==================  =========================================================================================
``volume_missing``  the annotation names a volume the store does not hold (not converted, or failed)
``volume_failed``   the volume is in the store but its QC verdict is ``fail``
``annotation``      the annotation record is malformed (reported by the annotation reader, or empty fields)
``unknown_question`` the question id is not in the recipe's ``[questions]`` table
``no_split``        ``splits.source = "csv"`` and the volume is in none of the split CSVs
``no_box``          the recipe gives the question a box region, but this volume has no voxels of that region
                    (empty or absent in its mask): a fact of the data, not an error (see :data:`BENIGN_KINDS`)
==================  =========================================================================================

Questions the recipe maps to *no* region (periarticular findings: nothing in the masks to box) are **not**
rejected: they become rows with a null box, ``box_empty = True`` and ``box_reason`` saying why.

Splits are by patient, never by knee: from the published split CSVs (``splits.source = "csv"``) or generated
from ``splits.seed`` and ``splits.ratios`` over the sorted patient ids. A patient found in two splits raises
:class:`~kneeprep.errors.ValidationError`.

Quintuples carry the real ids (they are joined with the store, which is keyed by them); the recipe's
``privacy.pseudonymize_ids`` is applied where they are published (:mod:`kneeprep.privacy`, in
:func:`kneeprep.stages.shards.build_shards`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kneeprep.boxes import question_box
from kneeprep.errors import RecipeError, ValidationError
from kneeprep.formats.box import Box
from kneeprep.formats.splits import SPLITS, parse_volume_id
from kneeprep.formats.volume_attrs import VolumeAttrs
from kneeprep.moaks.anatomy import QUESTIONS
from kneeprep.moaks.severity import Grade

#: Rejection kinds that are facts of the data rather than errors: ``kneeprep shards`` still exits 0.
BENIGN_KINDS = frozenset({"no_box"})
REJECTION_KINDS = ("volume_missing", "volume_failed", "annotation", "unknown_question", "no_split", "no_box")


@dataclass(frozen=True)
class Quintuple:
    """One training sample: which volume, which question, its box, the reasoning and the graded answer."""

    sample_id: str
    volume_id: str
    patient_id: str
    split: str
    question_id: str
    #: the finding type of the question (``kneeprep.moaks.anatomy.FINDINGS`` key, e.g. ``"bml"``).
    question_type: str
    #: the MOAKS region the question asks about (``""`` for whole-knee findings).
    question_region: str
    question: str
    #: the question's box (:meth:`kneeprep.formats.box.Box.extent`: no label ids, count or centroid)
    box: Box | None
    #: true when the quintuple has no box; ``box_reason`` says why.
    box_empty: bool
    box_reason: str | None
    reasoning: tuple[str, ...]
    severity: tuple[Grade, ...]
    answer_json: str


@dataclass(frozen=True)
class Rejected:
    """An annotation that did not become a quintuple, and why."""

    sample_id: str
    reason_kind: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"sample_id": self.sample_id, "reason_kind": self.reason_kind, "message": self.message}


def build_quintuples(
    annotations, volumes_attrs: Mapping[str, VolumeAttrs | Mapping[str, Any]], recipe
) -> tuple[list[Quintuple], list[Rejected]]:
    """Join annotation records with volume attributes into quintuples.

    ``annotations`` is a ``kneeprep.formats.annotations.AnnotationSet`` (``records``, split rows, question bank,
    per-record ``errors``); ``volumes_attrs`` maps volume id -> the volume group's ``kneeprep`` attrs (a
    :class:`~kneeprep.formats.volume_attrs.VolumeAttrs` as ``kneeprep.formats.store.read_volume_attrs`` returns
    it, or its JSON). Returns quintuples sorted by (split, volume id, question id)
    and rejections sorted by sample id. Raises :class:`ValidationError` if a patient falls in two splits.
    """
    records = list(annotations.records)
    rejected: list[Rejected] = [_rejected_from_error(e) for e in annotations.errors]
    bank = dict(annotations.questions)

    candidates: list[tuple[Any, VolumeAttrs, str]] = []
    for rec in records:
        vid = rec.volume_id
        attrs = volumes_attrs.get(vid)
        if attrs is not None:
            attrs = VolumeAttrs.of(attrs, where=f"volume {vid}")
        if attrs is None:
            rejected.append(
                Rejected(rec.sample_id, "volume_missing", f"volume {vid} is not in the volume store")
            )
            continue
        if attrs.qc_status == "fail":
            reasons = "; ".join(attrs.qc_reasons) or "no reason recorded"
            rejected.append(Rejected(rec.sample_id, "volume_failed", f"volume {vid} failed QC: {reasons}"))
            continue
        if not rec.sample_id or not rec.question_id:
            rejected.append(
                Rejected(rec.sample_id or f"{vid}_?", "annotation", "empty sample_id or question_id")
            )
            continue
        if rec.question_id not in recipe.questions:
            rejected.append(
                Rejected(
                    rec.sample_id,
                    "unknown_question",
                    f"question {rec.question_id!r} is not in the question bank",
                )
            )
            continue
        candidates.append((rec, attrs, _patient_of(vid, attrs)))

    split_of = _assign_splits(annotations, {(r.volume_id, p) for r, _, p in candidates}, recipe)

    out: list[Quintuple] = []
    parsed: dict[str, dict[str, Box]] = {}  # a volume's boxes by region, parsed once for all its questions
    for rec, attrs, patient in candidates:
        split = split_of.get(rec.volume_id)
        if split is None:
            rejected.append(
                Rejected(rec.sample_id, "no_split", f"volume {rec.volume_id} is in none of the split CSVs")
            )
            continue
        if rec.volume_id not in parsed:
            parsed[rec.volume_id] = {b.region: b for b in attrs.box_records()}
        box, reason, kind = question_box_json(parsed[rec.volume_id], recipe, rec.question_id)
        if kind is not None:
            rejected.append(
                Rejected(rec.sample_id, kind, f"volume {rec.volume_id}, question {rec.question_id}: {reason}")
            )
            continue
        q = QUESTIONS.get(rec.question_id)
        out.append(
            Quintuple(
                sample_id=rec.sample_id,
                volume_id=rec.volume_id,
                patient_id=patient,
                split=split,
                question_id=rec.question_id,
                question_type=q.finding if q else "",
                question_region=q.region if q else "",
                question=rec.question or bank.get(rec.question_id, ""),
                box=box,
                box_empty=box is None,
                box_reason=reason,
                reasoning=tuple(rec.reasoning),
                severity=tuple(rec.severity),
                answer_json=rec.answer_json,
            )
        )
    out.sort(key=quintuple_order)
    rejected.sort(key=lambda r: (r.sample_id, r.reason_kind))
    return out, rejected


_SPLIT_RANK = {s: i for i, s in enumerate(SPLITS)}


def quintuple_order(q: Quintuple) -> tuple:
    """The row order of the shards: split, volume, question id (numeric), sample id."""
    return (
        _SPLIT_RANK.get(q.split, len(SPLITS)),
        q.split,
        q.volume_id,
        _qkey(q.question_id),
        q.sample_id,
    )


def _qkey(qid: str) -> tuple[int, str]:
    return (int(qid), "") if qid.isdigit() else (1 << 30, qid)


def question_box_json(
    boxes: Iterable[Mapping[str, Any]] | Mapping[str, Box], recipe, question_id: str
) -> tuple[Box | None, str | None, str | None]:
    """The box of ``question_id`` from a volume's ``boxes`` attribute (``Box.to_json()`` dicts, or the
    :class:`Box` objects parsed from them, or those by region: what a caller asking for many questions of one
    volume makes once), through
    :func:`kneeprep.boxes.question_box`: ``(box, reason, rejection kind)``.

    * the recipe gives the question no region -> ``(None, reason, None)``: a row with no box;
    * the region has no box, or an empty one, in this volume -> ``(None, reason, "no_box")``: rejected;
    * else ``(box.extent(), None, None)``.
    """
    if not isinstance(boxes, Mapping):
        boxes = [b if isinstance(b, Box) else Box.from_json(b) for b in boxes]
    box, reason = question_box(boxes, recipe, question_id)
    if box is not None:
        return box.extent(), None, None
    return None, reason, (None if not recipe.questions.get(question_id) else "no_box")


# ----------------------------------------------------------------------------------------------------------
# splits


def _assign_splits(annotations, volumes: set[tuple[str, str]], recipe) -> dict[str, str]:
    """volume id -> split, by patient. Raises ValidationError if a patient lands in two splits."""
    s = recipe.splits
    if s.source == "csv":
        rows = list(annotations.splits)
        split_of = {r.volume_id: r.split for r in rows}
        by_patient: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            by_patient.setdefault(r.patient_id, set()).add((r.split, r.source))
        for vid, patient in volumes:
            if vid in split_of:
                by_patient.setdefault(patient, set()).add((split_of[vid], vid))
        for patient, where in sorted(by_patient.items()):
            splits = sorted({w[0] for w in where})
            if len(splits) > 1:
                raise ValidationError(
                    f"patient {patient} is in several splits ({', '.join(splits)}): "
                    f"{', '.join(sorted(w[1] for w in where))}; splits must be by patient"
                )
        return split_of
    if s.source == "generated":
        patient_split = generate_patient_splits(sorted({p for _, p in volumes}), s.seed, s.ratios)
        return {vid: patient_split[p] for vid, p in volumes}
    raise RecipeError(f"splits.source: expected 'csv' or 'generated', got {s.source!r}")


def generate_patient_splits(patients: list[str], seed: int, ratios) -> dict[str, str]:
    """Assign sorted patients to train/val/test: permute with ``numpy.random.default_rng(seed)``, then cut at
    the cumulative ratios (rounded). Same patients, seed and ratios -> same assignment.

    >>> generate_patient_splits(["a", "b", "c", "d"], 0, (0.5, 0.25, 0.25))["a"] in ("train", "val", "test")
    True
    """
    ps = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(ps))
    cuts = np.round(np.cumsum(ratios) * len(ps)).astype(int)
    out = {}
    for rank, idx in enumerate(order):
        k = int(np.searchsorted(cuts, rank, side="right"))
        out[ps[idx]] = SPLITS[min(k, len(SPLITS) - 1)]
    return out


# ----------------------------------------------------------------------------------------------------------
# helpers


def _patient_of(volume_id: str, attrs: VolumeAttrs) -> str:
    p = attrs.patient_id
    return str(p) if p else str(parse_volume_id(volume_id)["patient_id"])


def _rejected_from_error(e) -> Rejected:
    """A per-record error of the annotation reader (``RecordError(source, kind, message)``) as a rejection of
    kind ``annotation``; its sample id is the record's ``file:line`` since the record could not be read."""
    if isinstance(e, Rejected):
        return e
    return Rejected(str(e.source), "annotation", f"{e.kind}: {e.message}")
