"""scan: defect fixtures get the right verdict and reason; ids, records and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from dicom_fixtures import OAI_SERIES, clean_geometry, make_fixture

from kneeprep.dicom import QCVerdict, ScanResult, SeriesInfo, scan_tree, technical_fields
from kneeprep.dicom.fields import TECHNICAL_KEYWORDS
from kneeprep.recipe import QC

VID = "9000296_00M_20040909_10693717_1"


def one(result: ScanResult) -> SeriesInfo:
    assert len(result.series) == 1, [s.volume_id for s in result.series]
    return result.series[0]


@pytest.mark.parametrize(
    "name, status, reason, n_slices",
    [
        ("clean", "ok", None, 8),
        ("missing_slice", "fail", "missing slices: 1 slice(s) missing at the 0.7 mm spacing", 7),
        ("duplicate_slice", "warn", "duplicate slices: 1 extra copy of the same instance dropped", 8),
        (
            "duplicate_position",
            "fail",
            "duplicate slice positions: 1 position(s) hold more than one distinct image",
            8,
        ),
        ("shuffled_names", "ok", None, 8),
        (
            "truncated",
            "fail",
            "1 file(s) with incomplete pixel data dropped: 004: truncated: PixelData declares 960 bytes",
            7,
        ),
        ("junk", "ok", None, 8),
        ("no_pixel_data", "unsupported", "no pixel data (PixelData (7FE0,0010) absent)", 8),
        ("fake_dcm", "ok", None, 8),
        (
            "tilted_slice",
            "fail",
            "inconsistent orientation: ImageOrientationPatient (0020,0037) varies by up to 0.01",
            8,
        ),
        (
            "empty_file",
            "fail",
            "1 unreadable file(s) in the series folder dropped: 004: empty file (0 bytes)",
            7,
        ),
    ],
)
def test_defect_verdicts(tmp_path, name, status, reason, n_slices):
    s = one(scan_tree(make_fixture(name, tmp_path)))
    assert s.qc.status == status, s.qc
    if reason is None:
        assert s.qc.reasons == ()
    else:
        assert s.qc.first_reason.startswith(reason), s.qc.reasons
    assert s.n_slices == n_slices == len(s.files)


def test_clean_series_record(tmp_path):
    s = one(scan_tree(make_fixture("clean", tmp_path)))
    g = clean_geometry()
    assert s.volume_id == VID and s.id_source == "path"
    assert (s.patient_id, s.time, s.study_folder, s.series_folder, s.knee_side) == (
        "9000296",
        "00M",
        "20040909",
        "10693717",
        1,
    )
    assert (s.rows, s.cols, s.n_slices) == (24, 20, 8)
    assert s.spacing == pytest.approx((0.7, 0.5, 0.4))
    np.testing.assert_allclose(np.array(s.affine_lps), g.affine_lps, atol=1e-6)
    assert s.orientation_code == "PIR" and s.modality == "MR" and s.transfer_syntax == "1.2.840.10008.1.2.1"
    assert [p.name for p in s.files] == [f"{k:03d}" for k in range(1, 9)]


def test_missing_slice_says_where(tmp_path):
    s = one(scan_tree(make_fixture("missing_slice", tmp_path)))
    assert (
        "between 003" in s.qc.reasons[0] and "and 005" in s.qc.reasons[0] and "1.4 mm step" in s.qc.reasons[0]
    )
    assert "too few slices: 7 < min_slices 8" in s.qc.reasons


def test_duplicates_say_which_is_kept(tmp_path):
    s = one(scan_tree(make_fixture("duplicate_slice", tmp_path)))
    assert [(p.name, r.split(":")[0]) for p, r in s.dropped] == [("005_copy", "duplicate of 005")]
    assert "kept the first by file name" in s.dropped[0][1]
    s = one(scan_tree(make_fixture("duplicate_position", tmp_path)))
    assert [p.name for p in s.files][4] == "005b"
    assert s.dropped[0][0].name == "005" and "higher InstanceNumber (99)" in s.dropped[0][1]


def test_shuffled_names_recovered_from_positions(tmp_path):
    s = one(scan_tree(make_fixture("shuffled_names", tmp_path)))
    # file_names[k] holds slice k: positions order the files, not their names
    assert [p.name for p in s.files] == ["005", "002", "008", "001", "007", "003", "006", "004"]


def test_two_series_in_one_folder_get_distinct_ids(tmp_path):
    r = scan_tree(make_fixture("two_series_one_folder", tmp_path))
    assert len(r.series) == 2 and len({s.series_uid for s in r.series}) == 2
    by_n = {s.n_slices: s for s in r.series}
    assert by_n[10].volume_id == VID and by_n[10].qc.status == "ok"  # the larger keeps the plain id
    assert by_n[8].volume_id == "9000296_00M_20040909_10693717.2_1"
    assert by_n[8].qc.status == "warn" and "is taken by another series" in by_n[8].qc.reasons[-1]
    assert {p.name[0] for p in by_n[8].files} == {"a"}


def test_junk_counted_not_failing(tmp_path):
    r = scan_tree(make_fixture("junk", tmp_path))
    assert r.non_dicom_skipped == 3 and r.unreadable == () and r.n_files == 11


def test_fake_dcm_is_unreadable_but_not_a_lost_slice(tmp_path):
    r = scan_tree(make_fixture("fake_dcm", tmp_path))
    assert [(p.name, why.split(" (")[0]) for p, why in r.unreadable] == [
        ("scout.dcm", "named .dcm but not DICOM")
    ]
    assert r.non_dicom_skipped == 0 and one(r).dropped == ()


def test_empty_file_is_dropped_from_its_series(tmp_path):
    r = scan_tree(make_fixture("empty_file", tmp_path))
    assert [(p.name, why) for p, why in r.unreadable] == [("004", "empty file (0 bytes)")]
    assert [(p.name, why) for p, why in one(r).dropped] == [("004", "empty file (0 bytes)")]
    assert any(x.startswith("missing slices") for x in one(r).qc.reasons)


def test_unicode_and_spaces_fall_back_to_tag_ids(tmp_path):
    s = one(scan_tree(make_fixture("unicode_path", tmp_path)))
    assert s.qc.status == "ok" and s.id_source == "tags"
    assert s.volume_id == "9000296_NA_20040909_5_2"  # PatientID, no visit tag, StudyDate, SeriesNumber, LEFT
    assert "série 1" in str(s.files[0])


def test_tolerances_are_parameters(tmp_path):
    root = make_fixture("tilted_slice", tmp_path)
    assert one(scan_tree(root, QC(orientation_atol=0.02))).qc.status == "ok"
    root = make_fixture("missing_slice", tmp_path)
    assert "too few slices" not in " ".join(one(scan_tree(root, QC(min_slices=3))).qc.reasons)


def test_orientation_split_of_one_uid(tmp_path, synth_series):
    # One UID, two clearly different planes: split into two series, not one broken stack.
    from kneeprep.dicom.read import read_series

    a = synth_series(tmp_path / "raw" / "x", series_uid="1.2.3.4", file_names=[f"s{k}" for k in range(8)])
    synth_series(
        tmp_path / "raw" / "x", shape=(4, 32, 32), series_uid="1.2.3.4", direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
        file_names=[f"t{k}" for k in range(4)],
    )  # fmt: skip
    r = scan_tree(tmp_path / "raw")
    assert [s.n_slices for s in sorted(r.series, key=lambda s: -s.n_slices)] == [8, 4]
    big = max(r.series, key=lambda s: s.n_slices)
    assert big.qc.status == "warn" and "split into 2 series" in big.qc.first_reason
    vol, _ = read_series(big)
    assert np.array_equal(vol, a.array)


def test_records_round_trip_json(tmp_path):
    r = scan_tree(make_fixture("duplicate_slice", tmp_path))
    again = ScanResult.from_json(json.loads(json.dumps(r.to_json())))
    assert again == r
    with pytest.raises(ValueError, match="status must be one of"):
        QCVerdict("bad")


def test_records_round_trip_pickle_compactly(tmp_path):
    """What crosses the wire (scan results, convert tasks): equal after pickling, files still ``Path`` objects
    in their order (folders interleaved, a file at the root, a relative one); the technical fields plain
    JSON values (a UID read by pydicom as its dotted string, not pydicom's ``UID`` class)."""
    import dataclasses
    import pickle

    s = scan_tree(make_fixture("clean", tmp_path)).series[0]
    assert s.technical and all(type(v) in (str, int, float, list) for v in s.technical.values())
    odd = (Path("/top"), Path("a/b/1"), Path("a/c/2"), Path("a/b/3"), Path("rel"))
    for info in (s, dataclasses.replace(s, files=odd)):
        back = pickle.loads(pickle.dumps(info))
        assert back == info and back.files == info.files and all(type(f) is type(Path()) for f in back.files)
    assert len(pickle.dumps(s)) < len(pickle.dumps(s.to_json()))


def test_technical_fields_whitelist_only(tmp_path):
    import pydicom

    root = make_fixture("clean", tmp_path)
    ds = pydicom.dcmread(root / OAI_SERIES / "001", stop_before_pixels=True)
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19500101"
    ds.InstitutionName = "Some Hospital"
    ds.AccessionNumber = "A123"
    ds.ReferringPhysicianName = "Who^Dr"
    ds.MagneticFieldStrength = 3
    ds.Manufacturer = "Siemens"
    t = technical_fields(ds)
    assert set(t) <= set(TECHNICAL_KEYWORDS) | {"TransferSyntaxUID"}
    assert (
        t["MagneticFieldStrength"] == 3.0
        and t["Manufacturer"] == "Siemens"
        and t["PixelSpacing"] == [0.5, 0.4]
    )
    text = json.dumps(t)
    for secret in ("Doe", "1950", "Hospital", "A123", "9000296", ds.SOPInstanceUID, ds.StudyInstanceUID):
        assert secret not in text


def test_scan_missing_root_raises(tmp_path):
    from kneeprep.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="raw DICOM folder not found"):
        scan_tree(tmp_path / "nope")


def test_progress_is_reported(tmp_path):
    from kneeprep.dicom.scan_tasks import plan

    calls = []
    root = make_fixture("junk", tmp_path)
    scan_tree(root, progress=lambda done, total: calls.append((done, total)))
    n = len(plan(root))  # progress counts the parts of the tree, a task reads one or more
    assert n > 1 and calls[0] == (0, n) and calls[-1] == (n, n)
    done = [d for d, _ in calls]
    assert done == sorted(set(done)) and {t for _, t in calls} == {n}


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_scan_prints_table_and_writes_parquet(tmp_path):
    from kneeprep.cli import cli

    root = make_fixture("missing_slice", tmp_path)
    out = tmp_path / "scan.parquet"
    res = CliRunner().invoke(cli, ["scan", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert VID in res.output and "fail: missing slices" in res.output
    assert (
        "1 series in 7 files: 0 ok, 0 warn, 1 fail, 0 unsupported; 0 non-DICOM file(s) skipped" in res.output
    )
    t = pq.read_table(out).to_pylist()
    assert len(t) == 1 and t[0]["volume_id"] == VID and t[0]["qc_status"] == "fail"
    assert t[0]["qc_reasons"].startswith("missing slices") and " | too few slices" in t[0]["qc_reasons"]
    assert t[0]["n_slices"] == 7 and t[0]["orientation_code"] == "PIR"
    assert res.stderr.split() == ["scan"]  # the progress bar (not a terminal: its label once), on stderr
    quiet = CliRunner().invoke(cli, ["scan", str(root), "--no-progress"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_cli_scan_csv_recipe_and_errors(tmp_path):
    import csv

    from kneeprep.cli import cli

    root = make_fixture("missing_slice", tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[qc]\nmin_slices = 2\n")
    out = tmp_path / "scan.csv"
    res = CliRunner().invoke(cli, ["scan", str(root), "-o", str(out), "--recipe", str(recipe), "-q"])
    assert res.exit_code == 0, res.output
    assert VID not in res.output  # --quiet: summary only
    rows = list(csv.DictReader(out.open()))
    assert "too few slices" not in rows[0]["qc_reasons"] and rows[0]["qc_status"] == "fail"
    assert CliRunner().invoke(cli, ["scan", str(root), "-o", str(tmp_path / "x.txt")]).exit_code == 2
    assert CliRunner().invoke(cli, ["scan", str(tmp_path / "missing")]).exit_code == 2
    help_ = CliRunner().invoke(cli, ["scan", "--help"])
    assert help_.exit_code == 0 and "QC failures are information" in help_.output


# ----------------------------------------------------------------------------------------------------------
# the fast header path agrees with pydicom


def _compare_header_paths(files) -> tuple[int, int]:
    """For each file: the fast path either declines (None) or gives exactly pydicom's record; a file pydicom
    cannot read is never parsed by the fast path. Returns (files parsed fast, files left to pydicom)."""
    from kneeprep.dicom.headers import DicomError, _fast_header, read_header

    fast = declined = 0
    for p in files:
        try:
            ref = read_header(p, fast=False)
        except DicomError:
            assert _fast_header(p, p.stat().st_size) is None, p
            continue
        got = _fast_header(p, p.stat().st_size)
        if got is None:
            declined += 1
        else:
            fast += 1
            assert got == ref, (p, {k: (getattr(got, k), getattr(ref, k)) for k in ref.__dataclass_fields__})
    return fast, declined


def test_fast_header_path_equals_pydicom_on_files_other_software_wrote():
    import warnings

    import nibabel
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files", Path(nibabel.__file__).parent / "nicom"]
    files = [
        p
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the odd files among them
        fast, declined = _compare_header_paths(files)
    # most are plain Little Endian files (measured: 113 fast, 58 declined); compressed, big endian, deflated and
    # non-Latin character sets are left to pydicom
    assert fast >= 100 and declined >= 20, (fast, declined)


def test_fast_header_path_on_every_defect_fixture_and_on_hard_headers(tmp_path):
    import pydicom
    from dicom_fixtures import FIXTURES
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    files = [p for name in FIXTURES for p in sorted(make_fixture(name, tmp_path).rglob("*")) if p.is_file()]
    fast, _ = _compare_header_paths(files)
    assert fast >= len(FIXTURES) * 6  # the clean slices of every fixture go the fast way
    # a header larger than the first read, nested undefined-length sequences, and Implicit VR Little Endian
    src = make_fixture("clean", tmp_path / "hard") / OAI_SERIES / "001"
    ds = pydicom.dcmread(src)
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    item = Dataset()
    item.CodeMeaning = "x" * 40
    item.ReferencedImageSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([item, item])
    ds["ProcedureCodeSequence"].is_undefined_length = True  # written with delimiters, as scanners often do
    item["ReferencedImageSequence"].is_undefined_length = True
    for it in (item, inner):
        it.is_undefined_length_sequence_item = True
    ds.add_new((0x0029, 0x0010), "LO", "KNEEPREP TEST")
    ds.add_new((0x0029, 0x1010), "OB", bytes(70_000))  # like a Siemens CSA header, before the pixels
    big = tmp_path / "big"
    ds.save_as(big)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = tmp_path / "implicit"
    ds.save_as(implicit, enforce_file_format=True)
    assert (
        pydicom.dcmread(implicit).ProcedureCodeSequence[1].ReferencedImageSequence[0].ReferencedSOPInstanceUID
    )
    raw = big.read_bytes()
    assert b"\xfe\xff\xdd\xe0" in raw and b"\xfe\xff\x0d\xe0" in raw  # sequence and item delimiters
    assert _compare_header_paths([big, implicit]) == (2, 0)
