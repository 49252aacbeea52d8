"""A corpus of bad inputs run through ``kneeprep rebuild`` together with the good small sample.

Each bad input is a fixture named for its defect (DICOM ones from ``tests/dicom_fixtures.py``, moved to an OAI
path of their own). The test checks that each one gets a clear, named entry in the right report -- the convert
report (``volumes.zarr/report.json``: status, kind, message naming the file), the scan's unreadable list, or
the shards report (``shards/report.json``: rejection kind and message) -- and that nothing else is lost or
changed: the good volumes equal a rebuild of the sample alone (arrays, labels, attrs) and the shard files are
byte-identical.
"""

from __future__ import annotations

import builtins
import csv
import errno
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_fixtures import OAI_SERIES, SHAPE, SPACING, clean_geometry, make_fixture

from kneeprep.formats import store
from kneeprep.formats.splits import SPLIT_COLUMNS
from kneeprep.geometry import Geometry, lps_to_ras
from kneeprep.recipe import load_recipe
from kneeprep.stages.rebuild import rebuild

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"

#: DICOM defect fixture -> the patient folder it is moved to (its volume id is <pid>_00M_20040909_10693717_1)
DICOM_DEFECTS = {
    "truncated": "9100001",
    "no_pixel_data": "9100002",
    "fake_dcm": "9100003",  # a text file named scout.dcm beside a good series
    "two_series_one_folder": "9100004",
    "missing_slice": "9100005",
    "duplicate_slice": "9100006",
    "tilted_slice": "9100007",  # inconsistent orientation within the series
    "empty_file": "9100008",  # 0 bytes
}
UNREADABLE = "9100009"  # a good series with one file that cannot be opened (PermissionError, injected)
MASK_OTHER_GRID = "9100010"  # a good series whose mask is on a finer, shifted grid
MASK_UNKNOWN_LABELS = "9100011"  # a good series whose mask has labels the recipe does not know
UNICODE = "Knie Studie ümlaut ✓/série 1"  # the unicode_path fixture: spaces and non-ASCII, no OAI layout


def vid(pid: str) -> str:
    return f"{pid}_00M_20040909_10693717_1"


def _series_folder(root: Path, pid: str) -> Path:
    return root / "raw" / "00m" / "0.C.2" / pid / "20040909" / "10693717"


def _mask(path: Path, labels: np.ndarray, g: Geometry) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, lps_to_ras(g.affine_lps)), str(path))


def build_corpus(sample: Path, root: Path, scratch: Path) -> dict:
    """The sample (copied with its mtimes) plus every bad input; returns what the test needs to know."""
    for name in ("raw", "masks", "split_files"):
        shutil.copytree(
            sample / name, root / name
        )  # copy2: same names, sizes and mtimes -> same fingerprints
    for name in ("questions.json", "quintuples.jsonl"):
        shutil.copy2(sample / name, root / name)
    # every fixture derives its SeriesInstanceUID from the same clean voxels: give each copy a UID of its own
    # (same length, patched in the bytes, so truncated and empty files stay exactly as damaged)
    import pydicom

    ref = make_fixture("clean", scratch / "ref") / OAI_SERIES
    uid = pydicom.dcmread(ref / "001", stop_before_pixels=True).SeriesInstanceUID.encode()

    def place(src: Path, dst: Path, token: str) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        for f in dst.rglob("*"):
            if f.is_file() and uid in (b := f.read_bytes()):
                f.write_bytes(b.replace(uid, uid[: -len(token)] + token.encode()))

    for fixture, pid in DICOM_DEFECTS.items():
        place(make_fixture(fixture, scratch) / OAI_SERIES, _series_folder(root, pid), pid)
    for pid in (UNREADABLE, MASK_OTHER_GRID, MASK_UNKNOWN_LABELS):
        place(make_fixture("clean", scratch / pid) / OAI_SERIES, _series_folder(root, pid), pid)
    top = UNICODE.split("/")[0]
    place(make_fixture("unicode_path", scratch) / top, root / "raw" / top, "9100012")

    # masks: labels in world space on the series' grid, then written on another grid
    g = clean_geometry()
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:6, 3:15, 2:12] = 4  # femur medial central
    labels[2:7, 12:22, 8:18] = 10  # tibia medial central
    # finer grid (half the spacing), same first voxel centre: every voxel centre of the series grid is a voxel
    # centre of the mask grid, so nearest-neighbour resampling must give back exactly `labels`
    fine_shape = tuple(2 * s - 1 for s in SHAPE)
    fine_affine = g.affine_lps.copy()
    fine_affine[:3, :3] /= 2
    fine = np.zeros(fine_shape, np.uint8)
    idx = np.indices(fine_shape)
    nearest = tuple(np.clip((i + 1) // 2, 0, s - 1) for i, s in zip(idx, SHAPE, strict=True))
    fine[...] = labels[nearest]
    fine[::2, ::2, ::2] = labels  # exact on the shared centres
    _mask(
        root / "masks" / "other_grid.nii.gz",
        fine,
        Geometry(fine_shape, tuple(s / 2 for s in SPACING), fine_affine),
    )
    unknown = labels.copy()
    unknown[5:7, 18:22, 15:19] = 200  # not in the recipe's label map
    _mask(root / "masks" / "unknown_labels.nii.gz", unknown, g)
    with (root / "split_files" / "train_split.csv").open("a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=SPLIT_COLUMNS, lineterminator="\n")
        for pid, mask in (
            (MASK_OTHER_GRID, "masks/other_grid.nii.gz"),
            (MASK_UNKNOWN_LABELS, "masks/unknown_labels.nii.gz"),
        ):
            w.writerow({"patient_id": pid, "time": "00M", "study_folder": "20040909", "series_folder": "10693717",
                        "knee_side": 1, "path": "", "image_filepath": "", "label_filepath": mask})  # fmt: skip

    # annotations (extra lines): a row for a volume that does not exist; a line that is not JSON; an answer
    # that is not MOAKS JSON (both on volumes without other annotations, so no good quintuple is touched)
    lines = (root / "quintuples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    gv = "9199999_00M_20050101_12345678_1"
    ghost = first | {"volume_id": gv, "sample_id": f"{gv}_{first['question_id']}"}
    v1, v2 = vid(MASK_OTHER_GRID), vid(MASK_UNKNOWN_LABELS)
    not_json = json.dumps(first | {"volume_id": v1, "sample_id": f"{v1}_{first['question_id']}"}).replace(
        '"answer": {', '"answer": {{', 1
    )
    bad_answer = first | {
        "volume_id": v2,
        "sample_id": f"{v2}_{first['question_id']}",
        "answer": "Final diagnosis: {grade",
    }
    extra = [json.dumps(ghost), not_json, json.dumps(bad_answer)]
    (root / "quintuples.jsonl").write_text("\n".join([*lines, *extra]) + "\n")
    n = len(lines)
    return {
        "labels": labels,
        "ghost": ghost["sample_id"],
        "not_json": f"{root / 'quintuples.jsonl'}:{n + 2}",
        "bad_answer": f"{root / 'quintuples.jsonl'}:{n + 3}",
        "unreadable_file": _series_folder(root, UNREADABLE) / "004",
    }


@pytest.fixture(scope="module")
def runs(small_sample, tmp_path_factory):
    recipe = load_recipe(RECIPE)
    base = tmp_path_factory.mktemp("base")
    rebuild(
        recipe,
        small_sample / "raw",
        small_sample,
        base,
        masks=small_sample,
        workers=0,
        echo=lambda *_: None,
    )

    root = tmp_path_factory.mktemp("corpus")
    corpus = build_corpus(small_sample, root / "in", tmp_path_factory.mktemp("scratch"))
    denied = str(corpus["unreadable_file"])
    real_open = builtins.open

    def open_(file, *a, **k):  # as if chmod 000 (root reads through permissions, so inject the error)
        if str(file) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", denied)
        return real_open(file, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(builtins, "open", open_)
    try:
        out = root / "out"
        rep = rebuild(
            recipe,
            root / "in" / "raw",
            root / "in",
            out,
            masks=root / "in",
            workers=0,
            echo=lambda *_: None,
        )
    finally:
        mp.undo()
    return base, out, rep, corpus


def _convert_items(out: Path) -> dict[str, dict]:
    return {i["item"]: i for i in json.loads(store.report_path(out / "volumes.zarr").read_text())["items"]}


@pytest.mark.parametrize(
    ("defect", "status", "kinds", "names"),
    [
        ("truncated", "skipped", {"qc"}, "004: truncated: PixelData declares"),
        ("no_pixel_data", "skipped", {"qc"}, "no pixel data (PixelData (7FE0,0010) absent) in 001"),
        ("two_series_one_folder", "written", {""}, ""),  # both written, the second renamed (below)
        ("missing_slice", "skipped", {"qc"}, "missing slices: 1 slice(s) missing"),
        (
            "duplicate_slice",
            "written",
            {""},
            "QC warn: duplicate slices: 1 extra copy of the same instance dropped (e.g. 005_copy",
        ),
        ("tilted_slice", "skipped", {"qc"}, "inconsistent orientation: ImageOrientationPatient (0020,0037)"),
        ("empty_file", "skipped", {"qc"}, "004: empty file (0 bytes)"),
        ("fake_dcm", "written", {""}, ""),  # scout.dcm is listed as unreadable (below)
    ],
)
def test_each_dicom_defect_has_a_named_entry_in_the_convert_report(runs, defect, status, kinds, names):
    _, out, _, _ = runs
    items = _convert_items(out)
    item = items[vid(DICOM_DEFECTS[defect])]
    assert item["status"] == status and item["kind"] in kinds, item
    assert names in item["message"] + " ".join(item["warnings"]), item
    if status == "skipped":  # QC: the message names the series' reason; no volume
        assert item["source"].endswith(f"{DICOM_DEFECTS[defect]}/20040909/10693717")
        assert vid(DICOM_DEFECTS[defect]) not in store.list_volumes(out / "volumes.zarr")


def test_file_level_defects_are_listed_by_name(runs):
    _, out, _, corpus = runs
    ctx = json.loads(store.report_path(out / "volumes.zarr").read_text())["context"]
    unreadable = {
        Path(p).relative_to(out.parent / "in" / "raw").as_posix(): r for p, r in ctx["unreadable_files"]
    }
    base = "00m/0.C.2/{}/20040909/10693717/"
    assert "scout.dcm" in next(k for k in unreadable if k.startswith(base.format(DICOM_DEFECTS["fake_dcm"])))
    assert "empty file (0 bytes)" in unreadable[base.format(DICOM_DEFECTS["empty_file"]) + "004"]
    assert "Permission denied" in unreadable[base.format(UNREADABLE) + "004"]
    # the series with the unreadable file is not converted, and says which file
    item = _convert_items(out)[vid(UNREADABLE)]
    assert item["status"] in ("skipped", "failed") and "004" in item["message"], item
    # two series in one folder: both converted, under distinct ids
    two = [
        v
        for v in store.list_volumes(out / "volumes.zarr")
        if v.startswith(DICOM_DEFECTS["two_series_one_folder"])
    ]
    assert two == [
        vid(DICOM_DEFECTS["two_series_one_folder"]).replace("10693717", "10693717.2"),
        vid(DICOM_DEFECTS["two_series_one_folder"]),
    ]
    renamed = _convert_items(out)[two[0]]
    assert any("two series in one folder?" in w for w in renamed["warnings"]), renamed


def test_unicode_and_spaces_in_paths_convert(runs):
    _, out, _, _ = runs
    items = [i for i in _convert_items(out).values() if UNICODE in i["source"]]
    assert len(items) == 1 and items[0]["status"] == "written", items
    assert items[0]["item"] in store.list_volumes(out / "volumes.zarr")


def test_mask_on_another_grid_is_resampled_exactly(runs):
    _, out, _, corpus = runs
    v = vid(MASK_OTHER_GRID)
    assert _convert_items(out)[v]["status"] == "written"
    placed = store.read_labels(out / "volumes.zarr", v)
    assert np.array_equal(placed, corpus["labels"])
    attrs = store.read_attrs(out / "volumes.zarr", v)["labels"]["anatomy"]
    assert attrs["source"] == "other_grid.nii.gz" and sorted(attrs["acquired_geometry"]["shape"]) == [
        15,
        39,
        47,
    ]  # its own grid


def test_mask_with_unknown_labels_is_reported(runs):
    _, out, _, _ = runs
    v = vid(MASK_UNKNOWN_LABELS)
    item = _convert_items(out)[v]
    assert item["status"] == "written"
    assert any(
        "unknown_labels.nii.gz" in w and "200" in w and "not in the label map" in w for w in item["warnings"]
    ), item
    assert store.read_attrs(out / "volumes.zarr", v)["labels"]["anatomy"]["unknown_labels"] == [200]


def test_bad_annotations_are_rejected_by_name(runs):
    _, out, rep, corpus = runs
    shards = json.loads((out / "shards" / "report.json").read_text())
    rejected = {r["sample_id"]: r for r in shards["rejected_items"]}
    assert rejected[corpus["ghost"]]["reason_kind"] == "volume_missing"
    assert (
        "9199999_00M_20050101_12345678_1 is not in the volume store" in rejected[corpus["ghost"]]["message"]
    )
    assert rejected[corpus["not_json"]]["reason_kind"] == "annotation"
    assert rejected[corpus["not_json"]]["message"].startswith("json: ")
    assert rejected[corpus["bad_answer"]]["reason_kind"] == "annotation"
    assert rejected[corpus["bad_answer"]]["message"].startswith("answer: ")
    assert shards["rejected"] == {"annotation": 2, "volume_missing": 1} and shards["errors"] == 3
    assert not rep.ok  # the run says something failed (exit code 1)


def test_good_outputs_are_unchanged_by_the_bad_inputs(runs):
    base, out, _, _ = runs
    good = store.list_volumes(base / "volumes.zarr")
    assert len(good) == 5 and set(good) <= set(store.list_volumes(out / "volumes.zarr"))
    for v in good:
        a, b = store.read_volume(base / "volumes.zarr", v)[0], store.read_volume(out / "volumes.zarr", v)[0]
        assert a.dtype == b.dtype and np.array_equal(a, b), v
        assert np.array_equal(
            store.read_labels(base / "volumes.zarr", v), store.read_labels(out / "volumes.zarr", v)
        )
        assert store.read_attrs(base / "volumes.zarr", v) == store.read_attrs(out / "volumes.zarr", v), v
    # every shard file byte-identical (the manifest differs only by its inputs hash)
    m_base = json.loads((base / "shards" / "manifest.json").read_text())
    m_out = json.loads((out / "shards" / "manifest.json").read_text())
    assert m_base["shards"] == m_out["shards"] and m_base["splits"] == m_out["splits"]
    for e in m_out["shards"]:
        assert (out / "shards" / e["path"]).read_bytes() == (base / "shards" / e["path"]).read_bytes()
