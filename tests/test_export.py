"""`kneeprep export`: the published 3DReasonKnee layout from shards or a volume store.

Round trips: the exported CSVs/JSON read back with kneeprep's annotation readers give the shards' quintuples; the
exported NIfTI read with nibabel holds the same voxel values at the same world points as the Zarr volume.
"""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from kneeprep.cli import cli
from kneeprep.formats import export_layout
from kneeprep.formats.annotations import read_annotations, read_training_items
from kneeprep.formats.shard_reader import iter_quintuples
from kneeprep.formats.splits import SPLITS, read_split_csvs
from kneeprep.formats.store import (
    list_volumes,
    read_attrs,
    read_labels,
    read_volume,
    report_path,
    update_attrs,
    write_volume,
)
from kneeprep.geometry import Geometry, affine_from_itk, world_to_index
from kneeprep.moaks.severity import Grade, parse_answer, to_published
from kneeprep.stages.export import MANIFEST, answer_text, run_export, volume_file_name, write_nifti

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(small_sample, tmp_path_factory):
    """The small sample rebuilt (store + shards) and exported from the shards with --store."""
    root = tmp_path_factory.mktemp("export")
    res = _invoke("rebuild", "--recipe", RECIPE, "--raw", small_sample / "raw", "--annotations", small_sample,
                  "--masks", small_sample, "--out", root / "build", "--workers", 0, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    store, shards = root / "build" / "volumes.zarr", root / "build" / "shards"
    res = _invoke(
        "export",
        shards,
        root / "ex",
        "--layout",
        "3dreasonknee",
        "--store",
        store,
        "--workers",
        0,
        "--no-progress",
    )
    return store, shards, root / "ex", res


def _shard_rows(shards: Path) -> list[dict]:
    return list(iter_quintuples(shards))


# ----------------------------------------------------------------------------------------------------------
# layout and summary


def test_export_from_shards_layout_and_summary(built):
    store, shards, out, res = built
    assert res.exit_code == 0, res.output
    vids = list_volumes(store)
    assert "5 written, 0 skipped, 0 failed" in res.output
    assert f"images: {len(vids)} NIfTI, masks: {len(vids)}" in res.output
    rows = _shard_rows(shards)
    per_split = {s: sum(r["split"] == s for r in rows) for s in SPLITS}
    assert "items:   " + ", ".join(f"{s} {n}" for s, n in per_split.items()) in res.output
    for vid in vids:
        assert (out / "images" / volume_file_name(vid)).is_file()
        assert (out / "masks" / volume_file_name(vid)).is_file()
    assert sorted(p.name for p in (out / "split_files").iterdir()) == sorted(f"{s}_split.csv" for s in SPLITS)
    assert not list(out.rglob("*.partial*"))
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"written": 5, "skipped": 0, "failed": 0}
    assert report["context"]["annotations"]["items"] == per_split


def test_split_csvs_point_at_the_exported_files(built, small_sample):
    store, shards, out, _ = built
    rows = read_split_csvs(out)
    split_of = {r["volume_id"]: r["split"] for r in _shard_rows(shards)}
    assert {r.volume_id: r.split for r in rows} == split_of
    sample_paths = {r.volume_id: r.path for r in read_split_csvs(small_sample)}
    report = {i["item"]: i["source"] for i in json.loads(report_path(store).read_text())["items"]}
    for r in rows:
        assert (out / r.image_filepath).is_file() and not Path(r.image_filepath).is_absolute()
        assert (
            r.image_filepath
            == f"images/{r.patient_id}/{r.time}/{r.study_folder}_{r.series_folder}_{r.knee_side}.nii.gz"
        )
        assert r.label_filepath == "masks/" + r.image_filepath.removeprefix("images/")
        assert (out / r.label_filepath).is_file()
        # the raw series folder as the convert run saw it (the sample's CSV names the same folder, relatively)
        assert r.path == report[r.volume_id] and r.path.endswith(sample_paths[r.volume_id])


# ----------------------------------------------------------------------------------------------------------
# round trip of the annotations


def test_reimported_annotations_equal_the_shards(built):
    _, shards, out, _ = built
    got = read_annotations(out)
    assert got.errors == []
    assert sorted(Path(p).name for p in got.ignored) == [MANIFEST, "report.json"]
    rows = {r["sample_id"]: r for r in _shard_rows(shards)}
    recs = {r.sample_id: r for r in got.records}
    assert set(recs) == set(rows) and len(rows) > 200
    for sid, row in rows.items():
        rec = recs[sid]
        assert rec.volume_id == row["volume_id"] and rec.question_id == row["question_id"]
        assert rec.question == row["question"]
        assert rec.reasoning == tuple(row["reasoning"]) and len(rec.reasoning) >= 1
        assert rec.severity == tuple(Grade(**g) for g in row["severity"])
        assert json.loads(rec.answer_json) == json.loads(row["answer_json"])  # --answer-json original
    bank = json.loads((out / "questions.json").read_text())
    assert bank == {r["question_id"]: r["question"] for r in rows.values()}
    assert list(bank) == sorted(bank, key=int)


def test_training_items_are_the_published_form(built):
    _, shards, out, _ = built
    items = json.loads((out / "test.json").read_text())
    rows = list(iter_quintuples(shards, split="test"))
    assert len(items) == len(rows)
    assert all(set(i) == {"image", "prompt", "answer"} for i in items)
    first, row = items[0], rows[0]
    head, final = first["answer"].rsplit("\n\nFinal diagnosis: ", 1)
    assert head.splitlines() == [f"{n}. {s}" for n, s in enumerate(row["reasoning"], 1)]
    assert json.loads(final) == json.loads(row["answer_json"])
    assert first["image"].endswith(volume_file_name(row["volume_id"]))


def test_answer_json_canonical_and_path_prefix(built, tmp_path):
    store, shards, _, _ = built
    out = tmp_path / "data"
    rep = run_export(shards, out, answer="canonical", path_prefix="../data/", workers=0)
    assert rep.context["annotations"]["answers_from_severity"] == 0
    rows = {r["sample_id"]: r for r in _shard_rows(shards)}
    records, errors = read_training_items(out / "val.json", json.loads((out / "questions.json").read_text()))
    assert errors == [] and len(records) == sum(r["split"] == "val" for r in rows.values())
    for rec in records:
        row = rows[rec.sample_id]
        sev = tuple(Grade(**g) for g in row["severity"])
        assert json.loads(rec.answer_json) == to_published(sev, row["question_id"])
        assert rec.severity == sev
    csv_rows = read_split_csvs(out)
    assert all(r.image_filepath.startswith("../data/images/") and r.label_filepath == "" for r in csv_rows)
    item = json.loads((out / "train.json").read_text())[0]
    assert item["image"].startswith("../data/images/")
    assert (out / item["image"].removeprefix("../data/")).is_file()
    assert not (out / "masks").exists()  # no --store: no masks


def test_answer_text_round_trips_awkward_steps():
    from kneeprep.formats.annotations import split_reasoning
    from kneeprep.moaks.severity import find_answer_json

    steps = [
        "3.5 mm extrusion, e.g. medial.",
        "2) a step that looks numbered",
        "Final diagnosis pending:  see below",
    ]
    obj = {"MOAKS_scores": {"medial meniscus anterior extrusion": 2}}
    text = answer_text(steps + ["  "], obj)
    found, start = find_answer_json(text)
    assert found == obj
    assert split_reasoning(text[:start]) == tuple(" ".join(s.split()) for s in steps)
    assert parse_answer(text, "44")[0].grade == 2
    assert answer_text([], obj).startswith("Final diagnosis: {")


# ----------------------------------------------------------------------------------------------------------
# NIfTI: axes and world space


def _assert_same_world_values(nifti: Path, array: np.ndarray, affine_lps: np.ndarray, n_points=None, seed=0):
    """Every (or a random sample of) nibabel voxel: index -> RAS (nibabel's affine) -> LPS -> kneeprep index
    (the store's affine) lands on a voxel centre holding the same value."""
    img = nib.load(str(nifti))
    data = np.asarray(img.dataobj)
    assert data.shape[0] == array.shape[0]  # sagittal slices first, as the published baseline wants
    assert img.get_fdata().shape == array.shape
    ijk = np.indices(data.shape).reshape(3, -1).T
    if n_points is not None:
        ijk = np.random.default_rng(seed).choice(ijk, size=min(n_points, len(ijk)), replace=False)
    ras = nib.affines.apply_affine(img.affine, ijk)
    lps = ras * np.array([-1.0, -1.0, 1.0])
    idx = world_to_index(affine_lps, lps)
    near = np.rint(idx)
    assert np.abs(idx - near).max() < 1e-3
    near = near.astype(int)
    assert (near >= 0).all() and (near < np.array(array.shape)).all()
    assert np.array_equal(data[tuple(ijk.T)], array[tuple(near.T)])
    return img


def test_exported_images_and_masks_match_the_store_in_world_space(built):
    store, _, out, _ = built
    vids = list_volumes(store)
    assert len(vids) >= 2  # an empty store would pass the loop below without checking anything
    assert sorted(p.name for p in (out / "images").rglob("*.nii.gz")) == sorted(
        volume_file_name(v).split("/")[-1] for v in vids
    )
    for vid in vids:
        image, geom = read_volume(store, vid)
        img = _assert_same_world_values(out / "images" / volume_file_name(vid), image, geom.affine_lps)
        assert np.allclose(img.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ geom.affine_lps, atol=1e-3)
        assert img.get_data_dtype() == image.dtype
        labels = read_labels(store, vid)
        assert labels.any()
        _assert_same_world_values(out / "masks" / volume_file_name(vid), labels, geom.affine_lps)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_write_nifti_oblique_and_left_handed_grids(tmp_path, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # random rotation, sometimes a reflection (left-handed)
    spacing = rng.uniform(0.3, 2.0, 3)
    geom = Geometry(
        (7, 5, 6), tuple(reversed(spacing)), affine_from_itk(rng.uniform(-100, 100, 3), spacing, q.ravel())
    )
    array = rng.integers(0, 5000, geom.shape).astype(np.int16 if seed == 1 else np.float32)
    p = tmp_path / "v.nii.gz"
    assert write_nifti(p, array, geom.affine_lps) == p.stat().st_size
    _assert_same_world_values(p, array, geom.affine_lps)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["v.nii.gz"]


# ----------------------------------------------------------------------------------------------------------
# resuming, store input, failures


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}


def test_rerun_skips_unchanged_and_rewrites_changed(built, tmp_path):
    store, shards, _, _ = built
    store2 = tmp_path / "volumes.zarr"
    shutil.copytree(store, store2)
    out = tmp_path / "ex"
    first = run_export(store2, out, workers=0)
    assert first.counts == {"written": 5, "skipped": 0, "failed": 0}
    before = _mtimes(out)
    again = run_export(store2, out, workers=0)
    assert again.counts == {"written": 0, "skipped": 5, "failed": 0} and _mtimes(out) == before
    vids = list_volumes(store2)
    update_attrs(
        store2, vids[0], {"qc": {"status": "warn", "reasons": ["changed for the test"]}}
    )  # a new source
    (out / "images" / volume_file_name(vids[1])).unlink()  # a missing output
    (out / "images" / "leftover.partial.nii.gz").write_bytes(b"x")  # an interrupted write
    third = run_export(store2, out, workers=0)
    assert sorted(r.item for r in third.items if r.status == "written") == sorted(vids[:2])
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {f"{d}/{volume_file_name(v)}" for v in vids[:2] for d in ("images", "masks")}
    assert third.context["cleaned"] == ["images/leftover.partial.nii.gz"]
    assert not (out / "split_files").exists()  # a store holds no splits
    # a volume gone from the input: its files go too
    from kneeprep.formats.store import delete_volume

    delete_volume(store2, vids[2])
    fourth = run_export(store2, out, workers=0)
    assert fourth.context["removed"] == [vids[2]]
    assert not (out / "images" / volume_file_name(vids[2])).exists()
    assert vids[2] not in json.loads((out / MANIFEST).read_text())["volumes"]


def test_store_input_with_dask_worker(built, tmp_path):
    store, _, _, _ = built
    out = tmp_path / "ex"
    res = _invoke("export", store, out, "--workers", 1, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "input is a volume store: images and masks only" in res.output
    vid = list_volumes(store)[0]
    image, geom = read_volume(store, vid)
    _assert_same_world_values(out / "images" / volume_file_name(vid), image, geom.affine_lps, n_points=20000)
    assert not (out / "train.json").exists()


def test_mask_off_grid_fails_that_volume_and_exit_code_1(built, tmp_path):
    store, shards, _, _ = built
    store2 = tmp_path / "volumes.zarr"
    shutil.copytree(store, store2)
    vids = list_volumes(store2)
    bad = vids[0]
    image, geom = read_volume(store2, bad)
    shifted = geom.affine_lps.copy()
    shifted[:3, 3] += 5.0
    attrs = read_attrs(store2, bad)
    labels = {
        "anatomy": (
            read_labels(store2, bad),
            {int(k): v for k, v in attrs["labels"]["anatomy"]["label_map"].items()},
        )
    }
    write_volume(store2, bad, image, Geometry(geom.shape, geom.spacing, shifted), attrs, labels)
    out = tmp_path / "ex"
    res = _invoke("export", shards, out, "--store", store2, "--workers", 0, "--no-progress")
    assert res.exit_code == 1, res.output
    assert "4 written, 0 skipped, 1 failed" in res.output and "geometry" in res.output
    failed = [i for i in json.loads((out / "report.json").read_text())["items"] if i["status"] == "failed"]
    assert [i["item"] for i in failed] == [bad] and str(store2 / bad) in failed[0]["message"]
    assert not (out / "images" / volume_file_name(bad)).exists()
    exported = read_annotations(out)
    assert bad not in {r.volume_id for r in exported.splits}
    assert bad not in {r.volume_id for r in exported.records} and exported.records


def test_not_an_input(tmp_path, small_sample, capsys):
    from kneeprep.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", str(small_sample), str(tmp_path / "o")])
    assert e.value.code == 1
    assert (
        f"{small_sample}: neither a shards directory (no manifest.json) nor a volume store"
        in capsys.readouterr().err
    )
    with pytest.raises(FileNotFoundError, match="neither a shards directory"):
        run_export(small_sample, tmp_path / "o", workers=0)
    assert not (tmp_path / "o").exists()


def test_store_option_needs_shards_input(built, tmp_path):
    store, _, _, _ = built
    with pytest.raises(ValueError, match="--store only adds masks"):
        run_export(store, tmp_path / "o", store=store, workers=0)


def test_layout_doctests():
    r = doctest.testmod(export_layout)
    assert r.attempted >= 2 and r.failed == 0
