"""The sample's annotations: question bank prompts, published-style answer JSON, reasoning, quintuples.

* :func:`question_bank` -- ``{"1": prompt, ..., "69": prompt}``; each prompt ends with the JSON answer format
  the published bank requires (``Answer in JSON format: {...}``).
* :func:`answer_json` -- a question's canonical grades (``{component: grade}``) in the published key style:
  wrapper per :attr:`Question.wrapper` (``MOAKS_scores``, ``MOAKS_grade`` or none), region keys as spaced
  words, component keys as published (``"Size of BML (including cyst)"``), and for ``bare_grade``
  questions either a bare integer or ``{"grade": n}`` (both occur in the published data).
* :func:`reasoning` -- short template sentences naming the region and what the image shows.
* :func:`quintuple_records` -- kneeprep JSONL records ``{sample_id, volume_id, question_id, question,
  reasoning, answer}`` for the asked subset of questions of one volume.
"""

from __future__ import annotations

import numpy as np

from kneeprep.moaks.anatomy import COMPONENTS, QUESTIONS, Question

_WHAT = {
    "bml": "the bone marrow lesion (BML) in the {r} subregion",
    "cartilage": "the cartilage lesion in the {r} subregion",
    "osteophyte": "the {r} osteophyte",
    "hoffa_synovitis": "Hoffa-synovitis (signal in the infrapatellar fat pad)",
    "effusion_synovitis": "effusion-synovitis of the knee joint",
    "meniscal_extrusion": "meniscal extrusion at the {r} location",
    "meniscal_morphology": "the morphology of the {r} of the meniscus",
    "meniscal_cyst": "a meniscal cyst of the {r}",
    "meniscal_hypertrophy": "meniscal hypertrophy of the {r}",
    "meniscal_root_tear": "a meniscal root tear of the {r}",
    "ligament": "the integrity of the {r}",
    "periarticular": "{r}",
}

_RANGE = {
    "morphology": "0-8",
    "presence": "0 or 1",
    "complete_tear": "0 or 1",
    "partial_tear": "0 or 1",
    "signal_abnormality": "0 or 1",
}


def _region_text(q: Question) -> str:
    return {"acl": "anterior cruciate ligament (ACL)", "pcl": "posterior cruciate ligament (PCL)"}.get(
        q.region, q.region
    )


def _format_template(q: Question) -> str:
    inner = ", ".join(f'"{COMPONENTS[c][0]}": <{_RANGE.get(c, "0-3")}>' for c in q.components)
    if q.bare_grade:
        body = f'"{q.answer_key}": <0-3>'
    else:
        body = f'"{q.answer_key}": {{{inner}}}'
    return f'{{"{q.wrapper}": {{{body}}}}}' if q.wrapper else f"{{{body}}}"


def prompt(q: Question) -> str:
    """The prompt of question ``q``: the task, the MOAKS scale, and the required JSON answer format."""
    what = _WHAT[q.finding].format(r=_region_text(q))
    return (
        f"You are given a sagittal 3D DESS MRI volume of a knee. Assess {what} using the MOAKS scoring system. "
        f"Explain your reasoning step by step, then give the final diagnosis. "
        f"Answer in JSON format: {_format_template(q)}"
    )


def question_bank() -> dict[str, str]:
    """``{"1": prompt, ..., "69": prompt}`` in the published question-bank format."""
    return {qid: prompt(q) for qid, q in QUESTIONS.items()}


def answer_json(q: Question, grades: dict[str, int], *, bare: bool = True) -> dict:
    """The published-style answer object of ``q`` for canonical ``grades`` (``{component: grade}``).

    >>> q = next(q for q in QUESTIONS.values() if q.finding == "bml" and q.region == "femur medial central")
    >>> answer_json(q, {"bml_size": 1, "bml_number": 2, "bml_percent": 3}) == {
    ...     q.wrapper: {q.answer_key: {"Size of BML (including cyst)": 1, "Number of BML within subregion": 2,
    ...                                "% of lesion that is BML (excluding cyst)": 3}}}
    True
    >>> q = next(q for q in QUESTIONS.values() if q.bare_grade)
    >>> answer_json(q, {"grade": 2}, bare=True)[q.wrapper], answer_json(q, {"grade": 2}, bare=False)[q.wrapper]
    ({'medial meniscus anterior extrusion': 2}, {'medial meniscus anterior extrusion': {'grade': 2}})
    """
    if q.bare_grade and bare:
        value: object = int(grades["grade"])
    else:
        value = {COMPONENTS[c][0]: int(grades[c]) for c in q.components}
    body = {q.answer_key: value}
    return {q.wrapper: body} if q.wrapper else body


def reasoning(q: Question, grades: dict[str, int], measures: dict | None = None) -> list[str]:
    """Short template reasoning steps for ``q`` given its grades (and optional measured quantities)."""
    region = _region_text(q)
    measures = measures or {}
    positive = any(grades.values())
    f = q.finding
    if f == "bml":
        steps = [f"Locate the {region} subregion on the sagittal slices."]
        if positive:
            steps.append(
                f"Hyperintense marrow signal is seen in {grades['bml_number']} separate focus/foci occupying about "
                f"{100 * measures.get('fraction', 0):.0f}% of the subregion."
            )
            cyst = (
                "with no cystic component"
                if grades["bml_percent"] == 3
                else "with a well-defined cystic component"
            )
            steps.append(f"The lesion is mostly oedema-like {cyst}.")
        else:
            steps.append(f"The marrow signal of the {region} subregion is homogeneous; no BML is seen.")
    elif f == "cartilage":
        steps = [f"Follow the cartilage surface of the {region} subregion across the slices."]
        if positive:
            steps.append(
                f"A focal cartilage defect covers about {100 * measures.get('fraction', 0):.0f}% of the subregion."
            )
            steps.append(
                "Part of the defect reaches the subchondral bone (full-thickness loss)."
                if grades["cartilage_depth"]
                else "The defect is partial-thickness only."
            )
        else:
            steps.append("The cartilage has uniform thickness and signal; no defect is seen.")
    elif f == "osteophyte":
        steps = [f"Inspect the bone margin at the {region} location."]
        steps.append(
            "A marginal bony outgrowth (osteophyte) is present."
            if positive
            else "The margin is smooth without osteophytes."
        )
    elif f in ("hoffa_synovitis", "effusion_synovitis"):
        place = (
            "infrapatellar (Hoffa) fat pad"
            if f == "hoffa_synovitis"
            else "suprapatellar recess and joint space"
        )
        steps = [f"Review the {place}."]
        steps.append(
            f"Fluid-equivalent signal is increased, consistent with grade {grades['grade']}."
            if positive
            else "Signal is within normal limits."
        )
    elif f == "meniscal_extrusion":
        steps = [f"Compare the meniscal edge with the tibial plateau margin at the {region} location."]
        steps.append(
            "The meniscus extends beyond the plateau margin."
            if positive
            else "The meniscus lies within the plateau margin."
        )
    elif f == "meniscal_morphology":
        steps = [f"Examine the {region} of the meniscus on consecutive slices."]
        desc = {
            0: "It is uniformly dark and normally shaped.",
            1: "There is intrasubstance signal not reaching the surface.",
            3: "A horizontal linear high signal reaches the articular surface (tear).",
        }
        steps.append(desc.get(grades["morphology"], "Its shape is abnormal."))
    else:
        steps = [f"Look for {_WHAT[f].format(r=region)}."]
        steps.append("An abnormality is present." if positive else "No abnormality is seen.")
    return steps


def quintuple_records(
    volume_id: str,
    grades: dict[str, dict[str, int]],
    measures: dict[str, dict],
    bank: dict[str, str],
    rng: np.random.Generator,
    *,
    n_min: int = 55,
    n_max: int = 65,
) -> list[dict]:
    """JSONL records of one volume: every question with a nonzero grade plus random others, ``n_min`` to
    ``n_max`` questions in all, in question order. ``bare_grade`` questions get a bare int or ``{"grade": n}``
    at random, as in the published data."""
    positive = [qid for qid, g in grades.items() if any(g.values())]
    rest = [qid for qid in QUESTIONS if qid not in positive]
    n = max(len(positive), int(rng.integers(n_min, n_max + 1)))
    extra = (
        rng.choice(rest, size=min(len(rest), n - len(positive)), replace=False).tolist()
        if n > len(positive)
        else []
    )
    asked = sorted(set(positive) | set(extra), key=int)
    records = []
    for qid in asked:
        q = QUESTIONS[qid]
        bare = bool(rng.random() < 0.5)
        records.append(
            {
                "sample_id": f"{volume_id}_{qid}",
                "volume_id": volume_id,
                "question_id": qid,
                "question": bank[qid],
                "reasoning": reasoning(q, grades[qid], measures.get(qid)),
                "answer": answer_json(q, grades[qid], bare=bare),
            }
        )
    return records
