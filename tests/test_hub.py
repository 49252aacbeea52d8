"""The shards as a Hugging Face Hub dataset and for generic Parquet tools (kneeprep.formats.card_yaml,
kneeprep.hf): pandas, pyarrow.dataset, duckdb, polars and ``datasets`` open the shards and get, for every
quintuple, the same volume bits as ``ShardDataset``; numpy formatting does not truncate a volume; the layout
before schema version 3 is still read by the loader and rewritten by ``kneeprep shards``.

``datasets`` is not in the ``test`` extra (heavy): its tests skip when it is not installed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_shards import FakeData

from kneeprep.formats.shard_schema import MANIFEST, SCHEMA, VOLUME_SCHEMA
from kneeprep.loader import ShardDataset
from kneeprep.recipe import Recipe, Shards, Splits
from kneeprep.stages.shards import build_shards
from kneeprep.stages.validate import validate_shards

HF = {"train": "train", "val": "validation", "test": "test"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Shards (codec none, several per split) of volumes whose last voxels are 0: raw bytes ending in NULs."""
    from kneeprep.formats.annotations import write_quintuples_jsonl
    from kneeprep.formats.splits import write_split_csv
    from kneeprep.formats.store import init_store, write_volume

    recipe = Recipe(splits=Splits(source="csv"), shards=Shards(target_bytes=6000, codec="none"))
    data = FakeData(n_patients=8, recipe=recipe)
    root = tmp_path_factory.mktemp("hub")
    store = init_store(root / "volumes.zarr")
    for vid, (img, geom) in data.volumes.items():
        img.reshape(-1)[-7:] = 0
        write_volume(store, vid, img, geom, {k: v for k, v in data.attrs[vid].items() if k != "geometry"})
    ann = root / "annotations"
    for split in ("train", "val", "test"):
        rows = [s for s in data.annotations.splits if s.split == split]
        write_split_csv(ann / "split_files" / f"{split}_split.csv", [r.__dict__ for r in rows])
    write_quintuples_jsonl(ann / "quintuples.jsonl", data.annotations.records)
    out = root / "shards"
    rep = build_shards(store, ann, out, recipe, workers=0)
    assert rep["errors"] == 0
    truth = {}  # sample id -> the volume ShardDataset gives it
    for split in ("train", "val", "test"):
        for s in ShardDataset(out, split=split, shuffle=False):
            truth[s["sample_id"]] = (s["volume_id"], np.array(s["image"]))
    return out, truth, data, store, ann, recipe


def test_layout_and_card(hub):
    out, truth, *_ = hub
    import yaml

    m = json.loads((out / MANIFEST).read_text())
    assert m["schema_version"] == 3 and all(m["splits"][s]["shards"] >= 1 for s in HF)
    for e in m["shards"]:
        n = m["splits"][e["split"]]["shards"]
        assert e["path"].startswith(f"data/{HF[e['split']]}-") and e["path"].endswith(f"-of-{n:05d}.parquet")
        assert e["volumes_path"] == e["path"].replace("data/", "_volumes/", 1)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0" and meta["task_categories"] and meta["pretty_name"]
    configs = {c["config_name"]: c for c in meta["configs"]}
    assert configs["quintuples"]["default"] is True
    assert {d["split"]: d["path"] for d in configs["volumes"]["data_files"]} == {
        h: f"_volumes/{h}-*.parquet" for h in HF.values()
    }
    info = {i["config_name"]: i for i in meta["dataset_info"]}
    assert {s["name"]: s["num_examples"] for s in info["quintuples"]["splits"]} == {
        HF[s]: m["splits"][s]["rows"] for s in HF
    }
    assert [f["name"] for f in info["volumes"]["features"]] == VOLUME_SCHEMA.names
    assert validate_shards(out) == []


def test_card_features_are_what_datasets_derives_from_the_schemas():
    datasets = pytest.importorskip("datasets")
    from kneeprep.formats.card_yaml import hf_features

    for schema in (SCHEMA, VOLUME_SCHEMA):
        assert hf_features(schema) == datasets.Features.from_arrow_schema(schema)._to_yaml_list()


def _check_join(rows, truth):
    """rows: (sample_id, volume_id, image bytes, dtype, shape) from a join of quintuples and volumes."""
    rows = list(rows)
    assert sorted(r[0] for r in rows) == sorted(truth)  # every quintuple once, each with an image
    for sid, vid, image, dtype, shape in rows:
        want_vid, want = truth[sid]
        assert vid == want_vid
        got = np.frombuffer(image, dtype).reshape([int(v) for v in shape])
        assert got.dtype == want.dtype and np.array_equal(got, want), sid


def test_pandas_and_pyarrow_dataset(hub):
    import pandas as pd
    import pyarrow.dataset as pads

    out, truth, *_ = hub
    q = pd.read_parquet(out / "data")
    v = pd.read_parquet(out / "_volumes")
    assert len(q) == len(truth) and len(v) == len({vid for vid, _ in truth.values()})
    j = q.drop(columns=["image"]).merge(
        v[["volume_id", "image", "image_dtype"]], on="volume_id", suffixes=("", "_v")
    )
    _check_join(zip(j.sample_id, j.volume_id, j.image, j.image_dtype, j.image_shape, strict=True), truth)
    # at the root: pyarrow skips _volumes/ and, told to, the card and the JSON files
    root = pads.dataset(out, format="parquet", exclude_invalid_files=True)
    assert root.schema.remove_metadata().equals(SCHEMA.remove_metadata())
    assert root.count_rows() == len(truth)
    with pytest.raises(Exception, match="README.md"):  # what the docs say: point plain readers at data/
        pd.read_parquet(out)


def test_duckdb_and_polars(hub):
    import duckdb
    import polars as pl

    out, truth, *_ = hub
    sql = f"""SELECT q.sample_id, q.volume_id, v.image, v.image_dtype, v.image_shape
              FROM '{out}/data/*.parquet' q JOIN '{out}/_volumes/*.parquet' v USING (volume_id)"""
    _check_join(duckdb.sql(sql).fetchall(), truth)
    q = pl.read_parquet(f"{out}/data/*.parquet").drop("image")
    v = pl.read_parquet(f"{out}/_volumes/*.parquet").select("volume_id", "image", "image_dtype")
    j = q.join(v, on="volume_id", suffix="_v")
    _check_join(j.select("sample_id", "volume_id", "image", "image_dtype", "image_shape").iter_rows(), truth)


def test_datasets_load_dataset_splits_and_kneeprep_hf(hub, tmp_path):
    datasets = pytest.importorskip("datasets")
    import kneeprep.hf

    out, truth, data, *_ = hub
    dd = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert sorted(dd) == ["test", "train", "validation"]
    for s, h in HF.items():
        assert set(dd[h]["split"]) == {s}  # rows keep kneeprep's split names
    assert sum(len(d) for d in dd.values()) == len(truth)
    vd = datasets.load_dataset(str(out), "volumes", cache_dir=str(tmp_path / "cache"))
    # numpy formatting strips trailing NULs of binary values: the bytes come back short, image_nbytes restores them
    row = vd["train"].with_format("numpy")[0]
    assert len(row["image"]) < int(row["image_nbytes"])
    vid = str(row["volume_id"])
    np.testing.assert_array_equal(kneeprep.hf.decode_volume(row), data.volumes[vid][0])
    for h in HF.values():
        vols = kneeprep.hf.Volumes(out, split=next(k for k, v in HF.items() if v == h))
        ds = dd[h].with_transform(kneeprep.hf.with_volumes(vols))
        for i in range(len(ds)):
            r = ds[i]
            assert "image" not in r and np.array_equal(r["volume"], truth[r["sample_id"]][1]), r["sample_id"]


def test_legacy_layout_still_read_then_rewritten(hub, tmp_path):
    import kneeprep.hf
    from kneeprep.errors import ValidationError

    out, truth, data, store, ann, recipe = hub
    old = tmp_path / "old"
    shutil.copytree(out, old)
    m = json.loads((old / MANIFEST).read_text())
    counters: dict[str, int] = {}
    for e in m["shards"]:  # the layout of schema version 2: <split>/part-NNNNN.parquet, no volumes table
        i = counters[e["split"]] = counters.get(e["split"], -1) + 1
        rel = f"{e['split']}/part-{i:05d}.parquet"
        (old / e["split"]).mkdir(exist_ok=True)
        (old / e["path"]).rename(old / rel)
        (old / e.pop("volumes_path")).unlink()
        e["path"] = rel
        del e["volumes_bytes"], e["volumes_sha256"]
    shutil.rmtree(old / "data")
    shutil.rmtree(old / "_volumes")
    m["schema_version"] = 2
    (old / MANIFEST).write_text(json.dumps(m))
    got = {s["sample_id"]: s["image"] for s in ShardDataset(old, split="train", shuffle=False)}
    assert got and all(np.array_equal(a, truth[k][1]) for k, a in got.items())  # the loader still reads it
    (problem,) = validate_shards(old)
    assert problem.kind == "layout" and "re-run `kneeprep shards`" in problem.message
    with pytest.raises(ValidationError, match="re-run `kneeprep shards`"):
        kneeprep.hf.Volumes(old)
    rep = build_shards(store, ann, old, recipe, workers=0)  # same inputs and recipe, old layout: rewritten
    assert rep["up_to_date"] is False
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*.parquet")) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*.parquet")
    )
    assert not any((old / s).exists() for s in HF) and validate_shards(old) == []
    for p in out.rglob("*.parquet"):
        assert (old / p.relative_to(out)).read_bytes() == p.read_bytes()


def test_volumes_table_one_row_group_per_volume(hub):
    out, truth, *_ = hub
    m = json.loads((out / MANIFEST).read_text())
    for e in m["shards"]:
        pf = pq.ParquetFile(out / e["volumes_path"])
        assert pf.num_row_groups == e["volumes"] == pf.metadata.num_rows
        assert pf.schema_arrow.equals(VOLUME_SCHEMA)
