"""ReasonKnee-Bench scoring: box forms, true 3D IoU, accuracy aggregation, prediction formats."""

from __future__ import annotations

import doctest
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kneeprep.errors import AnnotationError
from kneeprep.formats import box as box_mod
from kneeprep.formats.box import iou, list_form_to_voxels, voxels_to_list_form
from kneeprep.moaks.severity import make_severity, resolve_question
from kneeprep.stages import score as score_mod
from kneeprep.stages.score import (
    Prediction,
    TruthRecord,
    parse_box,
    parse_prediction,
    read_predictions,
    score,
)

VID = "9027422_00M_20041222_10312706_2"


@pytest.mark.parametrize("module", [score_mod, box_mod])
def test_doctests(module):
    r = doctest.testmod(module)
    assert r.attempted >= (3 if module is box_mod else 0) and r.failed == 0


# -- boxes -------------------------------------------------------------------------------------------------


def test_list_form_to_half_open_and_back():
    # list [start, end, x_min, x_max, y_min, y_max] inclusive -> [z0, y0, x0, z1, y1, x1] half-open:
    # z0 = 5, z1 = 7 + 1; y0 = 30, y1 = 39 + 1; x0 = 10, x1 = 20 + 1
    assert list_form_to_voxels([5, 7, 10, 20, 30, 39]) == (5, 30, 10, 8, 40, 21)
    assert voxels_to_list_form((5, 30, 10, 8, 40, 21)) == (5, 7, 10, 20, 30, 39)
    # a one-voxel box: start == end in the list form, z1 = z0 + 1 in the half-open form
    assert list_form_to_voxels([3, 3, 4, 4, 5, 5]) == (3, 5, 4, 4, 6, 5)


@given(
    st.lists(st.integers(0, 500), min_size=3, max_size=3),
    st.lists(st.integers(1, 100), min_size=3, max_size=3),
)
def test_box_forms_round_trip(lo, size):
    vox = (lo[0], lo[1], lo[2], lo[0] + size[0], lo[1] + size[1], lo[2] + size[2])
    assert list_form_to_voxels(voxels_to_list_form(vox)) == vox


@pytest.mark.parametrize(
    "bad", [[5, 4, 0, 1, 0, 1], [0, 1, 2], [0, 1, 0, 1, 0, "a"], [-1, 0, 0, 0, 0, 0], "0,1,0,1,0,1"]
)
def test_bad_list_boxes(bad):
    with pytest.raises(AnnotationError):
        list_form_to_voxels(bad)


def test_iou_disjoint_nested_overlapping_identical():
    a = (0, 0, 0, 10, 10, 10)  # 10*10*10 = 1000 voxels
    assert iou(a, (10, 0, 0, 20, 10, 10)) == 0.0  # touching faces share no voxel (half-open)
    assert iou(a, (20, 20, 20, 30, 30, 30)) == 0.0
    inner = (2, 3, 4, 6, 8, 9)  # 4 * 5 * 5 = 100 voxels inside a: IoU = 100 / 1000
    assert iou(a, inner) == pytest.approx(100 / 1000)
    assert iou(inner, a) == pytest.approx(0.1)
    # b = [5,15) x [0,10) x [2,8): 10*10*6 = 600 voxels; overlap with a = [5,10) x [0,10) x [2,8) = 5*10*6 = 300;
    # union = 1000 + 600 - 300 = 1300; IoU = 300/1300 = 3/13
    b = (5, 0, 2, 15, 10, 8)
    assert iou(a, b) == pytest.approx(3 / 13)
    # M3D would divide by the enclosing box [0,15)x[0,10)x[0,10) = 1500 voxels: 300/1500 = 0.2, not ours
    assert iou(a, b) != pytest.approx(0.2)
    assert iou(a, a) == 1.0


def test_parse_box_forms():
    assert parse_box([5, 7, 10, 20, 30, 39]) == (5, 30, 10, 8, 40, 21)
    assert parse_box({"voxels": [5, 30, 10, 8, 40, 21]}) == (5, 30, 10, 8, 40, 21)
    assert parse_box({"list": [5, 7, 10, 20, 30, 39]}) == (5, 30, 10, 8, 40, 21)
    with pytest.raises(AnnotationError, match="z0 < z1"):
        parse_box({"voxels": [5, 0, 0, 5, 1, 1]})


def test_parse_prediction_finds_the_box_in_every_form():
    ans = {"tibia lateral osteophyte": {"grade": 1}}
    assert parse_prediction(ans | {"bbox": [1, 2, 3, 4, 5, 6]}).box == (1, 5, 3, 3, 7, 5)
    assert parse_prediction({"answer": "text", "box": {"voxels": [1, 2, 3, 4, 5, 6]}}).box == (
        1,
        2,
        3,
        4,
        5,
        6,
    )
    text = 'I see it.\n```json\n{"BBox": [1, 2, 3, 4, 5, 6], "tibia lateral osteophyte": 1}\n```'
    p = parse_prediction(text)
    assert p.box == (1, 5, 3, 3, 7, 5) and p.answer == text
    bad = parse_prediction(ans | {"box": [1, 2]})
    assert bad.box is None and "6 integers" in bad.box_error
    assert parse_prediction("no json").box is None


# -- accuracy ----------------------------------------------------------------------------------------------

Q_BML = resolve_question("femur medial central BML")
Q_OST = resolve_question("tibia lateral osteophyte")
Q_EFF = resolve_question("effusion-synovitis")


def _truth():
    bml = make_severity(Q_BML, {"bml_size": 2, "bml_number": 1, "bml_percent": 0})
    return [
        TruthRecord(f"A_{Q_BML.id}", Q_BML.id, "bml", "femur medial central", bml, (0, 0, 0, 10, 10, 10)),
        TruthRecord(f"B_{Q_BML.id}", Q_BML.id, "bml", "femur medial central", bml, (0, 0, 0, 10, 10, 10)),
        TruthRecord(
            f"A_{Q_OST.id}", Q_OST.id, "osteophyte", "tibia lateral", make_severity(Q_OST, {"grade": 3}), None
        ),
        TruthRecord(
            f"B_{Q_OST.id}", Q_OST.id, "osteophyte", "tibia lateral", make_severity(Q_OST, {"grade": 0}), None
        ),
        TruthRecord(
            f"A_{Q_EFF.id}",
            Q_EFF.id,
            "effusion_synovitis",
            "",
            make_severity(Q_EFF, {"grade": 1}),
            (0, 0, 0, 4, 4, 4),
        ),
    ]


def _preds():
    return {
        # A-BML: 2 of 3 components right (number wrong), box = a half of the truth along z: IoU 500/1000
        f"A_{Q_BML.id}": Prediction(
            'Final diagnosis: {"MOAKS_scores": {"femur medial central BML": {"Size of BML (including cyst)": 2, '
            '"Number of BML within subregion": 3, "% of lesion that is BML (excluding cyst)": 0}}}',
            box=(0, 0, 0, 5, 10, 10),
        ),
        # B-BML: unparseable (grade out of range) -> 3 components wrong, counted unparseable; no box -> IoU 0
        f"B_{Q_BML.id}": Prediction({"femur medial central BML": {"Size of BML (including cyst)": 7}}),
        # A-OST: right (bare integer); a box although the truth has none -> counted, not scored
        f"A_{Q_OST.id}": Prediction({"tibia lateral osteophyte": 3}, box=(0, 0, 0, 1, 1, 1)),
        # B-OST: missing
        # A-EFF: right, box identical: IoU 1
        f"A_{Q_EFF.id}": Prediction(
            {"MOAKS_scores": {"effusion-synovitis": {"grade": 1}}}, box=(0, 0, 0, 4, 4, 4)
        ),
        "Z_1": Prediction({"patella medial BML": {}}),  # not in the truth
    }


def test_accuracy_aggregation_by_hand():
    r = score(_preds(), _truth())
    o = r.overall
    # components: BML 3 + 3, OST 1 + 1, EFF 1 = 9; right: A-BML 2, A-OST 1, A-EFF 1 = 4
    assert (o.components, o.correct_components) == (9, 4)
    assert o.component_accuracy == pytest.approx(4 / 9)
    # answers: 5; exactly right: A-OST, A-EFF = 2
    assert (o.answers, o.correct_answers) == (5, 2)
    assert (o.missing, o.unparseable) == (1, 1)
    bml = r.by_family["bml"]
    assert (bml.components, bml.correct_components, bml.answers, bml.correct_answers, bml.unparseable) == (
        6,
        2,
        2,
        0,
        1,
    )
    ost = r.by_question[Q_OST.id]
    assert (ost.components, ost.correct_components, ost.missing) == (2, 1, 1)
    assert r.by_family["effusion"].answer_accuracy == 1.0
    assert set(r.by_region) == {"femur medial central", "tibia lateral", "whole knee"}
    assert (r.truth, r.predictions, r.extra_predictions, r.boxes_without_truth) == (5, 5, 1, 1)
    assert r.unparseable_examples[0]["sample_id"] == f"B_{Q_BML.id}"
    assert "out of range" in r.unparseable_examples[0]["reason"]


def test_localization_by_hand():
    r = score(_preds(), _truth())
    loc = r.localization.to_json()
    # three truth boxes: A-BML IoU 0.5, B-BML no box (0), A-EFF 1.0 -> mean 1.5 / 3 = 0.5;
    # >= 0.25: A-BML, A-EFF = 2/3; >= 0.5: the same two (0.5 counts) = 2/3
    assert loc["boxes"] == 3 and loc["no_box"] == 1
    assert loc["mean_iou"] == pytest.approx(0.5)
    assert loc["iou_ge_0.25"] == pytest.approx(2 / 3) and loc["iou_ge_0.5"] == pytest.approx(2 / 3)
    by_region = r.localization_by_region["femur medial central"].to_json()
    assert by_region["mean_iou"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert r.localization_by_region["whole knee"].to_json()["mean_iou"] == 1.0


def test_report_json_and_table():
    r = score(_preds(), _truth())
    j = json.loads(json.dumps(r.to_json()))
    assert j["accuracy"]["overall"]["component_accuracy"] == pytest.approx(4 / 9)
    assert list(j["accuracy"]["by_question"]) == sorted(j["accuracy"]["by_question"], key=int)
    table = r.format_table()
    assert "1 missing, 1 unparseable" in table and "family bml" in table and " 44.4%" in table


def test_duplicate_truth_raises():
    t = _truth()
    with pytest.raises(AnnotationError, match="appears twice"):
        score({}, [t[0], t[0]])


def test_no_predictions_everything_missing():
    r = score({}, _truth())
    assert r.overall.missing == 5 and r.overall.correct_components == 0 and r.localization.no_box == 3


# -- prediction files --------------------------------------------------------------------------------------


def test_read_predictions_json_object(tmp_path):
    f = tmp_path / "preds.json"
    key = f"{VID}_{Q_OST.id}"
    f.write_text(
        json.dumps(
            {
                key: 'Final diagnosis: {"tibia lateral osteophyte": {"grade": 2}}',
                f"{VID}_1": {"answer": {}, "bbox": [0, 1, 0, 1, 0, 1]},
            }
        )
    )
    preds, errors = read_predictions(f)
    assert errors == [] and set(preds) == {key, f"{VID}_1"}
    assert preds[f"{VID}_1"].box == (0, 0, 0, 2, 2, 2)


def test_read_predictions_jsonl_reports_bad_lines(tmp_path):
    f = tmp_path / "preds.jsonl"
    f.write_text(
        json.dumps({"sample_id": "s1", "answer": "x", "box": {"voxels": [0, 0, 0, 1, 1, 1]}}) + "\n"
        "not json\n"
        + json.dumps({"answer": "no id"})
        + "\n"
        + json.dumps({"sample_id": "s1", "answer": "again"})
        + "\n"
    )
    preds, errors = read_predictions(f)
    assert list(preds) == ["s1"] and preds["s1"].box == (0, 0, 0, 1, 1, 1) and preds["s1"].answer == "x"
    assert [(s.rsplit(":", 1)[1], k) for s, k, _ in errors] == [
        ("2", "json"),
        ("3", "schema"),
        ("4", "duplicate"),
    ]


def _zero_shot(model: str, question: str, result) -> dict:
    """One record as the published zero-shot scripts (3DReasonKnee code/zero_shot/*.py) write it."""
    return {
        "question": question,
        f"{model}_result": result,
        f"{model}_total_tokens": 5000,
        f"{model}_completion_tokens": 900,
        f"{model}_prompt_tokens": 4100,
        f"{model}_reasoning_tokens": 0,
    }


def test_zero_shot_result_records_are_read_as_they_are(tmp_path):
    """Issue 22, point 5: the answer under `<model>_result` -- an object (o1, JSON mode), the scripts'
    `{"response": text}` when the text did not decode, `{"error": ...}` when the call failed."""
    ost = 'I see a large spur. ```json\n{"MOAKS_scores": {"tibia lateral osteophyte": {"grade": 3}}}\n```'
    f = tmp_path / "results_qwen25vl_zeroshot.json"
    f.write_text(
        json.dumps(
            {
                f"A_{Q_OST.id}": _zero_shot("qwen25vl", "In this DESS MRI ...", {"response": ost}),
                f"B_{Q_OST.id}": _zero_shot(
                    "qwen25vl", "...", {"MOAKS_scores": {"tibia lateral osteophyte": 0}}
                ),
                f"A_{Q_EFF.id}": _zero_shot("qwen25vl", "...", {"error": "CUDA out of memory"}),
                f"A_{Q_BML.id}": _zero_shot(
                    "O1", "...", {"femur medial central BML": {}, "bbox": [0, 9, 0, 9, 0, 9]}
                )
                | {"qwen25vl_result": {}},
            },
            indent=2,
        )
    )
    preds, errors = read_predictions(f)
    assert errors == [] and len(preds) == 4
    assert preds[f"A_{Q_OST.id}"].answer == ost and preds[f"A_{Q_OST.id}"].answer_error is None
    assert preds[f"B_{Q_OST.id}"].answer == {"MOAKS_scores": {"tibia lateral osteophyte": 0}}
    assert "CUDA out of memory" in preds[f"A_{Q_EFF.id}"].answer_error
    assert "several result keys" in preds[f"A_{Q_BML.id}"].answer_error
    r = score(preds, _truth())
    # OST A (3) and B (0) right from the unwrapped results; EFF: the call failed; BML A: two models; BML B: missing
    assert r.by_family["osteophyte"].correct_answers == 2 and r.by_family["osteophyte"].unparseable == 0
    assert (r.overall.unparseable, r.overall.missing, r.overall.correct_components) == (2, 1, 2)
    reasons = {e["sample_id"]: e["reason"] for e in r.unparseable_examples}
    assert "CUDA out of memory" in reasons[f"A_{Q_EFF.id}"] and "qwen25vl_result" in reasons[f"A_{Q_BML.id}"]
    # a box inside the result is found, as anywhere else
    assert parse_prediction(_zero_shot("o1", "?", {"tibia lateral osteophyte": 1, "bbox": [1, 2, 3, 4, 5, 6]})).box == (
        1, 5, 3, 3, 7, 5,
    )  # fmt: skip


# -- the CLI, end to end on real shards ----------------------------------------------------------------------


def _write_tiny_shards(out):
    import numpy as np

    from kneeprep.formats.box import Box
    from kneeprep.formats.quintuples import Quintuple
    from kneeprep.formats.shard_writer import write_shards
    from kneeprep.geometry import Geometry
    from kneeprep.recipe import Recipe

    geom = Geometry((4, 6, 8), (0.7, 0.36, 0.36), np.diag([0.7, 0.36, 0.36, 1.0]))
    box = Box(
        region="femur medial central",
        label_ids=(),
        voxel_count=None,
        centroid=None,
        empty=False,
        voxels=(0, 0, 0, 2, 6, 8),
        list_form=(0, 1, 0, 7, 0, 5),
        normalized=(0.0, 0.0, 0.0, 0.5, 1.0, 1.0),
        size_mm=(1.4, 2.16, 2.88),
        center_lps=(0.0, 0.0, 0.0),
    )

    def q(qid, question, severity, qbox, split="test"):
        return Quintuple(
            sample_id=f"{VID}_{qid}",
            volume_id=VID,
            patient_id="9027422",
            split=split,
            question_id=qid,
            question_type=question.finding,
            question_region=question.region,
            question="?",
            box=qbox,
            box_empty=qbox is None,
            box_reason=None if qbox else "no region",
            reasoning=("a",),
            severity=severity,
            answer_json="{}",
        )

    qs = [
        q(Q_BML.id, Q_BML, make_severity(Q_BML, {"bml_size": 1, "bml_number": 1, "bml_percent": 1}), box),
        q(Q_OST.id, Q_OST, make_severity(Q_OST, {"grade": 2}), None),
    ]
    image = np.zeros((4, 6, 8), np.uint8)
    write_shards(qs, lambda vid: (image, geom), out, Recipe())


def test_cli_scores_shards_end_to_end(tmp_path):
    from click.testing import CliRunner

    from kneeprep.cli import cli

    shards = tmp_path / "shards"
    _write_tiny_shards(shards)
    preds = tmp_path / "preds.json"
    preds.write_text(
        json.dumps(
            {
                # BML: all 3 right; list box [0, 0, 0, 7, 0, 5] = half-open (0,0,0,1,6,8): 48 voxels inside the
                # truth's 2*6*8 = 96 -> IoU 48/96 = 0.5
                f"{VID}_{Q_BML.id}": {
                    "answer": 'Final diagnosis: {"MOAKS_scores": {"femur medial central BML": {"Size of BML (including cyst)": 1, '
                    '"Number of BML within subregion": 1, "% of lesion that is BML (excluding cyst)": 1}}}',
                    "bbox": [0, 0, 0, 7, 0, 5],
                },
                f"{VID}_{Q_OST.id}": '```json\n{"tibia lateral osteophyte": {"grade": 1}}\n```',  # wrong grade
            }
        )
    )
    out = tmp_path / "report.json"
    res = CliRunner().invoke(cli, ["score", str(preds), str(shards), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    # components: 3 (BML, all right) + 1 (osteophyte, wrong) = 4, 3 right
    assert (
        rep["accuracy"]["overall"]["components"] == 4
        and rep["accuracy"]["overall"]["correct_components"] == 3
    )
    assert rep["localization"]["overall"]["mean_iou"] == pytest.approx(0.5)
    assert "family bml" in res.output and rep["split"] == "test"
    # the same answers as the published zero-shot scripts write them: read as they are, 4/4 right
    zero_shot = tmp_path / "results_o1_zeroshot.json"
    bml = {"Size of BML (including cyst)": 1, "Number of BML within subregion": 1}
    zero_shot.write_text(
        json.dumps(
            {
                f"{VID}_{Q_BML.id}": _zero_shot(
                    "o1",
                    "In this DESS MRI ...",
                    {
                        "MOAKS_scores": {
                            "femur medial central BML": bml | {"% of lesion that is BML (excluding cyst)": 1}
                        }
                    },
                ),
                f"{VID}_{Q_OST.id}": _zero_shot(
                    "o1",
                    "...",
                    {"response": 'Grade 2. {"MOAKS_scores": {"tibia lateral osteophyte": {"grade": 2}}}'},
                ),
            },
            indent=2,
        )
    )
    res = CliRunner().invoke(cli, ["score", str(zero_shot), str(shards), "--out", str(out)])
    assert res.exit_code == 0, res.output
    overall = json.loads(out.read_text())["accuracy"]["overall"]
    assert (overall["components"], overall["correct_components"], overall["unparseable"]) == (4, 4, 0)
    assert overall["answers"] == overall["correct_answers"] == 2
    # the train split has no quintuples: a usage error
    res = CliRunner().invoke(cli, ["score", str(preds), str(shards), "--split", "train"])
    assert res.exit_code == 2 and "no quintuples" in res.output
