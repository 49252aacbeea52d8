"""Enhanced multi-frame MR and series with several images per position (multi-echo, magnitude + phase).

Real files written by other software (nibabel's Philips enhanced MPRAGE, pydicom-data's enhanced MR in five
transfer syntaxes, heudiconv's Siemens XA30 enhanced MR), fixtures written here (kneeprep.synth: a classic
series re-written as one enhanced file, multi-echo series), each compared with dcm2niix in world space, and
the defects: a missing frame, inconsistent per-frame spacing, an echo with a missing slice, a grouping that
does not partition.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import OAI_SERIES, TAGS, clean_array, clean_geometry
from test_real_dicom import DCM2NIIX, assert_same_in_world

from kneeprep.dicom import read_series, scan_tree
from kneeprep.dicom.enhanced import _decode
from kneeprep.errors import GeometryError
from kneeprep.recipe import QC, parse_recipe
from kneeprep.synth import write_series
from kneeprep.synth.dicom_writer import make_uid
from kneeprep.synth.enhanced_writer import write_enhanced

PYDICOM_DATA = Path(pydicom.data.get_testdata_file("emri_small.dcm") or "").parent
NIBABEL_DATA = Path(importlib.util.find_spec("nibabel").origin).parent / "nicom" / "tests" / "data"
EMRI = ["emri_small.dcm", "emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm"]  # fmt: skip


def dcm2niix_all(folder: Path, out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every NIfTI dcm2niix writes for ``folder``: name -> (data, affine_lps)."""
    import nibabel as nib

    if not DCM2NIIX.exists():
        pytest.skip("dcm2niix binary not installed")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(DCM2NIIX), "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
                   check=True, capture_output=True)  # fmt: skip
    res = {}
    for p in sorted(out.glob("*.nii")):
        img = nib.load(p)
        res[p.name[:-4]] = (np.asarray(img.get_fdata()), np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine)
    return res


def _series_folder(tmp_path: Path) -> Path:
    return tmp_path / "raw" / OAI_SERIES


# ---------------------------------------------------------------------------------------------------------
# real files


def test_philips_enhanced_mprage_matches_dcm2niix_in_world_space(tmp_path):
    folder = tmp_path / "mprage"
    folder.mkdir()
    (folder / "mprage.dcm").write_bytes(
        gzip.decompress((NIBABEL_DATA / "philips_mprage.dcm.gz").read_bytes())
    )
    (s,) = scan_tree(folder).series
    assert s.qc.status == "ok", s.qc.reasons
    assert s.n_slices == 176 and (s.rows, s.cols) == (256, 256) and len(s.files) == 1 and len(s.frames) == 176
    assert s.image_set is None and s.spacing == pytest.approx((1.0, 1.0, 1.0), abs=1e-5)
    vol, geo = read_series(s)
    # per-frame PixelValueTransformationSequence slope 2.1079...: float values
    assert vol.shape == (176, 256, 256) and vol.dtype == np.float32
    (ref, ref_aff), *_ = dcm2niix_all(folder, tmp_path / "nii").values()
    assert sorted(ref.shape) == [176, 256, 256]  # dcm2niix may transpose: compared in world space
    assert_same_in_world(vol, geo.affine_lps, ref, ref_aff)  # the grids coincide (this file's pixels are 0)
    # the oblique orientation comes from the functional groups, not from a top-level element (there is none)
    assert geo.affine_lps[0, 1] == pytest.approx(-0.0337935, abs=1e-6)


def _graft_geometry(src: Path, dest: Path, order) -> None:
    """``src`` (an enhanced MR whose functional groups were stripped) with functional groups added: the
    pixel data, compressed or not, is the other software's, untouched."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(src)
    n = int(ds.NumberOfFrames)

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    shared = item(
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])]),
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.5, 0.6], SliceThickness=1.2)]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    # frame f lies at slice order[f] along +x (normal of IOP (0,1,0)/(0,0,-1) is -x: stored reversed)
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[10 + 1.2 * int(order[f]), -20, 30])]))
         for f in range(n)]
    )  # fmt: skip
    ds.SeriesDescription = "SAG_3D_DESS_LEFT"
    ds.save_as(dest)


@pytest.mark.parametrize("name", EMRI)
def test_real_compressed_frames_with_geometry_match_dcm2niix(tmp_path, name):
    """pydicom-data's enhanced MR in five transfer syntaxes (native LE/BE, RLE, JPEG 2000, JPEG-LS, as
    written by other software), geometry grafted on: the same volume each time, and dcm2niix's."""
    ref = pydicom.dcmread(PYDICOM_DATA / "emri_small.dcm").pixel_array  # decoded by pydicom: (10, 64, 64)
    ds, frames, header = _decode(PYDICOM_DATA / name, (PYDICOM_DATA / name).read_bytes())
    np.testing.assert_array_equal(frames, ref)
    folder = tmp_path / "e"
    folder.mkdir()
    _graft_geometry(PYDICOM_DATA / name, folder / "e.dcm", np.random.default_rng(3).permutation(10))
    (s,) = scan_tree(folder, QC(min_slices=4)).series
    assert s.qc.status == "ok" and s.knee_side == 2, s.qc.reasons
    vol, geo = read_series(s)
    assert vol.dtype == np.uint16 and vol.shape == (10, 64, 64)
    assert geo.spacing == pytest.approx((1.2, 0.5, 0.6))
    order = np.random.default_rng(3).permutation(10)
    # slices in position order: array index k holds the frame placed at slice k (along the normal, -x)
    expected = ref[np.argsort(order)][::-1]
    np.testing.assert_array_equal(vol, expected)
    # dcm2niix does not re-order compressed frames (it warns about fragments): for it, the frames are stored
    # in position order along the slice normal
    plain = tmp_path / "plain"
    plain.mkdir()
    _graft_geometry(PYDICOM_DATA / name, plain / "e.dcm", np.arange(10)[::-1])
    (s,) = scan_tree(plain, QC(min_slices=4)).series
    vol, geo = read_series(s)
    np.testing.assert_array_equal(vol, ref)
    (nii, nii_aff), *_ = dcm2niix_all(plain, tmp_path / "nii").values()
    assert_same_in_world(vol, geo.affine_lps, nii, nii_aff)


def test_siemens_xa30_enhanced_frames_decode_and_are_not_a_stack(tmp_path):
    spec = importlib.util.find_spec("heudiconv")
    if spec is None:
        pytest.skip("heudiconv (test data only, installed with --no-deps by `make test`) is not installed")
    src = Path(spec.origin).parent / "tests" / "data"
    src = next(src.glob("MRI_102TD_PHA_S*.dcm"))
    folder = tmp_path / "xa30"
    folder.mkdir()
    shutil.copy(src, folder / "xa30.dcm")
    ds, frames, _ = _decode(folder / "xa30.dcm", (folder / "xa30.dcm").read_bytes())
    np.testing.assert_array_equal(frames, pydicom.dcmread(src).pixel_array)
    # three MPR frames, two orientations: split by orientation, a lone frame is no volume (dcm2niix: none)
    series = scan_tree(folder, QC(min_slices=2)).series
    assert len(series) == 2 and all(s.qc.status in ("fail", "unsupported") for s in series)
    assert any("one frame (xa30.dcm frame 1)" in r for s in series for r in s.qc.reasons)


# ---------------------------------------------------------------------------------------------------------
# written here: classic -> enhanced, multi-echo


def test_enhanced_rewrite_of_a_classic_series_reads_the_same(tmp_path):
    arr, geo = clean_array(), clean_geometry()
    write_series(arr, geo, tmp_path / "classic" / OAI_SERIES, tags=TAGS)
    enh = _series_folder(tmp_path / "enh") / "enh.dcm"
    write_enhanced(arr, geo, enh, tags={"SeriesDescription": TAGS["SeriesDescription"]},
                   frame_order=[5, 2, 7, 0, 1, 6, 3, 4], rescale=[(1.0, -100.0)] * 8)  # fmt: skip
    (c,) = scan_tree(tmp_path / "classic").series
    (e,) = scan_tree(tmp_path / "enh").series
    assert e.qc.status == "ok" and e.volume_id == c.volume_id and e.frames[0] == (0, 4)  # frame 4 is slice 0
    vc, gc = read_series(c)
    ve, ge = read_series(e)
    np.testing.assert_allclose(ge.affine_lps, gc.affine_lps, atol=1e-6)
    assert ve.dtype == np.int32  # intercept -100 on 16-bit unsigned stored values
    np.testing.assert_array_equal(ve, vc.astype(np.int32) - 100)
    (nii, nii_aff), *_ = dcm2niix_all(enh.parent, tmp_path / "nii").values()
    assert_same_in_world(ve, ge.affine_lps, nii, nii_aff)


def _multi_echo(tmp_path, echoes=2, drop=None, components=None):
    """A classic series of ``echoes`` echoes (one file per slice and echo, one SeriesInstanceUID)."""
    folder = _series_folder(tmp_path)
    arrays = []
    for e in range(echoes):
        arr = (clean_array() + 1000 * e).astype(np.uint16)
        arrays.append(arr)
        tags = {**TAGS, "EchoNumbers": e + 1, "EchoTime": 5.0 * (e + 1)}
        if components:
            tags = {**TAGS, "ImageType": ["ORIGINAL", "PRIMARY", components[e], "ND"]}
        write_series(arr, clean_geometry(), folder, tags=tags, series_uid="1.2.3.4", study_uid="1.2.3",
                     frame_uid="1.2.3.5", file_names=[f"e{e + 1}_{k:03d}" for k in range(8)],
                     slice_tags=[{"SOPInstanceUID": make_uid("echo", e, k)} for k in range(8)])  # fmt: skip
    if drop:
        (folder / drop).unlink()
    return tmp_path / "raw", arrays


def test_multi_echo_series_splits_into_one_volume_per_echo_like_dcm2niix(tmp_path):
    raw, arrays = _multi_echo(tmp_path)
    series = scan_tree(raw).series
    assert [s.volume_id for s in series] == [
        "9000296_00M_20040909_10693717_1_e1",
        "9000296_00M_20040909_10693717_1_e2",
    ]
    refs = dcm2niix_all(raw, tmp_path / "nii")
    assert sorted(refs) == ["5_e1", "5_e2"]  # dcm2niix: one volume per echo too
    for e, s in enumerate(series):
        assert s.qc.status == "ok", s.qc.reasons
        assert s.image_set == {"attributes": ["EchoNumbers"], "values": [e + 1], "suffix": f"e{e + 1}",
                               "index": e + 1, "count": 2}  # fmt: skip
        assert all(f.name.startswith(f"e{e + 1}_") for f in s.files)
        vol, geo = read_series(s)
        np.testing.assert_array_equal(vol, arrays[e])  # never a mixed volume
        assert_same_in_world(vol, geo.affine_lps, *refs[f"5_e{e + 1}"])


def test_magnitude_and_phase_split_by_image_type(tmp_path):
    raw, arrays = _multi_echo(tmp_path, components=["M", "P"])
    series = scan_tree(raw).series
    assert [s.image_set["suffix"] for s in series] == ["mag", "phase"]
    assert series[1].image_set["attributes"] == ["ComplexImageComponent"]
    np.testing.assert_array_equal(read_series(series[1])[0], arrays[1])


@pytest.mark.parametrize("rle", [False, True])
def test_enhanced_multi_echo_splits_and_matches_dcm2niix_4d(tmp_path, rle):
    a, geo = clean_array(), clean_geometry()
    b = (a + 500).astype(np.uint16)
    tags = {"SeriesDescription": TAGS["SeriesDescription"]}
    # frames shuffled: kneeprep orders them by echo and position
    shuffled = _series_folder(tmp_path / "shuffled") / "me.dcm"
    write_enhanced(
        [a, b], geo, shuffled, tags=tags, frame_order=np.random.default_rng(1).permutation(16), rle=rle
    )
    series = scan_tree(tmp_path / "shuffled" / "raw").series
    assert [s.image_set["suffix"] for s in series] == ["e1", "e2"]
    assert series[0].image_set["attributes"] == ["EffectiveEchoTime"] and series[1].image_set["values"] == [
        4.0
    ]
    for s, truth in zip(series, (a, b), strict=True):
        np.testing.assert_array_equal(read_series(s)[0], truth)
    # dcm2niix writes one volume per echo too; it does not re-order compressed frames, so it reads a file
    # stored echo by echo in position order
    path = _series_folder(tmp_path) / "me.dcm"
    write_enhanced([a, b], geo, path, tags=tags, rle=rle)
    refs = dcm2niix_all(path.parent, tmp_path / "nii")
    assert sorted(refs) == ["1_e1", "1_e2"]
    for s in scan_tree(tmp_path / "raw").series:
        vol, g = read_series(s)
        assert_same_in_world(vol, g.affine_lps, *refs[f"1_{s.image_set['suffix']}"])


# ---------------------------------------------------------------------------------------------------------
# defects


def test_missing_frame_fails_naming_the_frames(tmp_path):
    path = _series_folder(tmp_path) / "enh.dcm"
    write_enhanced(clean_array(), clean_geometry(), path, drop=[4])
    (s,) = scan_tree(tmp_path / "raw").series
    assert s.qc.status == "fail"
    assert s.qc.first_reason.startswith("missing slices: 1 slice(s) missing at the 0.7 mm spacing")
    assert "between enh.dcm frame 4 " in s.qc.first_reason and "and enh.dcm frame 5 " in s.qc.first_reason
    with pytest.raises(GeometryError, match="missing slices"):
        read_series(s)


def test_inconsistent_per_frame_pixel_spacing_fails(tmp_path):
    path = _series_folder(tmp_path) / "enh.dcm"
    bad = {"PixelMeasuresSequence": {"PixelSpacing": [0.5, 0.45], "SliceThickness": 0.7}}
    write_enhanced(clean_array(), clean_geometry(), path, frame_items={6: bad})
    (s,) = scan_tree(tmp_path / "raw").series
    assert s.qc.status == "fail"
    assert any(r.startswith("inconsistent pixel spacing: PixelSpacing (0028,0030) [0.5, 0.45] in enh.dcm frame 7")
               for r in s.qc.reasons), s.qc.reasons  # fmt: skip


def test_frame_count_that_disagrees_with_the_functional_groups_is_unreadable(tmp_path):
    path = _series_folder(tmp_path) / "enh.dcm"
    write_enhanced(clean_array(), clean_geometry(), path, tags={"NumberOfFrames": 9})
    r = scan_tree(tmp_path / "raw")
    assert [(p.name, why) for p, why in r.unreadable] == [
        ("enh.dcm", "PerFrameFunctionalGroupsSequence (5200,9230) has 8 items but NumberOfFrames (0028,0008) "
                    "is 9: a frame's functional groups are missing")
    ]  # fmt: skip


def test_echo_with_a_missing_slice_fails_alone(tmp_path):
    raw, arrays = _multi_echo(tmp_path, drop="e2_003")
    e1, e2 = scan_tree(raw).series
    assert e1.qc.status == "ok" and e1.image_set["suffix"] == "e1"
    assert e2.qc.status == "fail" and e2.qc.first_reason.startswith("missing slices: 1 slice(s) missing")
    np.testing.assert_array_equal(read_series(e1)[0], arrays[0])


def test_grouping_that_does_not_partition_is_refused(tmp_path):
    # two images per position, but EchoNumbers put both images of slice 2 into echo 1: no clean partition
    folder = _series_folder(tmp_path)
    for e in range(2):
        numbers = [
            {"EchoNumbers": (1 if k == 2 else e + 1), "SOPInstanceUID": make_uid(e, k)} for k in range(8)
        ]
        write_series(clean_array(), clean_geometry(), folder, tags=TAGS, series_uid="1.2.3.4", study_uid="1.2.3",
                     frame_uid="1.2.3.5", file_names=[f"e{e + 1}_{k:03d}" for k in range(8)],
                     slice_tags=numbers)  # fmt: skip
    (s,) = scan_tree(tmp_path / "raw").series
    assert s.qc.status == "unsupported" and s.image_set is None
    assert s.qc.first_reason.startswith(
        "image sets do not partition: slice positions hold up to 2 distinct images and no attribute"
    )
    assert "varying: EchoNumbers 2 values" in s.qc.first_reason


# ---------------------------------------------------------------------------------------------------------
# convert: the recipe option, attrs


def test_convert_writes_each_echo_and_the_recipe_selects(tmp_path):
    from kneeprep.formats.store import list_volumes, read_attrs
    from kneeprep.stages.convert import run_convert

    raw, arrays = _multi_echo(tmp_path, echoes=3)
    store = tmp_path / "all.zarr"
    report = run_convert(raw, store, parse_recipe({}), workers=0, progress=False)
    assert report.counts["written"] == 3
    assert list_volumes(store) == [f"9000296_00M_20040909_10693717_1_e{e}" for e in (1, 2, 3)]
    attrs = read_attrs(store, "9000296_00M_20040909_10693717_1_e3")
    assert attrs["image_set"]["attributes"] == ["EchoNumbers"] and attrs["image_set"]["values"] == [3]
    assert attrs["source"]["n_files"] == 8
    first = run_convert(raw, tmp_path / "first.zarr", parse_recipe({"select": {"image_sets": "first"}}),
                        workers=0, progress=False)  # fmt: skip
    assert list_volumes(tmp_path / "first.zarr") == ["9000296_00M_20040909_10693717_1_e1"]
    skipped = [r for r in first.items if r.status == "skipped"]
    assert {r.message for r in skipped} == {
        "image set e2 (2 of 3) not selected by select.image_sets",
        "image set e3 (3 of 3) not selected by select.image_sets",
    }
    run_convert(
        raw,
        tmp_path / "re.zarr",
        parse_recipe({"select": {"image_sets": "e[23]"}}),
        workers=0,
        progress=False,
    )
    assert [v[-2:] for v in list_volumes(tmp_path / "re.zarr")] == ["e2", "e3"]


def test_image_sets_option_is_checked_and_its_default_keeps_recipe_hashes():
    from kneeprep.errors import RecipeError

    with pytest.raises(RecipeError, match=r"select.image_sets: not a valid regex"):
        parse_recipe({"select": {"image_sets": "e(1"}})
    default = parse_recipe({})
    assert default.stage_hash("convert") == parse_recipe({"select": {"image_sets": "all"}}).stage_hash(
        "convert"
    )
    assert default.stage_hash("convert") != parse_recipe({"select": {"image_sets": "first"}}).stage_hash(
        "convert"
    )
    assert "image_sets" not in default._hashed()["select"]


# ---------------------------------------------------------------------------------------------------------
# repeated acquisitions (AcquisitionNumber); the real Siemens series: tests/test_multiecho_real.py


def _repeated(tmp_path, acq_numbers):
    """A classic series of two images per position; ``acq_numbers(r, k)``: AcquisitionNumber of repeat r's
    slice k."""
    folder = _series_folder(tmp_path)
    arrays = []
    for r in range(2):
        arr = (clean_array() + 500 * r).astype(np.uint16)
        arrays.append(arr)
        write_series(arr, clean_geometry(), folder, tags=TAGS, series_uid="1.2.3.4", study_uid="1.2.3",
                     frame_uid="1.2.3.5", file_names=[f"r{r + 1}_{k:03d}" for k in range(8)],
                     slice_tags=[{"AcquisitionNumber": acq_numbers(r, k), "SOPInstanceUID": make_uid("acq", r, k)}
                                 for k in range(8)])  # fmt: skip
    return tmp_path / "raw", arrays


def test_repeated_acquisitions_split_by_acquisition_number_and_the_recipe_selects(tmp_path):
    from kneeprep.formats.store import list_volumes, read_attrs
    from kneeprep.stages.convert import run_convert

    raw, arrays = _repeated(tmp_path, lambda r, k: r + 1)
    a1, a2 = scan_tree(raw).series
    assert (a1.image_set["suffix"], a2.image_set["suffix"]) == ("a1", "a2")
    assert a2.image_set["attributes"] == ["AcquisitionNumber"] and a2.image_set["values"] == [2]
    np.testing.assert_array_equal(read_series(a2)[0], arrays[1])
    run_convert(raw, tmp_path / "a2.zarr", parse_recipe({"select": {"image_sets": "a2"}}), workers=0,
                progress=False)  # fmt: skip
    (vid,) = list_volumes(tmp_path / "a2.zarr")
    assert vid == "9000296_00M_20040909_10693717_1_a2"
    assert read_attrs(tmp_path / "a2.zarr", vid)["image_set"]["values"] == [2]


def test_acquisition_number_per_slice_leaves_a_series_and_its_echoes_alone(tmp_path):
    # a plain series whose slices each carry their own AcquisitionNumber (some scanners number 2D slices so)
    write_series(clean_array(), clean_geometry(), _series_folder(tmp_path / "one"), tags=TAGS,
                 slice_tags=[{"AcquisitionNumber": k + 1} for k in range(8)])  # fmt: skip
    (s,) = scan_tree(tmp_path / "one" / "raw").series
    assert s.qc.status == "ok" and s.image_set is None and s.n_slices == 8
    # two echoes, AcquisitionNumber per slice (same in both echoes): split by echo, not by echo x acquisition
    folder = _series_folder(tmp_path / "two")
    for e in range(2):
        write_series(clean_array(), clean_geometry(), folder, tags={**TAGS, "EchoNumbers": e + 1},
                     series_uid="1.2.3.4", study_uid="1.2.3", frame_uid="1.2.3.5",
                     file_names=[f"e{e + 1}_{k:03d}" for k in range(8)],
                     slice_tags=[{"AcquisitionNumber": k + 1, "SOPInstanceUID": make_uid("ek", e, k)}
                                 for k in range(8)])  # fmt: skip
    sets = scan_tree(tmp_path / "two" / "raw").series
    assert [x.image_set["suffix"] for x in sets] == ["e1", "e2"]
    assert all(x.qc.status == "ok" and x.image_set["attributes"] == ["EchoNumbers"] for x in sets)


def test_acquisition_numbers_that_do_not_partition_are_refused(tmp_path):
    # both images of slice 2 are acquisition 1: no clean partition, refused, not mixed
    raw, _ = _repeated(tmp_path, lambda r, k: 1 if k == 2 else r + 1)
    (s,) = scan_tree(raw).series
    assert s.qc.status == "unsupported" and s.image_set is None
    assert "do not partition" in s.qc.first_reason and "AcquisitionNumber 2 values" in s.qc.first_reason
