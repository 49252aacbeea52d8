"""The volume store as an OME-Zarr 0.5 collection, checked by an independent implementation (ome-zarr-models):
the root is a bioformats2raw collection listing every volume, each volume and label layer validates, the
transforms put each voxel where its DICOM ImagePositionPatient says, zarr lists the store without a warning,
and a store in the older layout is read as it is and upgraded by the next convert run."""

from __future__ import annotations

import doctest
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.bioformats2raw import BioFormats2Raw
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from ome_zarr_models.v05.labels import Labels

from kneeprep.errors import StoreError
from kneeprep.files import LOCK_FILE
from kneeprep.formats import ome, store
from kneeprep.formats.box import BOXES_TABLE
from kneeprep.geometry import Geometry, affine_from_itk
from kneeprep.recipe import load_recipe
from kneeprep.stages.convert import run_convert


def _convert(sample: Path, out: Path):
    return run_convert(
        sample / "raw", out, load_recipe("3dreasonknee"), annotations=sample, masks=sample, workers=0
    )


@pytest.fixture(scope="module")
def converted(small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("ome") / "volumes.zarr"
    report = _convert(small_sample, out)
    assert report.counts["written"] >= 2
    return out, report


def _tree(root: Path) -> dict[str, dict]:
    """Every zarr.json under ``root`` (relative path -> document)."""
    return {
        p.relative_to(root).as_posix(): json.loads(p.read_text()) for p in sorted(root.rglob("zarr.json"))
    }


def test_doctests():
    assert doctest.testmod(ome).failed == 0


def test_root_and_every_volume_validate_with_ome_zarr_models(converted):
    out, _ = converted
    vids = store.list_volumes(out)
    root = zarr.open_group(str(out), mode="r")
    b2r = BioFormats2Raw.from_zarr(root)
    assert b2r.attributes.ome.bioformats2raw_layout == 3 and b2r.attributes.ome.version == "0.5"
    series = root[ome.OME_GROUP].attrs["ome"]["series"]
    assert series == vids and ome.OME_GROUP not in vids
    for vid in series:
        image = Image.from_zarr(root[vid])
        assert isinstance(open_ome_zarr(root[vid]), Image)
        (ms,) = image.attributes.ome.multiscales
        assert [t.type for t in ms.datasets[0].coordinateTransformations] == ["scale", "translation"]
        labels = Labels.from_zarr(root[vid]["labels"])
        names = labels.attributes.ome.labels
        assert names == store.label_names(out, vid) and names
        for name in names:
            layer = ImageLabel.from_zarr(root[vid]["labels"][name])
            (lds,) = layer.attributes.ome.multiscales[0].datasets
            assert (
                lds.path == "0" and lds.coordinateTransformations == ms.datasets[0].coordinateTransformations
            )


def _ome_position(g: Geometry, transforms: list[dict], index) -> np.ndarray:
    """LPS position of ``index`` from the OME transforms alone (scale, then translation), via ome_to_lps."""
    scale, translation = (np.asarray(t[t["type"]], dtype=np.float64) for t in transforms)
    c = scale * np.asarray(index, dtype=np.float64) + translation
    return (ome.ome_to_lps(g) @ np.append(c, 1.0))[:3]


def test_translation_puts_voxel_zero_at_the_dicom_image_position(converted):
    out, report = converted
    folders = {r.item: Path(r.source) for r in report.items if r.status == "written"}
    for vid, folder in folders.items():
        attrs = store.read_attrs(out, vid)
        g = Geometry.from_json(attrs["geometry"])
        meta = json.loads((out / vid / "zarr.json").read_text())["attributes"]["ome"]
        transforms = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        positions = [
            np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, dtype=np.float64)
            for f in sorted(folder.iterdir())
            if f.is_file() and not f.name.endswith(".csv")
        ]
        assert len(positions) == g.shape[0]
        # the slice at array index 0 (the sample's series are slightly oblique: found through affine_lps)
        first = min(positions, key=lambda p: float(g.world_to_index(p)[0]))
        assert np.allclose(g.world_to_index(first), 0, atol=1e-6), vid
        assert np.allclose(_ome_position(g, transforms, (0, 0, 0)), first, atol=1e-6), vid
        assert ome.world_axes(g) == ((0, -1), (2, -1), (1, 1))  # PIR: slices toward R, rows I, columns P


def test_every_voxel_of_an_axis_aligned_volume_is_where_affine_lps_puts_it(tmp_path):
    st = store.init_store(tmp_path / "v.zarr")
    for code, direction in {
        "PIR": (0, 0, -1, 1, 0, 0, 0, -1, 0),
        "RPS": (-1, 0, 0, 0, 1, 0, 0, 0, 1),
    }.items():
        g = Geometry((5, 6, 7), (0.7, 0.4, 0.3), affine_from_itk((12.5, -40, 33), (0.3, 0.4, 0.7), direction))
        assert g.orientation == code
        store.write_volume(st, code, np.zeros(g.shape, np.uint8), g, {})
        meta = json.loads((st / code / "zarr.json").read_text())["attributes"]["ome"]
        transforms = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        index = np.stack(np.meshgrid(*(np.arange(n) for n in g.shape), indexing="ij"), -1).reshape(-1, 3)
        got = np.array([_ome_position(g, transforms, i) for i in index])
        assert np.allclose(got, g.index_to_world(index), atol=1e-9), code


def test_an_oblique_volume_is_exact_at_voxel_zero_and_its_frame_is_a_rotation():
    c, s = np.cos(0.3), np.sin(0.3)
    g = Geometry(
        (4, 5, 6), (2.0, 0.5, 0.5), affine_from_itk((7, -8, 9), (0.5, 0.5, 2.0), (c, 0, s, 0, 1, 0, -s, 0, c))
    )
    m = ome.ome_to_lps(g)[:3, :3]
    assert np.allclose(m @ m.T, np.eye(3)) and sorted(map(tuple, np.abs(m))) == sorted(map(tuple, np.eye(3)))
    t = ome.image_attrs("v", g)["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert np.allclose(_ome_position(g, t, (0, 0, 0)), [7, -8, 9])
    assert not np.allclose(_ome_position(g, t, (3, 0, 0)), g.index_to_world((3, 0, 0)))  # 0.5 has no rotation


def test_zarr_lists_the_store_without_a_warning(converted):
    out, _ = converted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = zarr.open_group(str(out), mode="r")
        members = dict(root.members(max_depth=None))
    assert set(store.list_volumes(out)) | {ome.OME_GROUP} == {k for k in members if "/" not in k}
    side = store.kneeprep_dir(out)
    assert side.name == "volumes.zarr.kneeprep"
    assert {p.name for p in side.iterdir()} >= {store.REPORT_NAME, BOXES_TABLE, LOCK_FILE}
    assert store.report_path(out) == store.find_report(out) == side / store.REPORT_NAME


def test_the_listing_follows_writes_and_deletes_and_ome_is_never_a_volume(tmp_path):
    st = store.init_store(tmp_path / "v.zarr")
    meta = st / ome.OME_GROUP / "zarr.json"
    assert json.loads(meta.read_text())["attributes"]["ome"]["series"] == []
    g = Geometry((2, 3, 4), (1.0, 1.0, 1.0), np.eye(4))
    for vid in ("b", "a"):
        store.write_volume(st, vid, np.zeros(g.shape, np.uint8), g, {})
    assert (
        store.sync_collection(st) == ["a", "b"] == json.loads(meta.read_text())["attributes"]["ome"]["series"]
    )
    before = meta.stat().st_mtime_ns
    store.sync_collection(st)
    assert meta.stat().st_mtime_ns == before  # unchanged: not rewritten
    store.delete_volume(st, "a")
    assert store.sync_collection(st) == ["b"]
    BioFormats2Raw.from_zarr(zarr.open_group(str(st), mode="r"))
    with pytest.raises(StoreError, match="bad volume id 'OME'"):
        store.write_volume(st, ome.OME_GROUP, np.zeros(g.shape, np.uint8), g, {})


def _downgrade(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst`` as kneeprep wrote stores before the OME collection: kneeprep's files inside,
    no root OME metadata, scale-only transforms."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / ome.OME_GROUP)
    for p in dst.rglob("zarr.json"):
        doc = json.loads(p.read_text())
        attrs = doc.get("attributes", {})
        attrs.get("ome", {}).pop("bioformats2raw.layout", None)
        if attrs.get("ome") == {"version": "0.5"}:
            del attrs["ome"]
        for ms in attrs.get("ome", {}).get("multiscales", []):
            for d in ms["datasets"]:
                d["coordinateTransformations"] = d["coordinateTransformations"][:1]
        p.write_text(json.dumps(doc))
    for name in (store.REPORT_NAME, BOXES_TABLE):
        shutil.copy(store.kneeprep_dir(src) / name, dst / name)
    (dst / store.LEGACY_WORK_DIR / "x.1234.partial").mkdir(parents=True)
    (dst / LOCK_FILE).touch()


def test_an_older_store_is_read_as_it_is_and_upgraded_by_the_next_convert(converted, small_sample, tmp_path):
    clean, _ = converted
    old = tmp_path / "volumes.zarr"
    _downgrade(clean, old)
    with pytest.warns(UserWarning, match="not recognized as a component"):
        dict(zarr.open_group(str(old), mode="r").members())
    # readers: volumes where they were, the report found inside the store
    assert store.list_volumes(old) == store.list_volumes(clean)
    vid = store.list_volumes(old)[0]
    assert np.array_equal(store.read_volume(old, vid)[0], store.read_volume(clean, vid)[0])
    assert store.find_report(old) == old / store.REPORT_NAME
    with pytest.raises(Exception):  # noqa: B017 - whichever error: the old root is no OME collection
        BioFormats2Raw.from_zarr(zarr.open_group(str(old), mode="r"))

    report = _convert(small_sample, old)
    assert report.counts["written"] == 0  # a resume: no volume rewritten
    assert report.context["upgraded_store"]
    assert _tree(old) == _tree(clean)  # the metadata a clean run writes
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in clean.iterdir())
    side = store.kneeprep_dir(old)
    assert (side / BOXES_TABLE).is_file() and store.find_report(old) == side / store.REPORT_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dict(zarr.open_group(str(old), mode="r").members(max_depth=None))
    assert _convert(small_sample, old).context.get("upgraded_store") is None  # once only
