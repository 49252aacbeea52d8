"""The Zarr v3 volume store: atomic writes, listing, reading, attribute updates, OME-Zarr metadata."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from kneeprep import files
from kneeprep.errors import InputNotFoundError, StoreError
from kneeprep.formats import store
from kneeprep.geometry import Geometry, affine_from_itk

LABEL_MAP = {1: "femur", 2: "tibia"}


def volume(seed=0, shape=(12, 20, 16)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4000, shape, dtype=np.uint16)
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 3:9, 4:10] = 1
    labels[7:10, 10:15, 2:5] = 2
    g = Geometry(
        shape, (0.7, 0.4, 0.4), affine_from_itk((1, 2, 3), (0.4, 0.4, 0.7), (0, 0, -1, 1, 0, 0, 0, -1, 0))
    )
    return image, labels, g


@pytest.fixture
def st(tmp_path):
    return store.init_store(tmp_path / "volumes.zarr")


def test_doctests():
    assert doctest.testmod(store).failed == 0


def test_round_trip_with_labels_and_ome_metadata(st):
    image, labels, g = volume()
    store.write_volume(st, "v1", image, g, {"volume_id": "v1", "boxes": []}, {"anatomy": (labels, LABEL_MAP)})
    assert store.list_volumes(st) == ["v1"]
    got, g2 = store.read_volume(st, "v1")
    assert got.dtype == np.uint16 and np.array_equal(got, image)
    assert g2.shape == g.shape and np.allclose(g2.affine_lps, g.affine_lps)
    assert np.array_equal(store.read_labels(st, "v1"), labels)
    assert np.array_equal(store.read_labels(st, "v1", "anatomy"), labels)
    with pytest.raises(InputNotFoundError, match="no label layer 'menisci'"):
        store.read_labels(st, "v1", "menisci")
    attrs = store.read_attrs(st, "v1")
    assert attrs["volume_id"] == "v1" and attrs["geometry"]["orientation"] == "PIR"
    # OME-Zarr 0.5: the volume group is a one-level multiscale image with a label layer next to it
    group = zarr.open_group(str(st / "v1"), mode="r")
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert ms["datasets"][0]["path"] == "image" and ms["datasets"][0]["coordinateTransformations"][0][
        "scale"
    ] == [0.7, 0.4, 0.4]
    assert group["image"].metadata.dimension_names == ("z", "y", "x")
    assert group["labels"].attrs["ome"]["labels"] == ["anatomy"]
    layer = group["labels/anatomy"].attrs["ome"]
    assert layer["multiscales"][0]["datasets"][0]["path"] == "0"
    assert {p["label-value"]: p["name"] for p in layer["image-label"]["properties"]} == LABEL_MAP
    assert json.loads((st / "zarr.json").read_text())["attributes"]["kneeprep"]["kind"] == "volume_store"


def test_chunks_and_codec_are_the_measured_choice(st):
    image, _, g = volume(shape=(40, 64, 64))
    store.write_volume(st, "v", image, g, {})
    arr = store.open_image(st, "v")
    assert arr.chunks == store.choose_chunks(image.shape, 2) == (40, 64, 64)
    meta = json.loads((st / "v" / "image" / "zarr.json").read_text())
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"][0]["configuration"]
    assert (blosc["cname"], blosc["clevel"], blosc["shuffle"]) == ("zstd", 3, "bitshuffle")


def test_all_zero_chunks_are_left_out_as_zarr_leaves_them(st):
    """kneeprep skips zarr's own fill-value test per chunk and leaves the all-zero slabs out itself: the same
    chunk files as zarr's default (write_empty_chunks off) writes, and the same values read back."""
    image, labels, g = volume(shape=(16, 384, 384))  # chunks of 16 planes (uint16), of 32 (uint8 labels)
    image = np.concatenate([image, np.zeros_like(image), image])  # 48 planes: chunk 1 all 0
    labels = np.concatenate([labels, labels, np.zeros_like(labels)])  # chunk 1 (planes 32-47) all 0
    g = Geometry(image.shape, g.spacing, g.affine_lps)
    store.write_volume(st, "v", image, g, {}, {"anatomy": (labels, LABEL_MAP)})
    for rel, data, chunks in (("image", image, 3), ("labels/anatomy/0", labels, 2)):
        step = zarr.open_array(st / "v" / rel).chunks[0]
        assert -(-data.shape[0] // step) == chunks
        written = sorted(int(p.name) for p in (st / "v" / rel / "c").iterdir())
        assert written == [i // step for i in range(0, data.shape[0], step) if data[i : i + step].any()]
        plain = zarr.create_array(
            st.parent / f"plain-{rel.replace('/', '-')}", shape=data.shape, dtype=data.dtype,
            chunks=(step, *data.shape[1:]), compressors=zarr.open_array(st / "v" / rel).compressors, fill_value=0,
        )  # fmt: skip
        plain[:] = data
        assert (
            sorted(int(p.name) for p in (plain.store_path.store.root / plain.path / "c").iterdir()) == written
        )
    assert np.array_equal(store.read_volume(st, "v")[0], image)
    assert np.array_equal(store.read_labels(st, "v"), labels)


@pytest.mark.parametrize("env", ["3", "1", "junk"])
def test_codec_threads_change_no_value_and_restore_blosc(st, monkeypatch, env):
    """KNEEPREP_CODEC_THREADS compresses on several Blosc threads: the same values come back, and numcodecs'
    global threading settings are as before once the write is done."""
    from numcodecs import blosc

    monkeypatch.setenv(store.CODEC_THREADS_ENV, env)
    assert store.codec_threads() == {"3": 3, "1": 1, "junk": 1}[env]
    image, labels, g = volume(shape=(64, 96, 96))
    before = blosc.use_threads, blosc.get_nthreads()
    store.write_volume(st, "v", image, g, {}, {"anatomy": (labels, LABEL_MAP)})
    assert (blosc.use_threads, blosc.get_nthreads()) == before
    assert np.array_equal(store.read_volume(st, "v")[0], image)
    assert np.array_equal(store.read_labels(st, "v"), labels)


def test_replacing_a_volume_is_atomic_and_leaves_no_work_files(st):
    image, labels, g = volume(0)
    store.write_volume(st, "v", image, g, {"n": 1}, {"anatomy": (labels, LABEL_MAP)})
    image2, _, _ = volume(1)
    store.write_volume(st, "v", image2, g, {"n": 2})  # no labels this time
    assert np.array_equal(store.read_volume(st, "v")[0], image2)
    assert store.read_attrs(st, "v")["n"] == 2 and store.label_names(st, "v") == []
    assert list(store.work_dir(st).iterdir()) == []


def test_an_error_mid_write_leaves_nothing_listed(st, monkeypatch):
    image, labels, g = volume()

    def boom(group, name, data):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_array", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_volume(st, "v", image, g, {})
    assert store.list_volumes(st) == [] and list(store.work_dir(st).iterdir()) == []


def test_a_killed_writer_leaves_nothing_listed_and_the_next_run_cleans_up(st):
    # The child is SIGKILLed after the image array is written, before the rename: no cleanup code runs.
    script = f"""
import os, signal, numpy as np
from kneeprep.formats import store
from kneeprep.geometry import Geometry
real = store._write_array
def write_then_die(group, name, data):
    real(group, name, data)
    os.kill(os.getpid(), signal.SIGKILL)
store._write_array = write_then_die
g = Geometry((4, 8, 8), (1, 1, 1), np.eye(4))
store.write_volume({str(st)!r}, "v", np.ones((4, 8, 8), np.uint16), g, {{}})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    leftovers = list(store.work_dir(st).iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".partial")
    assert (leftovers[0] / "image" / "zarr.json").is_file()  # it really was mid-write
    assert store.list_volumes(st) == []
    with pytest.raises(InputNotFoundError):
        store.read_attrs(st, "v")
    with files.lock(st):
        assert store.clean_work_area(st) == [leftovers[0].name]
    assert list(store.work_dir(st).iterdir()) == []


def test_update_attrs_replaces_keys_and_keeps_the_rest(st):
    image, labels, g = volume()
    store.write_volume(st, "v", image, g, {"boxes": [], "provenance": {"recipe_hash": "a"}})
    new = store.update_attrs(st, "v", {"boxes": [{"region": "femur"}]})
    assert new["boxes"] == [{"region": "femur"}] and new["provenance"] == {"recipe_hash": "a"}
    assert store.read_attrs(st, "v") == new
    assert np.array_equal(store.read_volume(st, "v")[0], image)


def test_patient_identifying_fields_are_refused(st):
    image, _, g = volume()
    with pytest.raises(StoreError, match="dicom.PatientName"):
        store.write_volume(st, "v", image, g, {"dicom": {"PatientName": "Doe^Jane"}})
    store.write_volume(st, "v", image, g, {"dicom": {"EchoTime": 4.7}})
    with pytest.raises(StoreError, match="PatientBirthDate"):
        store.update_attrs(st, "v", {"PatientBirthDate": "19500101"})


def test_listing_ignores_work_area_and_foreign_entries(st):
    image, _, g = volume()
    store.write_volume(st, "b", image, g, {})
    store.write_volume(st, "a", image, g, {})
    (st / "notes").mkdir()
    (store.work_dir(st) / "c.123.partial").mkdir(parents=True)
    store.report_path(st).write_text("{}")
    assert store.list_volumes(st) == ["a", "b"]
    store.delete_volume(st, "a")
    assert store.list_volumes(st) == ["b"]


def test_lock_init_and_bad_inputs(tmp_path, st):
    with files.lock(st):
        with pytest.raises(StoreError, match="another kneeprep run"):
            with files.lock(st):
                pass
    with files.lock(st):  # released again
        pass
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "data.txt").write_text("x")
    with pytest.raises(StoreError, match="not a kneeprep volume store"):
        store.init_store(other)
    with pytest.raises(InputNotFoundError):
        store.list_volumes(tmp_path / "nothing.zarr")
    image, _, g = volume()
    with pytest.raises(StoreError, match="bad volume id"):
        store.write_volume(st, "../x", image, g, {})
    with pytest.raises(StoreError, match="differs from its geometry"):
        store.write_volume(st, "x", image[:2], g, {})


def test_store_doctests():
    r = doctest.testmod(store)
    assert r.attempted >= 1 and r.failed == 0
