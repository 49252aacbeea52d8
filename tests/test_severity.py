"""Answer-JSON normalization: every quirk of the published answers, errors, and the published round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kneeprep.errors import AnnotationError
from kneeprep.moaks.anatomy import COMPONENTS, QUESTIONS, find_question
from kneeprep.moaks.severity import (
    PUBLISHED_KEYS,
    Grade,
    allowed_components,
    make_severity,
    parse_answer,
    severity_from_json,
    severity_to_json,
    to_published,
)

BML_KEYS = {
    "Size of BML (including cyst)": 2,
    "Number of BML within subregion": 1,
    "% of lesion that is BML (excluding cyst)": 3,
}
BML_EXPECTED = (
    Grade("bml", "femur medial central", "bml_size", 2),
    Grade("bml", "femur medial central", "bml_number", 1),
    Grade("bml", "femur medial central", "bml_percent", 3),
)


@pytest.mark.parametrize("wrapper", ["MOAKS_scores", "MOAKS_grade", "moaks scores", None])
def test_every_wrapper_gives_the_same_grades(wrapper):
    body = {"femur medial central BML": BML_KEYS}
    obj = {wrapper: body} if wrapper else body
    assert parse_answer(obj) == BML_EXPECTED


@pytest.mark.parametrize(
    "key",
    [
        "femur medial central BML",
        "femur_medial_central_bml",
        "FEMUR MEDIAL CENTRAL BML",
        "Femur-Medial-Central BML",
    ],
)
def test_answer_keys_spaced_snake_or_any_case(key):
    assert parse_answer({"MOAKS_scores": {key: BML_KEYS}}) == BML_EXPECTED


def test_component_keys_in_published_or_canonical_spelling():
    comps = {
        "size_of_bml_(including_cyst)": 2,
        "BML_NUMBER": 1,
        "% of lesion that is BML (excluding cyst)": 3,
    }
    assert parse_answer({"femur medial central BML": comps}) == BML_EXPECTED


@pytest.mark.parametrize("value", [2, {"grade": 2}, {"Grade": 2}, "2"])
def test_bare_grade_or_grade_object(value):
    # The published bank writes "medial meniscus medial extrusion" (anatomy: "medial medial meniscal extrusion").
    sev = parse_answer({"MOAKS_grade": {"medial meniscus medial extrusion": value}})
    assert sev == (Grade("meniscal_extrusion", "medial medial", "grade", 2),)


def test_bare_integer_for_an_osteophyte_too():
    assert parse_answer({"tibia lateral osteophyte": 1}) == (
        Grade("osteophyte", "tibia lateral", "grade", 1),
    )


@pytest.mark.parametrize(
    "published_key, finding, region",
    [
        ("lateral meniscus body morphology", "meniscal_morphology", "lateral body"),
        ("pes_anserine_bursitis_presence", "periarticular", "pes anserine bursitis"),
        ("Patellar_Tendon", "ligament", "patellar tendon"),
        ("Hoffa-Synovitis", "hoffa_synovitis", ""),
    ],
)
def test_published_bank_spellings_resolve(published_key, finding, region):
    value = (
        {"presence": 1}
        if finding == "periarticular"
        else {"Signal Abnormality": 1}
        if finding == "ligament"
        else 1
    )
    (g,) = parse_answer({published_key: value})
    assert (g.finding, g.region, g.grade) == (finding, region, 1)


def test_acl_published_fields_are_known_components():
    sev = parse_answer(
        {
            "ACL": {
                "Complete Tear": 0,
                "Associated with BML/cyst at site of insertion or origin": 1,
                "ACL Repair": 0,
            }
        }
    )
    assert [(g.component, g.grade) for g in sev] == [
        ("complete_tear", 0),
        ("insertion_bml_cyst", 1),
        ("acl_repair", 0),
    ]


FINAL = '{"MOAKS_scores": {"femur medial central BML": {"Size of BML (including cyst)": 2, "Number of BML within subregion": 1, "% of lesion that is BML (excluding cyst)": 3}}}'


@pytest.mark.parametrize(
    "text",
    [
        FINAL,
        f"The marrow is bright in the central femur.\nFinal diagnosis: {FINAL}",
        f"Reasoning here.\n\nFINAL DIAGNOSIS {FINAL}\nThanks!",
        f"Let me look.\n```json\n{FINAL}\n```\nThat is my answer.",
        f"Let me look.\n```\n{FINAL}\n```",
        f"Final diagnosis:\n```json\n{FINAL}\n```",
        f'Earlier I wrote {{"note": 1}} but my answer is {FINAL} -- done.',
    ],
)
def test_answer_text_with_prose_fences_and_final_diagnosis(text):
    assert parse_answer(text, find_question("femur medial central BML").id) == BML_EXPECTED


def test_question_id_must_match_the_answer_key():
    other = find_question("tibia medial central BML").id
    with pytest.raises(AnnotationError, match=f"no key for question {other}"):
        parse_answer({"femur medial central BML": BML_KEYS}, other)


def test_extra_top_level_keys_like_a_box_are_ignored():
    sev = parse_answer({"bbox": [1, 2, 3, 4, 5, 6], "medial_meniscal_root_tear": {"presence": 1}})
    assert sev == (Grade("meniscal_root_tear", "medial meniscus", "presence", 1),)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ({"tibia lateral osteophyte": {"grade": 4}}, "out of range 0..3"),
        ({"medial meniscus body morphology": {"morphology": 9}}, "out of range 0..8"),
        ({"popliteal_cyst_presence": {"presence": 2}}, "out of range 0..1"),
        ({"tibia lateral osteophyte": {"grade": -1}}, "out of range"),
        ({"tibia lateral osteophyte": {"grade": 1.5}}, "must be an integer"),
        ({"tibia lateral osteophyte": {"grade": True}}, "must be an integer"),
        ({"tibia lateral osteophyte": {"size": 1}}, "unknown component 'size'"),
        ({"tibia lateral osteophyte": {"presence": 1}}, "component 'presence' is not graded here"),
        ({"tibia lateral osteophyte": {}}, "no grades"),
        ({"femur medial central BML": 2}, "expected an object of 3 component grades"),
        ({"knee BML": {"grade": 1}}, "names no known question"),
        ({"MOAKS_scores": [1, 2]}, "wrapper 'MOAKS_scores' must hold an object"),
        ([1, 2], "must be a JSON object"),
        ("no json here at all", "no JSON object"),
        ("Final diagnosis: {not json}", "no JSON object"),
        ({"tibia lateral osteophyte": 1, "tibia medial osteophyte": 2}, "several questions"),
    ],
)
def test_malformed_answers_raise_with_the_reason(answer, reason):
    with pytest.raises(
        AnnotationError, match=reason.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        parse_answer(answer)


def test_to_published_uses_wrapper_bare_grade_and_published_spellings():
    q45 = QUESTIONS["45"]  # MOAKS_grade wrapper, bare grade
    sev = make_severity(q45, {"grade": 3})
    assert to_published(sev, q45) == {"MOAKS_grade": {PUBLISHED_KEYS["45"]: 3}}
    assert PUBLISHED_KEYS["45"] == f"{q45.region.split()[0]} meniscus {q45.region.split()[1]} extrusion"
    q33 = QUESTIONS["33"]  # no wrapper
    assert to_published(make_severity(q33, {"grade": 1}), q33) == {q33.answer_key: {"grade": 1}}
    q1 = QUESTIONS["1"]
    assert to_published(make_severity(q1, {"bml_size": 1, "bml_percent": 0}), "1") == {
        "MOAKS_scores": {
            "patella medial BML": {
                "Size of BML (including cyst)": 1,
                "% of lesion that is BML (excluding cyst)": 0,
            }
        }
    }


def test_to_published_refuses_grades_of_another_question():
    sev = make_severity("1", {"bml_size": 1})
    with pytest.raises(AnnotationError, match="question 2"):
        to_published(sev, "2")


@st.composite
def severities(draw):
    q = draw(st.sampled_from(list(QUESTIONS.values())))
    comps = draw(st.lists(st.sampled_from(allowed_components(q)), min_size=1, max_size=5, unique=True))
    grades = {c: draw(st.integers(0, COMPONENTS[c][1])) for c in comps}
    return q, make_severity(q, grades)


@settings(max_examples=300, deadline=None)
@given(severities())
def test_published_round_trip(qs):
    q, sev = qs
    published = to_published(sev, q)
    assert parse_answer(published, q.id) == sev
    assert parse_answer(published) == sev
    assert severity_from_json(severity_to_json(sev)) == sev


def test_severity_from_json_checks_vocabulary():
    with pytest.raises(AnnotationError, match="unknown finding 'tumour'"):
        severity_from_json([{"finding": "tumour", "region": "", "component": "grade", "grade": 1}])
    with pytest.raises(AnnotationError, match="out of range 0..3"):
        severity_from_json([{"finding": "osteophyte", "region": "x", "component": "grade", "grade": 7}])
