"""The OAI-like sample generator: DICOM writer, phantom, masks, annotations, CLI."""

from __future__ import annotations

import doctest

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from kneeprep.errors import DicomError
from kneeprep.geometry import Geometry


def _read_sitk(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("module", ["dicom_writer", "findings", "answers"])
def test_doctests(module):
    import importlib

    result = doctest.testmod(importlib.import_module(f"kneeprep.synth.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_write_series_round_trips_through_pydicom_and_simpleitk(synth_series):
    s = synth_series(
        tags={"PatientID": "9000001", "SeriesDescription": "SAG_3D_DESS_RIGHT"}, rescale=(2.0, -5.0)
    )
    assert [p.name for p in s.files] == [f"{k:03d}" for k in range(1, 9)]
    uids = set()
    for k, path in enumerate(s.files):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (32, 32, 16, 12, 11)
        assert ds.InstanceNumber == k + 1 and ds.PatientID == "9000001"
        assert np.array_equal(ds.pixel_array, s.array[k])
        expected = s.geometry.index_to_world([k, 0, 0])
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-4)
        assert float(ds.RescaleSlope) == 2.0 and float(ds.RescaleIntercept) == -5.0
        uids.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID))
    assert len(uids) == 1
    image = _read_sitk(s.folder)
    assert np.allclose(Geometry.from_sitk(image).affine_lps, s.geometry.affine_lps, atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(image), s.array * 2 - 5)


def test_write_series_tags_override_and_delete_per_slice(synth_series):
    s = synth_series(
        tags={"Manufacturer": "SIEMENS"}, slice_tags=[None] * 7 + [{"ImagePositionPatient": None}]
    )
    assert pydicom.dcmread(s.files[0]).Manufacturer == "SIEMENS"
    assert "ImagePositionPatient" not in pydicom.dcmread(s.files[7])


def test_write_series_is_deterministic(synth_series, tmp_path):
    a = synth_series("a")
    b = synth_series("b")
    assert [p.read_bytes() for p in a.files] == [p.read_bytes() for p in b.files]


def test_write_series_rejects_values_that_do_not_fit(synth_series, tmp_path):
    from kneeprep.synth import write_series

    s = synth_series("ok")
    with pytest.raises(DicomError, match="BitsStored 12"):
        write_series(s.array + 4000, s.geometry, tmp_path / "bad")
    with pytest.raises(DicomError, match="differs from geometry"):
        write_series(s.array[:4], s.geometry, tmp_path / "bad")


# ------------------------------------------------------------------------------------------------------------
# The generated sample (small size, generated once per session by the `small_sample` fixture)

import csv  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402

from kneeprep.formats.splits import SPLIT_COLUMNS, read_split_csvs  # noqa: E402
from kneeprep.moaks.anatomy import COMPONENTS, QUESTIONS, SAMPLE_LABELS  # noqa: E402
from kneeprep.synth import PHI_MARKERS, generate  # noqa: E402

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _truth(root):
    return json.loads((root / "truth.json").read_text())["volumes"]


def _world_lps(nifti_affine, ijk):
    return (np.asarray(ijk, dtype=float) @ nifti_affine[:3, :3].T + nifti_affine[:3, 3]) * [-1, -1, 1]


def test_raw_tree_and_contents_csv(small_sample):
    release = small_sample / "raw" / "00m" / "0.C.2"
    with (release / "contents.0C2.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == [
        "Folder",
        "ParticipantID",
        "StudyDate",
        "Barcode",
        "StudyDescription",
        "SeriesDescription",
    ]
    descriptions = {r["SeriesDescription"] for r in rows}
    assert {"SAG_3D_DESS_RIGHT", "SAG_3D_DESS_LEFT", "COR_MPR_RIGHT", "LOCALIZER"} <= descriptions
    for r in rows:
        folder = small_sample / "raw" / "00m" / r["Folder"]
        pid, date, series = r["Folder"].split("/")[1:]
        assert len(pid) == 7 and len(date) == 8 and len(series) == 8 and pid == r["ParticipantID"]
        names = sorted(p.name for p in folder.iterdir())
        assert names[0] == "001" and names == [f"{k:03d}" for k in range(1, len(names) + 1)]
        side = r["StudyDescription"].rsplit("^", 1)[1]
        assert r["StudyDescription"] == f"OAI^MR^ENROLLMENT^{side}"
        assert r["SeriesDescription"] == "LOCALIZER" or r["SeriesDescription"].endswith(side)
        if r["SeriesDescription"] == "LOCALIZER":
            assert len(names) == 3


def test_every_file_is_mr_image_storage_with_identifying_and_technical_tags(small_sample):
    files = [p for p in (small_sample / "raw").rglob("*") if p.is_file() and p.name != "contents.0C2.csv"]
    assert len(files) > 300
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == MRImageStorage and ds.Modality == "MR"
        assert ds.PatientID == path.parts[-4]
        for keyword, marker in PHI_MARKERS.items():
            assert marker in str(ds.data_element(keyword).value), (path, keyword)
        assert ds.Manufacturer == "SIEMENS" and float(ds.MagneticFieldStrength) == 3
        assert ds.Laterality == ("R" if ds.StudyDescription.endswith("RIGHT") else "L")
        if ds.SeriesDescription.startswith("SAG_3D_DESS"):
            assert (ds.Rows, ds.Columns) == (96, 96)
            assert float(ds.SliceThickness) == pytest.approx(2.8) == float(ds.SpacingBetweenSlices)
            assert float(ds.RepetitionTime) > 0 and float(ds.EchoTime) > 0 and float(ds.FlipAngle) > 0
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)


def test_simpleitk_reads_each_dess_with_the_intended_grid_and_no_warnings(small_sample, capfd):
    truth = _truth(small_sample)
    sides, obliquities = set(), []
    for v in truth.values():
        capfd.readouterr()
        image = _read_sitk(small_sample / v["path"])
        err = capfd.readouterr().err
        assert "WARNING" not in err.upper(), err
        geometry = Geometry.from_sitk(image)
        assert geometry.shape == (40, 96, 96)
        assert geometry.spacing == pytest.approx((2.8, 140 / 96, 140 / 96))
        assert np.allclose(geometry.affine_lps, v["grid"]["affine_lps"], atol=1e-4)
        assert geometry.orientation == "PIR"
        sides.add(v["knee_side"])
        normal = geometry.affine_lps[:3, 0] / 2.8
        angle = np.degrees(np.arccos(abs(normal[0])))
        obliquities.append((v["knee_side"], angle))
        assert 0 <= angle < 9
    assert sides == {1, 2}
    assert any(side == 2 and angle >= 5 for side, angle in obliquities)


@pytest.fixture(scope="module")
def dcm2niix_outputs(small_sample, tmp_path_factory):
    exe = Path(sys.executable).with_name("dcm2niix")
    out = tmp_path_factory.mktemp("dcm2niix")
    results = {}
    for vid, v in _truth(small_sample).items():
        target = out / vid
        target.mkdir()
        proc = subprocess.run(
            [str(exe), "-z", "n", "-b", "n", "-f", "vol", "-o", str(target), str(small_sample / v["path"])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[vid] = nib.load(target / "vol.nii")
    return results


def test_dcm2niix_converts_each_dess_to_the_same_world_positions(small_sample, dcm2niix_outputs):
    truth = _truth(small_sample)
    rng = np.random.default_rng(0)
    for vid, img in dcm2niix_outputs.items():
        v = truth[vid]
        geometry = Geometry.from_json(v["grid"])
        assert sorted(img.shape) == sorted(geometry.shape)
        assert sorted(img.header.get_zooms()) == pytest.approx(sorted(geometry.spacing), abs=1e-4)
        dicom = sitk.GetArrayFromImage(_read_sitk(small_sample / v["path"]))
        data = np.asarray(img.dataobj)
        ijk = np.stack([rng.integers(0, n, 200) for n in img.shape], axis=1)
        index = np.rint(geometry.world_to_index(_world_lps(img.affine, ijk))).astype(int)
        assert np.abs(geometry.world_to_index(_world_lps(img.affine, ijk)) - index).max() < 0.01
        assert np.array_equal(data[tuple(ijk.T)], dicom[tuple(index.T)])


def test_masks_line_up_with_truth_in_world_coordinates(small_sample):
    truth = _truth(small_sample)
    labels_json = json.loads((small_sample / "masks" / "labels.json").read_text())
    assert labels_json == {str(k): v for k, v in SAMPLE_LABELS.items()} and len(labels_json) == 34
    for vid, v in truth.items():
        mask = nib.load(small_sample / v["mask"])
        assert nib.aff2axcodes(mask.affine) == ("R", "A", "S")
        data = np.asarray(mask.dataobj)
        image = _read_sitk(small_sample / v["path"])
        on_dicom_grid = sitk.GetArrayFromImage(
            sitk.Resample(
                sitk.ReadImage(str(small_sample / v["mask"])),
                image,
                sitk.Transform(),
                sitk.sitkNearestNeighbor,
            )
        )
        # same voxels, but stored in NIfTI's own order, not as a copy of the DICOM array
        assert np.array_equal(np.bincount(on_dicom_grid.ravel()), np.bincount(data.ravel()))
        assert not np.array_equal(on_dicom_grid, data)
        voxel = max(v["grid"]["spacing"])
        for value, rec in v["labels"].items():
            idx = np.argwhere(data == int(value))
            assert len(idx) == rec["voxels"], (vid, rec["name"])
            if rec["voxels"]:
                centroid = _world_lps(mask.affine, idx.mean(axis=0))
                assert np.linalg.norm(centroid - rec["centroid_lps"]) < voxel, (vid, rec["name"])
        present = [rec["name"] for rec in v["labels"].values() if rec["voxels"]]
        assert len(present) == len(SAMPLE_LABELS), sorted(set(SAMPLE_LABELS.values()) - set(present))


def test_medial_side_follows_knee_side(small_sample):
    for vid, v in _truth(small_sample).items():
        c = {rec["name"]: np.array(rec["centroid_lps"]) for rec in v["labels"].values()}
        dx = c["femur medial central"][0] - c["femur lateral central"][0]
        assert (dx > 0) == (v["knee_side"] == 1), vid  # right knee: medial toward +x (patient left)
        assert c["femur medial central"][2] > c["tibia medial central"][2]
        assert c["patella medial"][1] < c["femur medial posterior"][1]  # patella anterior (-y)


def test_split_csvs_questions_and_quintuples_parse(small_sample):
    rows = read_split_csvs(small_sample)
    truth = _truth(small_sample)
    assert {r.volume_id for r in rows} == set(truth)
    assert {r.split for r in rows} == {"train", "val", "test"}
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
        assert (small_sample / r.path).is_dir() and (small_sample / r.label_filepath).is_file()
        assert (
            r.image_filepath
            == f"images/{r.patient_id}/00M/{r.study_folder}_{r.series_folder}_{r.knee_side}.nii.gz"
        )
    assert all(len(s) == 1 for s in by_patient.values())
    header = (small_sample / "split_files" / "train_split.csv").read_text().splitlines()[0]
    assert header == ",".join(SPLIT_COLUMNS)

    bank = json.loads((small_sample / "questions.json").read_text())
    assert list(bank) == [str(i) for i in range(1, 70)]
    for qid, text in bank.items():
        assert text.rstrip().endswith("}") and QUESTIONS[qid].answer_key in text

    records = [json.loads(line) for line in (small_sample / "quintuples.jsonl").read_text().splitlines()]
    per_volume = {}
    forms = set()
    for rec in records:
        assert rec["sample_id"] == f"{rec['volume_id']}_{rec['question_id']}"
        assert rec["question"] == bank[rec["question_id"]]
        assert rec["reasoning"] and all(isinstance(s, str) and s for s in rec["reasoning"])
        per_volume.setdefault(rec["volume_id"], []).append(rec)
        q = QUESTIONS[rec["question_id"]]
        body = rec["answer"][q.wrapper] if q.wrapper else rec["answer"]
        assert list(body) == [q.answer_key]
        if q.bare_grade:
            forms.add(type(body[q.answer_key]).__name__)
    assert forms == {"int", "dict"}
    assert set(per_volume) == set(truth)
    for vid, recs in per_volume.items():
        assert 55 <= len(recs) <= 65
        asked = {r["question_id"] for r in recs}
        positive = {qid for qid, g in truth[vid]["grades"].items() if any(g.values())}
        assert positive <= asked


def _grades_from_answer(q, answer):
    body = answer[q.wrapper] if q.wrapper else answer
    value = body[q.answer_key]
    if isinstance(value, int):
        return {"grade": value}
    by_key = {COMPONENTS[c][0]: c for c in q.components}
    return {by_key[k]: v for k, v in value.items()}


def _band(value, cuts):
    if value <= 0:
        return 0
    return 1 + sum(value >= c for c in cuts)


def test_answers_equal_truth_and_truth_equals_the_placed_lesions(small_sample):
    truth = _truth(small_sample)
    for line in (small_sample / "quintuples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        q = QUESTIONS[rec["question_id"]]
        assert _grades_from_answer(q, rec["answer"]) == truth[rec["volume_id"]]["grades"][q.id]

    n_bml = 0
    for vid, v in truth.items():
        mask = nib.load(small_sample / v["mask"])
        data = np.asarray(mask.dataobj)
        voxel_ml = float(np.prod(mask.header.get_zooms())) / 1000
        # effusion grade from the labelled volume (bands 4 / 8 / 13 ml, documented in kneeprep.synth.findings)
        eff_ml = (data == {n: k for k, n in SAMPLE_LABELS.items()}["joint effusion"]).sum() * voxel_ml
        eff_qid = next(q.id for q in QUESTIONS.values() if q.finding == "effusion_synovitis")
        assert v["grades"][eff_qid]["grade"] == sum(eff_ml >= t for t in (4.0, 8.0, 13.0))
        blobs_by_region = {}
        for les in v["lesions"]:
            if les["kind"] == "bml":
                blobs_by_region.setdefault(les["region"], []).append(les)
        for region, blobs in blobs_by_region.items():
            n_bml += 1
            value = {n: k for k, n in SAMPLE_LABELS.items()}[region]
            idx = np.argwhere(data == value)
            world = _world_lps(mask.affine, idx)
            inside = np.zeros(len(idx), dtype=bool)
            for b in blobs:
                inside |= np.linalg.norm(world - b["centre_lps"], axis=1) < b["radius_mm"]
            fraction = inside.mean()
            grades = blobs[0]["grades"]
            assert fraction == pytest.approx(blobs[0]["fraction"], abs=0.02)
            assert grades["bml_size"] == _band(fraction, (1 / 3, 2 / 3)), (vid, region, fraction)
            assert grades["bml_number"] == min(3, len(blobs))
            for a in range(len(blobs)):
                for b in range(a + 1, len(blobs)):
                    gap = np.linalg.norm(np.subtract(blobs[a]["centre_lps"], blobs[b]["centre_lps"]))
                    assert gap > blobs[a]["radius_mm"] + blobs[b]["radius_mm"]
            qid = next(q.id for q in QUESTIONS.values() if q.finding == "bml" and q.region == region)
            assert v["grades"][qid] == grades
    assert n_bml >= 1


def test_lesions_are_visible_in_the_dicom_image(small_sample):
    """Inside a BML or cartilage defect the DESS signal is brighter than in the rest of its structure."""
    truth = _truth(small_sample)
    checked = 0
    for vid, v in truth.items():
        image = _read_sitk(small_sample / v["path"])
        mask = sitk.Resample(
            sitk.ReadImage(str(small_sample / v["mask"])), image, sitk.Transform(), sitk.sitkNearestNeighbor
        )
        pixels, labels = sitk.GetArrayFromImage(image).astype(float), sitk.GetArrayFromImage(mask)
        geometry = Geometry.from_sitk(image)
        for les in v["lesions"]:
            if les["kind"] != "bml" or les["region_voxels"] < 50:
                continue
            value = {n: k for k, n in SAMPLE_LABELS.items()}[les["region"]]
            idx = np.argwhere(labels == value)
            d = np.linalg.norm(geometry.index_to_world(idx) - les["centre_lps"], axis=1)
            inside, outside = (
                pixels[tuple(idx[d < les["radius_mm"]].T)],
                pixels[tuple(idx[d > les["radius_mm"] + 3].T)],
            )
            if len(inside) >= 3 and len(outside) >= 3:
                assert inside.mean() > outside.mean() + 100, (vid, les["region"])
                checked += 1
    assert checked >= 1


def test_generation_is_deterministic_and_seed_dependent(tmp_path):
    a = generate(tmp_path / "a", patients=1, size="small", seed=5)
    b = generate(tmp_path / "b", patients=1, size="small", seed=5)
    files_a = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.root) for p in b.root.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 50
    assert all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files_a)
    c = generate(tmp_path / "c", patients=1, size="small", seed=6)
    assert c.volume_ids != a.volume_ids


def test_cli_writes_a_sample_and_prints_a_summary(tmp_path):
    from click.testing import CliRunner

    from kneeprep.cli import cli
    from kneeprep.errors import StoreError

    runner = CliRunner()
    result = runner.invoke(
        cli, ["synth", str(tmp_path / "s"), "--patients", "2", "--size", "small", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    truth = _truth(tmp_path / "s")
    assert f"{len(truth)} DESS volumes" in result.output
    assert f"wrote {3 * len(truth)} series" in result.output
    assert "quintuples" in result.output and str(tmp_path / "s") in result.output
    assert {v["knee_side"] for v in truth.values()} == {1, 2}
    again = runner.invoke(cli, ["synth", str(tmp_path / "s"), "--size", "small"])
    assert again.exit_code == 2 and "not empty (pass --force" in again.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("a user's file")  # any non-empty folder, not only an earlier sample
    refused = runner.invoke(cli, ["synth", str(other), "--size", "small"])
    assert refused.exit_code == 2 and str(other) in refused.output and not (other / "raw").exists()
    forced = runner.invoke(cli, ["synth", str(other), "--size", "small", "--patients", "1", "--force"])
    assert forced.exit_code == 0 and (other / "truth.json").is_file() and (other / "notes.txt").is_file()
    from kneeprep.synth import plan_sample, write_sample

    with pytest.raises(StoreError):  # the library call keeps refusing an existing sample without force
        write_sample(plan_sample(1, "small", 0), tmp_path / "s")
    bad = runner.invoke(cli, ["synth", str(tmp_path / "t"), "--size", "huge"])
    assert bad.exit_code == 2
    helptext = runner.invoke(cli, ["synth", "--help"]).output
    assert "contents.0C2.csv" in helptext and "truth.json" in helptext


@pytest.mark.slow
def test_full_size_sample_has_the_oai_dess_grid(tmp_path):
    summary = generate(tmp_path / "full", patients=1, size="full", seed=2)
    v = _truth(summary.root)[summary.volume_ids[0]]
    image = _read_sitk(summary.root / v["path"])
    assert image.GetSize() == (384, 384, 160)
    assert image.GetSpacing() == pytest.approx((140 / 384, 140 / 384, 0.7))
