"""Annotation readers: question bank, published training items, kneeprep JSONL, and a whole directory.

Fixture files are named for what they hold (``good``, ``bad_json_line``, ...) and written by small builders."""

from __future__ import annotations

import doctest
import json

import pytest

from kneeprep.errors import AnnotationError
from kneeprep.formats import training_items
from kneeprep.formats.annotations import (
    AnnotationRecord,
    read_annotations,
    read_question_bank,
    read_quintuples_jsonl,
    read_training_items,
    split_reasoning,
    volume_id_from_image_path,
    write_quintuples_jsonl,
)
from kneeprep.formats.splits import SPLIT_COLUMNS, write_split_csv
from kneeprep.moaks.severity import Grade
from kneeprep.moaks.severity import resolve_question as find_question

VID = "9027422_00M_20041222_10312706_2"
IMAGE = "../data/images/9027422/00M/20041222_10312706_2.nii.gz"
Q_BML = find_question("femur medial central BML").id
Q_EXT = find_question("medial meniscus medial extrusion").id  # MOAKS_grade wrapper, bare grade
Q_OST = find_question("femur lateral anterior osteophyte").id
PROMPT_BML = (
    "In this DESS MRI, can you diagnose bone-marrow lesions (BMLs) in the femur medial central subregion?"
)
PROMPT_EXT = "In this DESS MRI, measure medial meniscus medial extrusions."
PROMPT_OST = "In this DESS MRI, identify and grade the osteophyte at the femur lateral anterior location."
BANK = {Q_BML: PROMPT_BML, Q_EXT: PROMPT_EXT, Q_OST: PROMPT_OST}


def test_doctests():
    r = doctest.testmod(training_items)  # split_reasoning, volume_id_from_image_path
    assert r.attempted >= 3 and r.failed == 0


@pytest.mark.parametrize(
    "text, steps",
    [
        (
            "1. Look at the femur.\n2) Bright marrow\n   is seen.\nStep 3: Grade it.",
            ("Look at the femur.", "Bright marrow is seen.", "Grade it."),
        ),
        ("First, orient.\n1. Slices 40-60.\n2. Fluid.", ("First, orient.", "Slices 40-60.", "Fluid.")),
        (
            "The extrusion is 3.5 mm. It is moderate! Is it? Yes.",
            ("The extrusion is 3.5 mm.", "It is moderate!", "Is it?", "Yes."),
        ),
        ("e.g. this stays whole. Then a new one.", ("e.g. this stays whole.", "Then a new one.")),
        ("   \n ", ()),
    ],
)
def test_split_reasoning(text, steps):
    assert split_reasoning(text) == steps


def test_volume_id_from_published_and_flat_paths():
    assert volume_id_from_image_path(IMAGE) == VID
    assert volume_id_from_image_path(f"/x/{VID}.nii") == VID
    with pytest.raises(AnnotationError, match="not .*<patient>"):
        volume_id_from_image_path("../data/images/20041222_10312706.nii.gz")


def test_question_bank_reports_unknown_ids_without_failing(tmp_path):
    f = tmp_path / "questions.json"
    f.write_text('{\n  "1": "prompt one",\n  "70": "a new question",\n  "2": ""\n}\n')
    bank, errors = read_question_bank(f)
    assert bank == {"1": "prompt one", "70": "a new question"}
    assert [(e.source, e.kind) for e in errors] == [(f"{f}:3", "unknown_question"), (f"{f}:4", "schema")]


def test_question_bank_not_an_object_raises(tmp_path):
    f = tmp_path / "questions.json"
    f.write_text("[1, 2]")
    with pytest.raises(AnnotationError, match="expected an object"):
        read_question_bank(f)


# -- published training items, one item per quirk ---------------------------------------------------------

BML_JSON = {
    "MOAKS_scores": {
        "femur medial central BML": {
            "Size of BML (including cyst)": 1,
            "Number of BML within subregion": 2,
            "% of lesion that is BML (excluding cyst)": 0,
        }
    }
}


def _items():
    return [
        {  # MOAKS_scores wrapper, Final diagnosis suffix, numbered reasoning
            "image": IMAGE,
            "prompt": PROMPT_BML,
            "answer": f"1. Inspect the medial condyle.\n2. Two small lesions.\nFinal diagnosis: {json.dumps(BML_JSON)}",
        },
        {  # MOAKS_grade wrapper, bare grade, whitespace-different prompt, sentence reasoning
            "image": IMAGE,
            "prompt": "In this  DESS MRI,\nmeasure medial meniscus medial extrusions. ",
            "answer": 'The meniscus sits 3 mm out. That is grade 1. Final diagnosis: {"MOAKS_grade": {"medial meniscus medial extrusion": 1}}',
        },
        {  # no wrapper, snake_case key in any case, fenced block, final_diagnosis agrees
            "image": IMAGE,
            "prompt": PROMPT_OST,
            "answer": 'A large spur.\n```json\n{"Femur_Lateral_Anterior_Osteophyte": {"grade": 3}}\n```',
            "final_diagnosis": {"femur lateral anterior osteophyte": {"grade": 3}},
        },
        {  # prompt from another bank variant: the question comes from the answer key
            "image": "../data/images/9000001/12M/20050101_11111111_1.nii.gz",
            "prompt": "Guided prompt not in this bank.",
            "answer": 'Fine. Final diagnosis: {"MOAKS_scores": {"femur medial central BML": {"Size of BML (including cyst)": 0}}}',
        },
        {
            "image": IMAGE,
            "prompt": PROMPT_OST,
            "answer": 'Final diagnosis: {"femur lateral anterior osteophyte": {"grade": 3',
        },
        {
            "image": IMAGE,
            "prompt": PROMPT_OST,
            "answer": 'Final diagnosis: {"femur lateral anterior osteophyte": {"grade": 5}}',
        },
        {
            "image": "scan.nii.gz",
            "prompt": PROMPT_OST,
            "answer": 'Final diagnosis: {"femur lateral anterior osteophyte": 1}',
        },
        {"image": IMAGE, "prompt": PROMPT_OST},
        {"image": IMAGE, "prompt": "???", "answer": "Final diagnosis: {}"},
    ]


def _write_items(path, items):
    # one item per line, so item i starts on line i + 2 (line 1 is "[")
    path.write_text("[\n" + ",\n".join(json.dumps(it) for it in items) + "\n]\n")


def test_training_items_parse_every_quirk(tmp_path):
    f = tmp_path / "train.json"
    _write_items(f, _items())
    records, errors = read_training_items(f, BANK)
    assert [r.sample_id for r in records] == [
        f"{VID}_{Q_BML}",
        f"{VID}_{Q_EXT}",
        f"{VID}_{Q_OST}",
        f"9000001_12M_20050101_11111111_1_{Q_BML}",
    ]
    bml, ext, ost, guided = records
    assert bml.severity == (
        Grade("bml", "femur medial central", "bml_size", 1),
        Grade("bml", "femur medial central", "bml_number", 2),
        Grade("bml", "femur medial central", "bml_percent", 0),
    )
    assert bml.reasoning == ("Inspect the medial condyle.", "Two small lesions.")
    # the original answer object, compact: no space after separators
    assert bml.answer_json == json.dumps(BML_JSON, separators=(",", ":")) and ", " not in bml.answer_json
    assert ext.severity == (Grade("meniscal_extrusion", "medial medial", "grade", 1),)
    assert ext.reasoning == ("The meniscus sits 3 mm out.", "That is grade 1.")
    assert ost.severity == (Grade("osteophyte", "femur lateral anterior", "grade", 3),) and ost.reasoning == (
        "A large spur.",
    )
    assert guided.question_id == Q_BML and guided.question == "Guided prompt not in this bank."
    # The 5 bad items: each reported against its own line (item i on line i + 2), the rest still read.
    assert [(e.source, e.kind) for e in errors] == [
        (f"{f}:6", "answer"),  # unclosed JSON
        (f"{f}:7", "answer"),  # grade 5 > 3
        (f"{f}:8", "volume"),
        (f"{f}:9", "schema"),  # no answer
        (f"{f}:10", "question"),
    ]
    assert "out of range 0..3" in errors[1].message


def test_training_items_conflicting_final_diagnosis_is_an_error(tmp_path):
    f = tmp_path / "infer.json"
    item = dict(_items()[2], final_diagnosis={"femur lateral anterior osteophyte": {"grade": 1}})
    _write_items(f, [item])
    records, errors = read_training_items(f, BANK)
    assert records == [] and errors[0].kind == "answer" and "differ" in errors[0].message


def test_training_items_broken_list_keeps_items_before_the_break(tmp_path):
    f = tmp_path / "train.json"
    f.write_text("[\n" + json.dumps(_items()[0]) + ',\n{"image": oops}\n]')
    records, errors = read_training_items(f, BANK)
    assert len(records) == 1 and errors[0].kind == "json" and f"{f}:3" in errors[0].message


# -- kneeprep JSONL ----------------------------------------------------------------------------------------


def _line(qid=Q_OST, answer=None, **over):
    d = {
        "sample_id": f"{VID}_{qid}",
        "volume_id": VID,
        "question_id": qid,
        "question": BANK.get(qid, "q"),
        "reasoning": ["Step one.", "Step two."],
        "answer": answer if answer is not None else {"femur lateral anterior osteophyte": {"grade": 2}},
    }
    return json.dumps(d | over)


def test_jsonl_bad_records_are_reported_one_by_one(tmp_path):
    f = tmp_path / "quintuples.jsonl"
    lines = [
        _line(),  # 1 good
        '{"sample_id": "x", ',  # 2 not JSON
        "",  # 3 blank: skipped
        _line(answer={"femur lateral anterior osteophyte": {"grade": 9}}),  # 4 out of range
        _line(sample_id="wrong"),  # 5
        _line(qid="99"),  # 6
        _line(reasoning="not a list"),  # 7
        _line(volume_id="9027422_00M", sample_id=f"9027422_00M_{Q_OST}"),  # 8
        _line(
            qid=Q_EXT, answer='prose then {"MOAKS_grade": {"medial meniscus medial extrusion": {"grade": 2}}}'
        ),  # 9 good
    ]
    f.write_text("\n".join(lines) + "\n")
    records, errors = read_quintuples_jsonl(f)
    assert [r.source for r in records] == [f"{f}:1", f"{f}:9"]
    assert records[1].severity == (Grade("meniscal_extrusion", "medial medial", "grade", 2),)
    assert records[1].answer_json == '{"MOAKS_grade":{"medial meniscus medial extrusion":{"grade":2}}}'
    assert [(e.source.rsplit(":", 1)[1], e.kind) for e in errors] == [
        ("2", "json"),
        ("4", "answer"),
        ("5", "schema"),
        ("6", "question"),
        ("7", "schema"),
        ("8", "volume"),
    ]


def test_jsonl_write_read_round_trip(tmp_path):
    f = tmp_path / "quintuples.jsonl"
    f.write_text(_line() + "\n")
    records, _ = read_quintuples_jsonl(f)
    out = tmp_path / "again.jsonl"
    write_quintuples_jsonl(out, records)
    again, errors = read_quintuples_jsonl(out)
    assert errors == [] and again == records and isinstance(again[0], AnnotationRecord)


# -- a whole directory -------------------------------------------------------------------------------------


def test_read_annotations_directory(tmp_path):
    row = dict(
        zip(
            SPLIT_COLUMNS,
            ("9027422", "00M", "20041222", "10312706", "2", "raw/x", IMAGE, "masks/knee_003.nii.gz"),
            strict=True,
        )
    )
    write_split_csv(tmp_path / "split_files" / "train_split.csv", [row])
    (tmp_path / "questions.json").write_text(json.dumps(BANK | {"77": "unknown"}))
    (tmp_path / "quintuples.jsonl").write_text(_line() + "\n" + "{broken\n")
    _write_items(tmp_path / "train_items.json", _items()[:2])
    (tmp_path / "notes.json").write_text('{"not": "items"}')
    s = read_annotations(tmp_path)
    assert [r.volume_id for r in s.splits] == [VID]
    assert set(s.questions) == set(BANK) | {"77"}
    # JSONL first (Q_OST), then the training items (Q_BML, Q_EXT); no duplicates between them.
    assert [r.question_id for r in s.records] == [Q_OST, Q_BML, Q_EXT]
    kinds = sorted(e.kind for e in s.errors)
    assert kinds == ["json", "unknown_question"]
    # a JSON object that is not a list of training items is listed as ignored, not an error
    assert s.ignored == [str(tmp_path / "notes.json")]


def test_read_annotations_duplicate_sample_keeps_the_first(tmp_path):
    row = dict(
        zip(
            SPLIT_COLUMNS,
            ("9027422", "00M", "20041222", "10312706", "2", "raw/x", IMAGE, "m.nii.gz"),
            strict=True,
        )
    )
    write_split_csv(tmp_path / "split_files" / "test_split.csv", [row])
    (tmp_path / "quintuples.jsonl").write_text(_line() + "\n")
    _write_items(tmp_path / "items.json", [_items()[2]])  # same sample: VID + Q_OST
    s = read_annotations(tmp_path)
    assert len(s.records) == 1 and s.records[0].source.endswith("quintuples.jsonl:1")
    assert [e.kind for e in s.errors] == ["duplicate"] and s.errors[0].source.endswith("items.json:2")
