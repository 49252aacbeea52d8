"""VolumeAttrs (kneeprep.formats.volume_attrs): the typed record of a volume's attrs reads every volume the
convert stage writes back to exactly the JSON stored (keys, values and order), keeps what it does not know,
refuses wrong values naming the volume, and record updates write what dict updates write."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from test_enhanced import _multi_echo

from kneeprep.errors import InputNotFoundError, StoreError
from kneeprep.formats import store
from kneeprep.formats.volume_attrs import Provenance, Source, VolumeAttrs
from kneeprep.geometry import Geometry
from kneeprep.recipe import load_recipe, parse_recipe
from kneeprep.stages.convert import run_convert


def _same_json(a: dict, b: dict) -> bool:
    """Equal, and equal as written (key order included)."""
    return a == b and json.dumps(a) == json.dumps(b)


@pytest.fixture(scope="module")
def stores(small_sample, tmp_path_factory) -> dict[str, Path]:
    """The sample converted three ways: the published recipe with masks and boxes, left knees mirrored (and
    normalized), free text kept; plus a multi-echo series split into one volume per echo."""
    tmp = tmp_path_factory.mktemp("attrs")
    recipes = {
        "published": load_recipe("3dreasonknee"),
        "mirrored": load_recipe("m3d-32x256x256"),
        "free_text": parse_recipe({"privacy": {"keep_free_text": True}}),
    }
    out = {}
    for name, recipe in recipes.items():
        out[name] = tmp / f"{name}.zarr"
        masks = {} if name == "free_text" else {"annotations": small_sample, "masks": small_sample}
        report = run_convert(small_sample / "raw", out[name], recipe, workers=0, progress=False, **masks)
        assert report.counts["written"] >= 2 and report.counts["failed"] == 0, report.counts
    raw, _ = _multi_echo(tmp / "echo", echoes=3)
    out["echoes"] = tmp / "echoes.zarr"
    assert run_convert(raw, out["echoes"], parse_recipe({}), workers=0, progress=False).counts["written"] == 3
    return out


def _volumes(stores):
    for name, root in stores.items():
        for vid in store.list_volumes(root):
            yield name, root, vid


def test_every_converted_volume_round_trips_exactly(stores):
    seen = set()
    for name, root, vid in _volumes(stores):
        d = store.read_attrs(root, vid)
        rec = store.read_volume_attrs(root, vid)
        assert _same_json(rec.to_json(), d), (name, vid)
        assert rec.extra == {} and rec.source.extra == {}, (name, vid)  # convert writes only known keys
        assert rec.geometry.shape == tuple(d["geometry"]["shape"]) == store.open_image(root, vid).shape
        assert rec.nbytes == store.open_image(root, vid).nbytes
        seen |= {"mirrored"} if rec.mirrored else set()
        seen |= {"labels"} if rec.labels and rec.boxes else set()
        seen |= {"image_set"} if rec.image_set else set()
        seen |= {"free_text"} if rec.source.description is not None else set()
        seen |= {"left"} if rec.knee_side == 2 else set()
    assert seen == {"mirrored", "labels", "image_set", "free_text", "left"}


def test_the_uncopied_json_writes_the_same_text_and_shares_the_boxes(stores):
    """``to_json(copy=False)`` (the shards stage's input fingerprint) dumps exactly as ``to_json()`` does."""
    for name, root, vid in _volumes(stores):
        d = store.read_attrs(root, vid)
        d["unknown_key"] = {"kept": [1, 2.5]}
        rec = VolumeAttrs.from_json(d)
        shared = rec.to_json(copy=False)
        for kw in ({}, {"sort_keys": True}):
            assert json.dumps(shared, **kw) == json.dumps(rec.to_json(), **kw) == json.dumps(d, **kw), name
        if rec.boxes:
            assert shared["boxes"] is rec.boxes and rec.to_json()["boxes"] is not rec.boxes
        assert shared["unknown_key"] is rec.extra["unknown_key"]


def test_what_convert_writes_is_what_the_record_writes(stores):
    """The record built by convert is written through to_json(): its key order is the record's order."""
    root = stores["published"]
    vid = store.list_volumes(root)[0]
    d = store.read_attrs(root, vid)
    assert list(d) == [k for k in VolumeAttrs.KEYS if k in d] and list(d)[-1] == "geometry"
    assert list(d["source"]) == [k for k in Source.KEYS if k in d["source"]]
    assert "description" not in d["source"]  # free text only when the recipe keeps it


def test_unknown_keys_are_kept_in_place_and_missing_ones_stay_missing(stores):
    root = stores["published"]
    d = store.read_attrs(root, store.list_volumes(root)[0])
    newer = {"future": {"x": [1, 2]}, **d, "source": {**d["source"], "new_field": 3}}
    rec = VolumeAttrs.from_json(newer)
    assert rec.extra == {"future": {"x": [1, 2]}} and rec.source.extra == {"new_field": 3}
    assert _same_json(rec.to_json(), newer)
    older = {k: v for k, v in d.items() if k not in ("image_set", "labels", "boxes")}
    rec = VolumeAttrs.from_json(older)
    assert rec.boxes is None and _same_json(rec.to_json(), older)
    # a field set later on a record that lacked it is appended, as a dict update appends it
    changed = rec.replace(boxes=({"region": "femur"},))
    assert _same_json(changed.to_json(), {**older, "boxes": [{"region": "femur"}]})


@pytest.mark.parametrize(
    "change, key",
    [
        ({"knee_side": 3}, "knee_side"),
        ({"knee_side": "left"}, "knee_side"),
        ({"dtype": "uint17"}, "dtype"),
        ({"mirrored": "no"}, "mirrored"),
        ({"qc": {"status": "fine", "reasons": []}}, "qc.status"),
        ({"source": {"n_files": -1}}, "source.n_files"),
        ({"geometry": {"shape": [2, 2, 2]}}, "geometry"),
        ({"boxes": {"region": "femur"}}, "boxes"),
    ],
)
def test_a_wrong_value_is_refused_naming_the_volume_and_the_key(stores, change, key):
    root = stores["published"]
    vid = store.list_volumes(root)[0]
    bad = store.read_attrs(root, vid) | change
    with pytest.raises(StoreError) as e:
        VolumeAttrs.from_json(bad, where=root / vid)
    assert str(e.value).startswith(f"{root / vid}: volume {vid!r}: attrs {key}:"), str(e.value)


def test_a_store_with_a_wrong_value_is_refused_by_read_volume_attrs(stores, tmp_path):
    root = tmp_path / "s.zarr"
    store.init_store(root)
    g = Geometry((2, 3, 4), (1.0, 1.0, 1.0), np.eye(4))
    store.write_volume(root, "v", np.zeros(g.shape, np.uint8), g, {"volume_id": "v", "dtype": "uint8"})
    assert store.read_volume_attrs(root, "v").nbytes == 24
    store.update_attrs(root, "v", {"knee_side": 0})
    with pytest.raises(
        StoreError, match=r"s\.zarr/v: volume 'v': attrs knee_side: expected 1 \(right\) or 2"
    ):
        store.read_volume_attrs(root, "v")
    with pytest.raises(StoreError, match="attrs volume_id: missing"):
        VolumeAttrs.from_json({"dtype": "uint8"})


def test_record_updates_write_what_dict_updates_write(stores, tmp_path):
    src = stores["published"]
    vid = next(v for v in store.list_volumes(src) if store.read_attrs(src, v)["boxes"])
    image, geometry = store.read_volume(src, vid)
    attrs = store.read_attrs(src, vid)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for root in (a, b):
        store.init_store(root)
        store.write_volume(root, vid, image, geometry, attrs)
    provenance = {**attrs["provenance"], "boxes_hash": "0123456789abcdef"}
    store.update_attrs(a, vid, {"boxes": attrs["boxes"][:2], "provenance": provenance})
    rec = store.read_volume_attrs(b, vid)
    new = store.update_volume_attrs(
        b,
        vid,
        boxes=rec.boxes[:2],
        provenance=dataclasses.replace(rec.provenance, boxes_hash="0123456789abcdef"),
    )
    assert (a / vid / "zarr.json").read_bytes() == (b / vid / "zarr.json").read_bytes()
    assert new == store.read_volume_attrs(a, vid) and new.boxes_hash == "0123456789abcdef"
    assert isinstance(new.provenance, Provenance) and len(new.box_records()) == 2


def test_attrs_cache_parses_once_and_sees_every_change(tmp_path):
    """Inside ``store.attrs_cache()`` a volume's attrs are parsed once while its ``zarr.json`` is unchanged; an
    attrs update, a volume written again and a removed volume are seen at once; outside it nothing is kept."""
    root = tmp_path / "s.zarr"
    store.init_store(root)
    g = Geometry((2, 3, 4), (1.0, 1.0, 1.0), np.eye(4))
    store.write_volume(root, "v", np.zeros(g.shape, np.uint8), g, {"volume_id": "v", "dtype": "uint8"})
    assert store.read_volume_attrs(root, "v") is not store.read_volume_attrs(root, "v")
    with store.attrs_cache():
        first = store.read_volume_attrs(root, "v")
        assert store.read_volume_attrs(root, "v") is first
        store.update_attrs(root, "v", {"knee_side": 2})
        updated = store.read_volume_attrs(root, "v")
        assert updated is not first and updated.knee_side == 2 and first.knee_side != 2
        store.write_volume(root, "v", np.zeros(g.shape, np.uint16), g, {"volume_id": "v", "dtype": "uint16"})
        again = store.read_volume_attrs(root, "v")
        assert again.dtype == "uint16" and again.nbytes == 48
        store.delete_volume(root, "v")
        with pytest.raises(InputNotFoundError):
            store.read_volume_attrs(root, "v")


def test_the_boxes_table_is_made_once_per_attrs_and_validate_still_sees_a_change(
    stores, tmp_path, monkeypatch
):
    """Inside ``store.attrs_cache()`` (a rebuild) validate checks the table file against the table the convert
    stage made from the same attrs records, without making it again; a volume whose boxes changed since is a
    new record, so its table is made again and the stale file is found."""
    import shutil

    import pyarrow.parquet as pq

    from kneeprep.stages import boxes as boxes_stage
    from kneeprep.stages.validate_store import validate_store

    root = tmp_path / "s.zarr"
    shutil.copytree(stores["published"], root)
    shutil.copytree(store.kneeprep_dir(stores["published"]), store.kneeprep_dir(root))
    made = []
    real = boxes_stage.boxes_table
    monkeypatch.setattr(boxes_stage, "boxes_table", lambda rows: made.append(len(rows)) or real(rows))
    with store.attrs_cache():
        path = boxes_stage.write_boxes_table(root)
        assert validate_store(root) == [] and len(made) == 1 and made[0] > 0
        rows = [
            r
            for v in store.list_volumes(root)
            for r in boxes_stage.table_rows(store.read_volume_attrs(root, v))
        ]
        assert pq.read_table(path).equals(real(rows))
        vid = store.list_volumes(root)[0]
        fewer = store.read_volume_attrs(root, vid).boxes[1:]
        store.update_volume_attrs(root, vid, boxes=fewer)  # one box fewer; the table is not rewritten
        problems = validate_store(root)
        assert len(made) == 2 and [p.kind for p in problems] == ["boxes_table"] and vid in problems[0].message
        boxes_stage.write_boxes_table(root)  # writes the table validate just made for the new records
        assert validate_store(root) == [] and len(made) == 2
    assert validate_store(root) == [] and len(made) == 3  # outside the block: made every time
