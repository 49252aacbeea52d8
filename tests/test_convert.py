"""The convert stage end to end: selection, transforms, masks, resume, failures, the CLI and dcm2niix oracles."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from kneeprep.cli import cli
from kneeprep.dicom import scan_tree
from kneeprep.formats import store
from kneeprep.formats.splits import SPLIT_COLUMNS
from kneeprep.geometry import Geometry, affine_from_itk, index_to_world, lps_to_ras
from kneeprep.recipe import parse_recipe
from kneeprep.stages.convert import convert_series, run_convert
from kneeprep.synth import write_series
from kneeprep.transforms import apply_mirror, apply_orient, plan_mirror, plan_orient
from kneeprep.transforms.orient import permute_flip
from kneeprep.transforms.resample import resample_onto

DCM2NIIX = shutil.which("dcm2niix") or str(Path(__file__).parents[1] / ".venv/bin/dcm2niix")
PIR = np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])  # ITK direction columns: P, I, R
PHI = {"PatientName": "Doe^Jane", "PatientBirthDate": "19470312", "InstitutionName": "General Hospital"}


def tilt(deg_x: float, deg_y: float) -> np.ndarray:
    a, b = np.radians(deg_x), np.radians(deg_y)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rx


class Tree:
    """A small OAI-style raw tree: ``raw/00m/0.C.2/<pid>/<date>/<series>/001 ...``."""

    def __init__(self, root: Path):
        self.root = root
        self.raw = root / "raw"
        self.series: dict[str, dict] = {}

    def add(
        self, pid: str, side: str, *, series="10000001", desc=None, shape=(12, 28, 24), direction=PIR, seed=0
    ):
        rng = np.random.default_rng(seed + int(pid))
        z, y, x = np.indices(shape)
        array = (200 + 15 * z + 4 * y + x + rng.integers(0, 50, shape)).astype(np.uint16)
        g = Geometry(
            shape,
            (0.7, 0.5, 0.45),
            affine_from_itk((-20.0 + int(pid) % 7, 12.0, 30.0), (0.45, 0.5, 0.7), direction.ravel()),
        )
        folder = self.raw / "00m" / "0.C.2" / pid / "20050101" / series
        desc = desc or f"SAG_3D_DESS_{side}"
        files = write_series(array, g, folder, tags={"SeriesDescription": desc, "PatientID": pid, **PHI})
        vid = f"{pid}_00M_20050101_{series}_{1 if side == 'RIGHT' else 2}"
        self.series[vid] = {"array": array, "geometry": g, "folder": folder, "files": files}
        return vid

    def add_mask(self, vid: str, *, shift_mm=0.0, name=None) -> str:
        """A RAS NIfTI mask on the series' grid, stored in another voxel order (axes permuted, one flipped)."""
        s = self.series[vid]
        labels = np.zeros(s["array"].shape, np.uint8)
        labels[2:6, 4:12, 3:10] = 1
        labels[6:10, 14:22, 8:18] = 2
        labels[3:5, 20:26, 1:4] = 3
        other, og = permute_flip(labels, s["geometry"], (1, 2, 0), (False, True, False))
        affine = lps_to_ras(og.affine_lps)
        affine[0, 3] += shift_mm
        path = self.root / "annotations" / "masks" / (name or f"{vid}.nii.gz")
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(other, affine), str(path))
        s["labels"] = labels
        return f"masks/{path.name}"

    def write_splits(self, rows: dict[str, str]):
        d = self.root / "annotations" / "split_files"
        d.mkdir(parents=True, exist_ok=True)
        with (d / "train_split.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(SPLIT_COLUMNS)
            for vid, label in rows.items():
                pid, time, study, series, side = vid.split("_")
                w.writerow([pid, time, study, series, side, "raw", f"images/{vid}.nii.gz", label])
        return self.root / "annotations"


@pytest.fixture
def tree(tmp_path):
    return Tree(tmp_path)


def all_metadata_text(store_path: Path) -> str:
    return "\n".join(p.read_text() for p in store_path.rglob("zarr.json"))


# ----------------------------------------------------------------------------------------------------------


def test_selection_qc_attrs_and_no_phi(tree, tmp_path):
    right = tree.add("9000001", "RIGHT")
    left = tree.add("9000002", "LEFT")
    tree.add("9000003", "RIGHT", desc="COR_MPR_RIGHT")
    broken = tree.add("9000004", "LEFT")
    f = tree.series[broken]["files"][5]
    os.truncate(f, f.stat().st_size - 200)  # scan's QC fails this series
    out = tmp_path / "v.zarr"
    report = run_convert(tree.raw, out, parse_recipe({}), workers=0)
    by_id = {r.item: r for r in report.items}
    assert report.counts == {"written": 2, "skipped": 2, "failed": 0}
    assert by_id[broken].kind == "qc" and "truncated" in by_id[broken].message
    assert [r.kind for r in report.items if r.status == "skipped"].count("not_selected") == 1
    assert store.list_volumes(out) == sorted([right, left])
    attrs = store.read_attrs(out, left)
    assert attrs["knee_side"] == 2 and attrs["mirrored"] is False and attrs["dtype"] == "uint16"
    assert (
        attrs["source"]["n_files"] == 12 and "description" not in attrs["source"]
    )  # free text: not by default
    assert attrs["qc"]["status"] == "ok" and attrs["dicom"]["Modality"] == "MR"
    assert attrs["provenance"]["convert_hash"] == parse_recipe({}).stage_hash("convert")
    assert attrs["normalization"]["method"] == "none" and attrs["labels"] == {} and attrs["boxes"] == []
    image, g = store.read_volume(out, left)
    assert np.array_equal(image, tree.series[left]["array"])  # native, no resampling: the DICOM values
    assert np.allclose(g.affine_lps, tree.series[left]["geometry"].affine_lps, atol=1e-4)
    text = all_metadata_text(out)
    assert not any(v in text for v in PHI.values()) and not any(k in text for k in PHI)
    saved = json.loads(store.report_path(out).read_text())
    assert saved["counts"] == report.counts and {i["item"] for i in saved["items"]} == set(by_id)


def test_resume_skips_unchanged_and_redoes_changed(tree, tmp_path):
    a = tree.add("9000001", "RIGHT")
    b = tree.add("9000002", "LEFT")
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({})
    assert run_convert(tree.raw, out, recipe, workers=0).counts["written"] == 2
    # the task hashes the files while it reads them: the same hash as hashing them on their own
    from kneeprep.stages.convert import content_hash

    assert store.read_attrs(out, a)["source"]["content_hash"] == content_hash(
        scan_tree(tree.raw).series[0].files
    )
    again = run_convert(tree.raw, out, recipe, workers=0)
    assert {(r.item, r.status, r.kind) for r in again.items} == {
        (a, "skipped", "unchanged"),
        (b, "skipped", "unchanged"),
    }
    # a shard-only recipe change does not touch volumes
    assert (
        run_convert(tree.raw, out, parse_recipe({"shards": {"level": 9}}), workers=0).counts["written"] == 0
    )
    # touched but identical bytes: the content hash says unchanged; the fingerprint is refreshed
    f = tree.series[a]["files"][0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    touched = {r.item: r for r in run_convert(tree.raw, out, recipe, workers=0).items}
    assert touched[a].status == "skipped" and "fingerprint refreshed" in touched[a].message
    assert run_convert(tree.raw, out, recipe, workers=0).counts["skipped"] == 2  # cheap path again
    # new pixel values in one series: that volume alone is redone and replaced
    tree.add("9000002", "LEFT", seed=5)
    redo = {r.item: r for r in run_convert(tree.raw, out, recipe, workers=0).items}
    assert redo[b].status == "written" and redo[b].details["replaced"] and redo[a].status == "skipped"
    assert np.array_equal(store.read_volume(out, b)[0], tree.series[b]["array"])
    # a convert-stage recipe change redoes everything
    lps = run_convert(tree.raw, out, parse_recipe({"geometry": {"orientation": "LPS"}}), workers=0)
    assert lps.counts["written"] == 2
    assert store.read_attrs(out, a)["geometry"]["orientation"] == "LPS"


def test_input_identities_are_those_earlier_stores_hold(tree):
    """The fingerprint and series key of a series are what the ``Path``-based code before them computed, for
    ``Path`` and ``str`` file lists alike: a store written before is not reconverted."""
    import dataclasses
    import hashlib

    from kneeprep.stages.resume import input_fingerprint, series_key

    tree.add("9000001", "RIGHT")
    info = scan_tree(tree.raw).series[0]
    mask = tree.raw / "mask.nii.gz"
    mask.write_bytes(b"not a mask, only stat'ed")

    def entry(p):
        st = Path(p).stat()
        return [Path(p).name, st.st_size, st.st_mtime_ns]

    files = {"uid": info.series_uid, "files": [entry(f) for f in info.files], "mask": entry(mask)}
    blob = json.dumps(files, separators=(",", ":"))
    key = json.dumps({"uid": info.series_uid, "files": [Path(f).name for f in info.files]})
    as_str = dataclasses.replace(info, files=tuple(str(f) for f in info.files))
    for i in (info, as_str):
        assert input_fingerprint(i, mask) == input_fingerprint(i, str(mask))
        assert input_fingerprint(i, mask) == hashlib.sha256(blob.encode()).hexdigest()[:16]
        assert series_key(i) == hashlib.sha256(key.encode()).hexdigest()[:16]
    os.utime(info.files[0], ns=(0, 10**9))  # and it still sees a change
    assert input_fingerprint(info, mask) != hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_scan_hands_out_each_series_when_its_folder_is_read(tree):
    ids = [
        tree.add("9000001", "RIGHT"),
        tree.add("9000002", "LEFT"),
        tree.add("9000003", "RIGHT", series="10000002"),
    ]
    early = []
    final = scan_tree(tree.raw, on_series=early.append)
    assert sorted(s.volume_id for s in early) == sorted(ids)
    assert {s.volume_id: s for s in early} == {s.volume_id: s for s in final.series}  # equal, field by field


def test_the_driver_neither_stats_inputs_nor_reads_attrs_and_a_rerun_still_skips(tree, tmp_path, monkeypatch):
    # issue 16.3: the "unchanged?" decision (stat of every input file, the stored attrs) is the task's; the
    # driver plans from the scan's record alone. workers=0 runs the tasks in this process: count them apart.
    import kneeprep.stages.convert as pipeline
    import kneeprep.stages.convert_series as task
    import kneeprep.stages.resume as resume

    ids = [tree.add("9000001", "RIGHT"), tree.add("9000002", "LEFT")]
    out = tmp_path / "v.zarr"
    assert run_convert(tree.raw, out, parse_recipe({}), workers=1).counts["written"] == 2
    in_task = []
    real_task = pipeline._run_task
    monkeypatch.setattr(pipeline, "_run_task", lambda t, *a, **k: in_task.append(1) or real_task(t, *a, **k))
    calls = []
    for name in ("input_fingerprint", "stored_attrs"):
        real = getattr(resume, name)
        fake = lambda *a, _real=real, _name=name: calls.append((_name, bool(in_task))) or _real(*a)  # noqa: E731
        monkeypatch.setattr(task, name, fake)
    again = run_convert(tree.raw, out, parse_recipe({}), workers=0)
    assert again.counts == {"written": 0, "skipped": 2, "failed": 0}
    assert {(r.kind, r.message) for r in again.items} == {("unchanged", "inputs and recipe unchanged")}
    assert calls and all(inside for _, inside in calls), calls  # only ever called from inside a task
    assert sorted(n for n, _ in calls) == ["input_fingerprint"] * 2 + ["stored_attrs"] * 2
    # with Dask, a re-run still submits each series once (the early start stands) and skips it
    again = run_convert(tree.raw, out, parse_recipe({}), workers=1)
    assert again.counts == {"written": 0, "skipped": 2, "failed": 0} and sorted(
        r.item for r in again.items
    ) == sorted(ids)


def _split_uid_across_folders(tree, which: str) -> None:
    """Move some files of one series into a sibling folder that is scanned after it (same UID)."""
    vid = tree.add("9000001", "RIGHT")
    tree.add("9000002", "LEFT")
    files = tree.series[vid]["files"]
    moved = files[:3] if which == "first slices" else files[-3:]  # 9 slices left: enough to pass QC
    other = tree.series[vid]["folder"].with_name("10000009")
    other.mkdir()
    for f in moved:
        f.rename(other / f.name)


def _colliding_tag_ids(tree, _which: str) -> None:
    """Two series outside the OAI layout whose tags give the same volume id; the larger one, scanned second,
    keeps the plain id, so the first one's early conversion is under the wrong id."""
    for folder, n, seed in (("a", 9, 1), ("b", 12, 2)):
        array = (300 + np.random.default_rng(seed).integers(0, 90, (n, 20, 16))).astype(np.uint16)
        g = Geometry(
            (n, 20, 16), (0.7, 0.5, 0.45), affine_from_itk((0.0, 0, 0), (0.45, 0.5, 0.7), PIR.ravel())
        )
        tags = {"SeriesDescription": "SAG_3D_DESS_RIGHT", "PatientID": "9000007", "StudyDate": "20050101",
                "SeriesNumber": 3}  # fmt: skip
        write_series(array, g, tree.raw / folder, tags=tags)


@pytest.mark.parametrize(
    "make, which",
    [(_split_uid_across_folders, "first slices"), (_split_uid_across_folders, "last slices"),
     (_colliding_tag_ids, "")],
    ids=["uid-continues-first-slices", "uid-continues-last-slices", "ids-collide"],
)  # fmt: skip
def test_early_conversion_is_redone_when_the_finished_scan_disagrees(
    tree, tmp_path, make, which, monkeypatch
):
    # With Dask, series are converted as soon as their scan task is done; the finished scan decides. The
    # result must be what a run that scans everything first gives (workers=0 does: it never runs ahead).
    from kneeprep.dicom import scan_tasks

    monkeypatch.setattr(scan_tasks, "BATCH_FILES", 1)  # a scan task per folder: these trees are small
    make(tree, which)
    recipe = parse_recipe({})
    ahead = run_convert(tree.raw, tmp_path / "ahead.zarr", recipe, workers=1)
    serial = run_convert(tree.raw, tmp_path / "serial.zarr", recipe, workers=0)
    assert ahead.context.get("revised"), "the case must exercise the redo"
    assert "revised" not in serial.context
    summary = lambda rep: sorted((r.item, r.status, r.kind) for r in rep.items)  # noqa: E731
    assert summary(ahead) == summary(serial)
    assert ahead.counts["written"] >= 1
    vols = store.list_volumes(tmp_path / "serial.zarr")
    assert store.list_volumes(tmp_path / "ahead.zarr") == vols  # no volume of a provisional series is left
    for vid in vols:
        a, ga = store.read_volume(tmp_path / "ahead.zarr", vid)
        b, gb = store.read_volume(tmp_path / "serial.zarr", vid)
        assert np.array_equal(a, b) and np.allclose(ga.affine_lps, gb.affine_lps), vid
        assert store.read_attrs(tmp_path / "ahead.zarr", vid)["source"]["n_files"] == a.shape[0]
    assert ahead.context["converted_early"] >= 1
    # a re-run finds everything done and starts no overruled provisional series early again (it remembers
    # them); the others start early and find themselves unchanged (the task decides that)
    again = run_convert(tree.raw, tmp_path / "ahead.zarr", recipe, workers=1)
    assert again.counts["written"] == 0
    assert again.context["converted_early"] <= len(again.items) - len(ahead.context["revised"])
    assert again.context["revised"] == ahead.context["revised"]


def test_interrupted_write_leaves_no_visible_volume_and_next_run_cleans(tree, tmp_path, monkeypatch):
    a = tree.add("9000001", "RIGHT")
    out = tmp_path / "v.zarr"
    real = store._write_array

    def interrupted(group, name, data):
        real(group, name, data)
        (store.work_dir(out) / "stale.1234.partial").mkdir(exist_ok=True)  # as a SIGKILLed worker would leave
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_convert(tree.raw, out, parse_recipe({}), workers=0)
    assert store.list_volumes(out) == []
    assert json.loads(store.report_path(out).read_text())["context"]["interrupted"] is True
    monkeypatch.setattr(store, "_write_array", real)
    report = run_convert(tree.raw, out, parse_recipe({}), workers=0)
    assert report.context["cleaned_work_area"] == ["stale.1234.partial"]
    assert store.list_volumes(out) == [a] and list(store.work_dir(out).iterdir()) == []


def test_masks_follow_image_through_orient_mirror_and_resample(tree, tmp_path):
    left = tree.add("9000002", "LEFT", direction=tilt(8, -5) @ PIR)
    right = tree.add("9000001", "RIGHT")
    ann = tree.write_splits({left: tree.add_mask(left), right: tree.add_mask(right)})
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({"geometry": {"orientation": "LPS", "mirror_left": True}})
    report = run_convert(tree.raw, out, recipe, annotations=ann, workers=0)
    assert report.counts["written"] == 2, report.table()
    s = tree.series[left]
    img, g = apply_orient(s["array"], s["geometry"], plan_orient(s["geometry"], "LPS"))
    lab, _ = apply_orient(s["labels"], s["geometry"], plan_orient(s["geometry"], "LPS"))
    mp = plan_mirror(g, 2, True)
    assert mp.axis == 2
    img, g = apply_mirror(img, g, mp)
    lab, _ = apply_mirror(lab, g, mp)
    stored, sg = store.read_volume(out, left)
    assert np.array_equal(stored, img) and np.allclose(sg.affine_lps, g.affine_lps, atol=1e-4)
    assert np.array_equal(store.read_labels(out, left, "anatomy"), lab)
    attrs = store.read_attrs(out, left)
    assert attrs["mirrored"] is True and attrs["transforms"]["mirror"]["axis"] == 2
    assert attrs["labels"]["anatomy"]["source"] == f"{left}.nii.gz" and attrs["labels"]["anatomy"][
        "present"
    ] == [1, 2, 3]
    boxes = {b["region"]: b for b in attrs["boxes"]}
    z, y, x = np.nonzero(lab == 1)
    assert boxes["patella medial"]["voxels"] == [
        z.min(),
        y.min(),
        x.min(),
        z.max() + 1,
        y.max() + 1,
        x.max() + 1,
    ]
    assert attrs["provenance"]["boxes_hash"] == recipe.stage_hash("boxes")
    assert store.boxes_table_path(out).is_file()
    # fixed shape: labels are the nearest-neighbour lookup of the mask at the new voxel centres
    small = parse_recipe({"geometry": {"shape": [8, 8, 16]}})  # no target centre exactly half-way between two
    run_convert(tree.raw, out, small, annotations=ann, workers=0)
    s = tree.series[right]
    stored, sg = store.read_volume(out, right)
    assert stored.shape == (8, 8, 16)
    extent = np.asarray(sg.shape) * sg.spacing
    assert np.allclose(extent, np.asarray(s["geometry"].shape) * s["geometry"].spacing)
    expected = resample_onto(s["labels"], s["geometry"], sg, "nearest")
    assert np.array_equal(store.read_labels(out, right), expected)


def test_mask_failures_are_per_series(tree, tmp_path):
    ok = tree.add("9000001", "RIGHT")
    far = tree.add("9000002", "LEFT")
    lost = tree.add("9000003", "RIGHT")
    ann = tree.write_splits(
        {ok: tree.add_mask(ok), far: tree.add_mask(far, shift_mm=400), lost: "masks/missing.nii.gz"}
    )
    report = run_convert(tree.raw, tmp_path / "v.zarr", parse_recipe({}), annotations=ann, workers=0)
    by_id = {r.item: r for r in report.items}
    assert by_id[ok].status == "written"
    assert (by_id[far].status, by_id[far].kind) == ("failed", "mask") and "does not overlap" in by_id[
        far
    ].message
    assert (by_id[lost].status, by_id[lost].kind) == ("failed", "not_found") and "missing.nii.gz" in by_id[
        lost
    ].message
    assert store.list_volumes(tmp_path / "v.zarr") == [ok]


def test_a_bad_mask_pattern_is_a_recipe_error_before_any_work(tree, tmp_path):
    from kneeprep.errors import RecipeError

    tree.add("9000001", "RIGHT")
    recipe = parse_recipe({"masks": {"pattern": "masks/{volume_id}_{nope}.nii.gz"}})
    with pytest.raises(RecipeError, match=r"masks.pattern .*nope"):
        run_convert(tree.raw, tmp_path / "v.zarr", recipe, workers=0)
    assert not (tmp_path / "v.zarr").exists()  # refused before the store was made
    ok = parse_recipe({"masks": {"pattern": "masks/{patient_id}/{knee_side:d}.nii.gz"}})  # format specs work
    assert run_convert(tree.raw, tmp_path / "w.zarr", ok, workers=0).counts["written"] == 1


def test_a_series_changed_after_the_scan_fails_alone(tree, tmp_path):
    vid = tree.add("9000001", "RIGHT")
    (info,) = scan_tree(tree.raw).series
    f = tree.series[vid]["files"][3]
    os.truncate(f, f.stat().st_size - 100)
    out = store.init_store(tmp_path / "v.zarr")
    r = convert_series(info, parse_recipe({}), out)
    assert r.status == "failed" and r.kind in ("dicom", "geometry") and "004" in r.message, r.message
    assert store.list_volumes(out) == []


# ----------------------------------------------------------------------------------------------------------
# the CLI, with a real local Dask cluster of one worker process


def test_cli_convert_summary_report_and_exit_codes(tree, tmp_path):
    ok = tree.add("9000001", "RIGHT")
    bad = tree.add("9000002", "LEFT")
    ann = tree.write_splits({ok: tree.add_mask(ok), bad: tree.add_mask(bad, shift_mm=400)})
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "t"\n[intensity]\nmethod = "percentile"\ndtype = "uint8"\n')
    out = tmp_path / "v.zarr"
    args = [
        "convert",
        str(tree.raw),
        str(out),
        "--recipe",
        str(recipe),
        "--annotations",
        str(ann),
        "--workers",
        "1",
    ]
    res = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "1 written, 0 skipped, 1 failed" in res.output and f"{bad}  failed   mask" in res.output
    rep = json.loads(store.report_path(out).read_text())
    assert rep["counts"] == {"written": 1, "skipped": 0, "failed": 1}
    assert rep["context"]["recipe_name"] == "t" and rep["context"]["workers"] == 1
    item = {i["item"]: i for i in rep["items"]}[ok]
    assert item["details"]["stored_bytes"] > 0 and item["details"]["read"] >= 0
    assert (
        store.read_attrs(out, ok)["normalization"]["clip_max"] > 0
        and store.read_volume(out, ok)[0].dtype == np.uint8
    )
    # fix the failing mask: the re-run converts only that one and exits 0
    tree.add_mask(bad)
    res = CliRunner().invoke(cli, [*args[:-2], "--workers", "0"])  # with progress bars, on stderr
    assert res.exit_code == 0, res.output
    assert "1 written, 1 skipped, 0 failed" in res.stdout
    # not a terminal: click prints each bar's label once (the scan's appears at its first progress call)
    assert res.stderr.split() == ["scan", "convert"], res.stderr
    # misuse is exit code 2
    assert CliRunner().invoke(cli, ["convert", str(tmp_path / "nope"), str(out)]).exit_code == 2


# ----------------------------------------------------------------------------------------------------------
# oracle: dcm2niix's NIfTI agrees with ours voxel for voxel in world space


def dcm2niix(folder: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [DCM2NIIX, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)],
        check=True,
        capture_output=True,
    )
    (nii,) = out.glob("ref*.nii")
    return nii


def assert_same_in_world(image: np.ndarray, geometry: Geometry, nii: Path):
    """Every stored voxel has the value dcm2niix's NIfTI holds at the same LPS point."""
    ref = nib.load(str(nii))
    data = np.asanyarray(ref.dataobj)
    idx = np.indices(image.shape).reshape(3, -1).T
    ras = index_to_world(geometry.affine_lps, idx) * np.array([-1.0, -1.0, 1.0])
    ijk = (ras - ref.affine[:3, 3]) @ np.linalg.inv(ref.affine[:3, :3]).T
    nearest = np.rint(ijk)
    assert np.abs(ijk - nearest).max() < 1e-3  # voxel centres coincide
    nearest = nearest.astype(int)
    assert np.all((nearest >= 0) & (nearest < np.asarray(data.shape)))
    assert np.array_equal(data[tuple(nearest.T)], image.reshape(-1))


@pytest.mark.parametrize(
    "geometry",
    [{}, {"orientation": "LPS"}, {"orientation": "RAI"}, {"orientation": "LPS", "mirror_left": True}],
    ids=["native", "LPS", "RAI", "LPS-mirrored"],
)
def test_oracle_dcm2niix_oblique_and_left_knee(tree, tmp_path, geometry):
    oblique = tree.add("9000001", "RIGHT", direction=tilt(12, 7) @ PIR)
    left = tree.add("9000002", "LEFT", direction=tilt(-4, 9) @ PIR)
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({"geometry": geometry, "intensity": {"method": "none"}})
    assert run_convert(tree.raw, out, recipe, workers=0).counts["written"] == 2
    for vid in (oblique, left):
        image, g = store.read_volume(out, vid)
        if geometry.get("orientation"):
            assert store.read_attrs(out, vid)["geometry"]["orientation"] == (
                "RPS" if geometry.get("mirror_left") and vid == left else geometry["orientation"]
            )
        assert_same_in_world(image, g, dcm2niix(tree.series[vid]["folder"], tmp_path / "nii" / vid))


@pytest.mark.parametrize("orientation", ["native", "LPS"])
def test_oracle_on_the_synth_sample(small_sample, tmp_path, orientation):
    """The generated sample end to end: every DESS converted; the most oblique right knee and a left knee agree
    with dcm2niix in world space, and each stored label sits where the sample's RAS NIfTI mask puts it."""
    truth = json.loads((small_sample / "truth.json").read_text())["volumes"]
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({"geometry": {"orientation": orientation}, "intensity": {"method": "none"}})
    report = run_convert(small_sample / "raw", out, recipe, annotations=small_sample, workers=0)
    assert report.counts["failed"] == 0, report.table()
    assert set(truth) <= set(store.list_volumes(out))
    right = max(
        (v for v in truth if truth[v]["knee_side"] == 1),
        key=lambda v: max(map(abs, truth[v]["obliquity_deg"])),
    )
    left = next(v for v in truth if truth[v]["knee_side"] == 2)
    for vid in (right, left):
        image, g = store.read_volume(out, vid)
        assert_same_in_world(image, g, dcm2niix(small_sample / truth[vid]["path"], tmp_path / "nii" / vid))
        assert_same_in_world(store.read_labels(out, vid), g, small_sample / truth[vid]["mask"])


def test_a_local_cluster_leaves_this_process_environment_as_it_was(monkeypatch):
    # Dask's nanny sets the workers' pre-spawn environment in the process that spawns them (this one)
    from kneeprep.parallel import LOCAL_WORKER_ENV, WORKER_MALLOC_ENV, executor

    names = [LOCAL_WORKER_ENV, "KNEEPREP_CODEC_THREADS", "PYTHONHASHSEED", *WORKER_MALLOC_ENV]
    for k in names:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")  # a value of the user's own is kept
    with executor(1) as ex:
        assert ex.client.run(lambda: __import__("os").environ.get(LOCAL_WORKER_ENV)) == {
            w: "1" for w in ex.client.scheduler_info()["workers"]
        }  # the workers did get it
    assert {k: os.environ.get(k) for k in names} == dict.fromkeys(names) | {"MALLOC_TRIM_THRESHOLD_": "12345"}


def test_a_run_that_writes_nothing_exits_1_saying_why(tmp_path, capsys):
    """No DICOM at all, or every selected series refused: exit 1 with one line (issue 20 point 4, issue 18)."""
    from kneeprep.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(
            [
                "convert",
                str(tmp_path / "empty"),
                str(tmp_path / "out1.zarr"),
                "--workers",
                "0",
                "--no-progress",
            ]
        )
    assert e.value.code == 1 and "convert: no DICOM series found" in capsys.readouterr().err
    tree = Tree(tmp_path / "t")
    vid = tree.add("9000001", "RIGHT")
    tree.series[vid]["files"][5].unlink()  # a missing slice: QC refuses the only series
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tree.raw), str(tmp_path / "out2.zarr"), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "convert: none of the 1 series found was written (skipped:qc 1)" in err
    tree.add("9000002", "LEFT")  # one good series: exit 0 again
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tree.raw), str(tmp_path / "out2.zarr"), "--workers", "0", "--no-progress"])
    assert e.value.code == 0, capsys.readouterr()


def test_report_source_is_absolute_when_raw_was_given_relative(tmp_path, monkeypatch):
    """The report's `source` (export's `path` column) names the series folder from anywhere (issue 18)."""
    import json

    from kneeprep.cli import main

    tree = Tree(tmp_path / "t")
    tree.add("9000003", "RIGHT")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["convert", "t/raw", "out.zarr", "--workers", "0", "--no-progress"])
    assert e.value.code == 0
    items = json.loads(store.report_path(tmp_path / "out.zarr").read_text())["items"]
    sources = [i["source"] for i in items if i["status"] == "written"]
    assert sources and all(Path(s).is_absolute() and Path(s).is_dir() for s in sources)


def test_free_text_fields_stay_out_of_the_store_unless_the_recipe_asks(tmp_path):
    """SeriesDescription, StudyDescription and ProtocolName are where sites type names (issue 19.6): read to
    select series, written nowhere by default; `[privacy] keep_free_text = true` keeps the descriptions."""
    from dataclasses import replace

    import pydicom

    from kneeprep.recipe import Recipe

    tree = Tree(tmp_path / "t")
    vid = tree.add("9000004", "RIGHT")
    for f in tree.series[vid]["files"]:
        ds = pydicom.dcmread(f)
        ds.StudyDescription = "OAI^MR^ENROLLMENT^RIGHT Dr Planted Name"
        ds.ProtocolName = "PLANTED_PROTOCOL ask Jane Roe"
        ds.save_as(f)
    tree.add("9000005", "LEFT", desc="LOCALIZER by Planted Tech", series="10000009")
    recipe = Recipe()
    run_convert(tree.raw, tmp_path / "a.zarr", recipe, workers=0)
    blob = "".join(p.read_text(errors="ignore") for p in (tmp_path / "a.zarr").rglob("*.json"))
    assert '"qc"' in blob  # the attrs are there, without the free text
    for planted in ("Planted", "PLANTED_PROTOCOL", "Jane Roe", "SAG_3D_DESS_RIGHT"):
        assert planted not in blob, planted
    keep = replace(recipe, privacy=replace(recipe.privacy, keep_free_text=True))
    assert keep.stage_hash("convert") != recipe.stage_hash("convert")  # a switch re-converts the volumes
    run_convert(tree.raw, tmp_path / "b.zarr", keep, workers=0)
    attrs = store.read_attrs(tmp_path / "b.zarr", vid)
    assert attrs["source"]["description"] == "SAG_3D_DESS_RIGHT"
    assert attrs["source"]["study_description"].endswith("Dr Planted Name")
    report = store.report_path(tmp_path / "b.zarr").read_text()
    assert "LOCALIZER by Planted Tech" in report and "PLANTED_PROTOCOL" not in report
