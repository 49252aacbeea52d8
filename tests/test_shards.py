"""Quintuples, shards, manifest and validation (kneeprep.formats.quintuples, formats.shard_*, stages.shards, stages.validate, `kneeprep shards|validate`).

The fixtures are in-memory fakes of the volume store and annotation set (same records and attrs as
``kneeprep.formats.store`` / ``kneeprep.formats.annotations`` produce), so these tests do not depend on DICOM conversion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from kneeprep.boxes import compute_boxes
from kneeprep.errors import ValidationError
from kneeprep.formats.annotations import AnnotationRecord, AnnotationSet, RecordError, compact_json
from kneeprep.formats.quintuples import BENIGN_KINDS, build_quintuples, generate_patient_splits
from kneeprep.formats.shard_reader import iter_quintuples, read_manifest
from kneeprep.formats.shard_schema import MANIFEST, QUINTUPLE_COLUMNS, SCHEMA
from kneeprep.formats.shard_writer import quintuple_from_row, write_shards
from kneeprep.formats.splits import SplitRow, make_volume_id
from kneeprep.geometry import Geometry
from kneeprep.moaks.severity import allowed_components, make_severity, to_published
from kneeprep.recipe import Recipe, Shards, Splits
from kneeprep.stages.validate import validate_shards

#: question ids used by the fakes: BML femur medial trochlea, cartilage patella medial, a periarticular
#: question (no box region), and a BML question whose region is empty in every fake mask (-> no_box).
QIDS = ("3", "16", "63", "15")


class FakeData:
    """``n_patients`` patients x 2 knees, small uint16 volumes with labelled blocks, 4 questions each."""

    def __init__(self, n_patients=6, shape=(6, 20, 24), seed=0, recipe=None):
        self.recipe = recipe or Recipe(
            splits=Splits(source="csv"), shards=Shards(target_bytes=1 << 30, codec="zstd")
        )
        rng = np.random.default_rng(seed)
        regions = self.recipe.labels.region_labels()
        by_name = {n: lid for lid, n in self.recipe.labels.map.items()}
        self.volumes: dict[str, tuple[np.ndarray, Geometry]] = {}
        self.attrs: dict[str, dict] = {}
        records, splits = [], []
        for p in range(n_patients):
            pid = f"{9000000 + p}"
            split = ("train", "train", "val", "test")[p % 4]
            for side in (1, 2):
                vid = make_volume_id(pid, "00M", "20040101", f"{10000000 + 10 * p + side}", side)
                img = rng.integers(0, 4000, size=shape, dtype=np.uint16)
                labels = np.zeros(shape, np.uint8)
                z = 1 + (p + side) % 3
                labels[z : z + 2, 2:9, 3 + side : 12] = by_name["femur medial trochlea"]
                labels[0:3, 12:18, 10:20] = by_name["patella medial"]
                affine = np.diag([0.7, 0.36, 0.36, 1.0])
                affine[:3, 3] = (-10.0 * p, 5.0, 1.0 * side)
                geom = Geometry(shape, (0.7, 0.36, 0.36), affine)
                boxes = compute_boxes(labels, regions, geom)
                self.volumes[vid] = (img, geom)
                self.attrs[vid] = {
                    "volume_id": vid,
                    "patient_id": pid,
                    "knee_side": side,
                    "geometry": geom.to_json(),
                    "dtype": "uint16",
                    "qc": {"status": "ok", "reasons": []},
                    "boxes": [b.to_json() for b in boxes.values()],
                }
                splits.append(
                    SplitRow(
                        split,
                        pid,
                        "00M",
                        "20040101",
                        f"{10000000 + 10 * p + side}",
                        side,
                        "",
                        "",
                        "",
                        f"csv:{p}",
                    )
                )
                for qid in QIDS:
                    sev = make_severity(qid, {c: int(rng.integers(0, 2)) for c in allowed_components(qid)})
                    records.append(
                        AnnotationRecord(
                            sample_id=f"{vid}_{qid}",
                            volume_id=vid,
                            question_id=qid,
                            question=f"question {qid}?",
                            reasoning=(f"Step one of {vid}.", "Step two.", "Ünïcode ✓."),
                            answer_json=compact_json(to_published(sev, qid)),
                            severity=sev,
                        )
                    )
        self.annotations = AnnotationSet(records=records, splits=splits, questions={}, errors=[])

    def read_volume(self, vid):
        self.reads = getattr(self, "reads", 0) + 1
        return self.volumes[vid]


@pytest.fixture(scope="module")
def data():
    return FakeData()


@pytest.fixture(scope="module")
def built(data, tmp_path_factory):
    qs, rej = build_quintuples(data.annotations, data.attrs, data.recipe)
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(qs, data.read_volume, out, data.recipe)
    return qs, rej, out, manifest


# ----------------------------------------------------------------------------------------------------------
# the join


def test_join_rejects_with_reasons_and_writes_unboxed_questions(data, built):
    qs, rej, _, _ = built
    n_vol = len(data.volumes)
    # question 15 (tibia subspinous BML) has no voxels in any fake mask -> rejected as no_box, nothing else
    assert {r.reason_kind for r in rej} == {"no_box"} and len(rej) == n_vol
    assert all(r.sample_id.endswith("_15") and "tibia subspinous" in r.message for r in rej)
    assert len(qs) == n_vol * 3
    # question 63 (periarticular): written without a box, flagged, with the reason
    q63 = [q for q in qs if q.question_id == "63"]
    assert len(q63) == n_vol and all(
        q.box is None and q.box_empty and "no mask region" in q.box_reason for q in q63
    )
    q3 = next(q for q in qs if q.question_id == "3")
    assert q3.box.region == "femur medial trochlea" and not q3.box_empty and q3.box_reason is None
    assert q3.question_type == "bml" and q3.question_region == "femur medial trochlea"


def test_rejected_counted_by_reason(data):
    attrs = dict(data.attrs)
    vids = sorted(attrs)
    del attrs[vids[0]]  # volume missing from the store
    attrs[vids[1]] = attrs[vids[1]] | {"qc": {"status": "fail", "reasons": ["truncated series"]}}
    records = list(data.annotations.records)
    records.append(replace(records[-1], sample_id=records[-1].volume_id + "_999", question_id="999"))
    splits = [s for s in data.annotations.splits if s.volume_id != vids[2]]
    ann = AnnotationSet(records, splits, {}, [RecordError("quintuples.jsonl:7", "json", "not valid JSON")])
    qs, rej = build_quintuples(ann, attrs, data.recipe)
    counts: dict[str, int] = {}
    for r in rej:
        counts[r.reason_kind] = counts.get(r.reason_kind, 0) + 1
    # 4 questions per volume; no_box: one per written-or-not-yet-rejected volume (12 - 3 rejected volumes)
    assert counts == {
        "volume_missing": 4,
        "volume_failed": 4,
        "no_split": 4,
        "unknown_question": 1,
        "annotation": 1,
        "no_box": 9,
    }
    assert len(qs) + sum(counts.values()) == len(records) + 1  # +1: the unreadable record; nothing dropped
    assert "truncated series" in next(r.message for r in rej if r.reason_kind == "volume_failed")
    assert "no_box" in BENIGN_KINDS and "volume_missing" not in BENIGN_KINDS


def test_patient_in_two_splits_raises(data):
    rows = list(data.annotations.splits)
    first = rows[0]
    other = next(s for s in ("val", "test") if s != first.split)
    knee2 = next(r for r in rows if r.patient_id == first.patient_id and r is not first)
    rows[rows.index(knee2)] = replace(knee2, split=other)
    ann = AnnotationSet(data.annotations.records, rows, {}, [])
    with pytest.raises(ValidationError, match=f"patient {first.patient_id} is in several splits"):
        build_quintuples(ann, data.attrs, data.recipe)


def test_generated_splits_are_by_patient_and_deterministic(data):
    recipe = replace(data.recipe, splits=Splits(source="generated", seed=7, ratios=(0.5, 0.25, 0.25)))
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    by_patient: dict[str, set[str]] = {}
    for q in qs:
        by_patient.setdefault(q.patient_id, set()).add(q.split)
    assert all(len(s) == 1 for s in by_patient.values())
    splits = [s for (s,) in by_patient.values()]
    # 6 patients cut at round(cumsum(ratios) * 6) = 3, round(4.5) = 4 (half to even), 6
    assert {s: splits.count(s) for s in ("train", "val", "test")} == {"train": 3, "val": 1, "test": 2}
    patients = [f"p{i}" for i in range(100)]
    a = generate_patient_splits(patients, 7, (0.8, 0.1, 0.1))
    assert a == generate_patient_splits(list(reversed(patients)), 7, (0.8, 0.1, 0.1))
    assert [list(a.values()).count(s) for s in ("train", "val", "test")] == [80, 10, 10]
    assert a != generate_patient_splits(patients, 8, (0.8, 0.1, 0.1))


# ----------------------------------------------------------------------------------------------------------
# shards


def test_round_trip_exact(built):
    qs, _, out, _ = built
    back = [quintuple_from_row(r) for r in iter_quintuples(out)]
    assert back == qs  # same order too: split, volume, question


def test_volume_stored_once_per_shard_and_decodes(data, built):
    _, _, out, manifest = built
    import pyarrow.parquet as pq

    for e in manifest["shards"]:
        t = pq.read_table(out / e["path"])
        assert t.schema.equals(SCHEMA) and t.schema.metadata[b"kneeprep.schema_version"] == b"3"
        images = t.column("image").to_pylist()
        vids = t.column("volume_id").to_pylist()
        stored = [v for v, im in zip(vids, images, strict=True) if im is not None]
        assert stored == sorted(set(vids)) == sorted(set(stored))  # once each, volumes sorted
        assert e["volumes"] == len(stored) and e["rows"] == t.num_rows
    rows = list(iter_quintuples(out, split="val", columns=["sample_id", "volume_id", "image"]))
    assert rows and {r["sample_id"].rsplit("_", 1)[0] for r in rows} == {r["volume_id"] for r in rows}
    for r in rows:
        np.testing.assert_array_equal(r["image"], data.volumes[r["volume_id"]][0])


def test_two_runs_byte_identical(data, built, tmp_path):
    qs, _, out, manifest = built
    again = write_shards(list(reversed(qs)), data.read_volume, tmp_path, data.recipe)
    assert again == manifest
    for e in manifest["shards"]:
        assert (tmp_path / e["path"]).read_bytes() == (out / e["path"]).read_bytes()
    assert (tmp_path / MANIFEST).read_bytes() == (out / MANIFEST).read_bytes()
    assert not list(tmp_path.rglob("*.partial"))


def test_shard_tasks_start_largest_first_and_the_files_do_not_depend_on_it(data, tmp_path):
    """On an executor the shards go out largest first (so the last task to start is a small one, not the
    split with the most volumes); the manifest keeps plan order and every file equals the in-order run's."""
    from kneeprep.parallel import SerialExecutor

    qs, _ = build_quintuples(data.annotations, data.attrs, data.recipe)
    # the test split's volumes said to be the largest: its shard is planned last and sent first
    nbytes = {
        q.volume_id: data.read_volume(q.volume_id)[0].nbytes * (100 if q.split == "test" else 1) for q in qs
    }
    in_order = write_shards(qs, data.read_volume, tmp_path / "a", data.recipe, nbytes=nbytes)
    sent = []

    class Recording(SerialExecutor):
        def map_unordered(self, fn, items, on_error=None, **kwargs):
            items = list(items)
            sent.extend(items)
            return super().map_unordered(fn, items, on_error, **kwargs)

    again = write_shards(
        qs, data.read_volume, tmp_path / "b", data.recipe, nbytes=nbytes, executor=Recording()
    )
    planned = [sum(nbytes[v] for v in p.volume_ids) for p in sent]
    assert len(sent) == len(in_order["shards"]) > 2 and planned == sorted(planned, reverse=True)
    assert sent[0].split == "test" and in_order["shards"][-1]["split"] == "test"
    assert again == in_order
    for e in in_order["shards"]:
        assert (tmp_path / "b" / e["path"]).read_bytes() == (tmp_path / "a" / e["path"]).read_bytes()


def test_shards_cut_at_target_bytes_and_row_groups_hold_whole_volumes(data, tmp_path):
    import pyarrow.parquet as pq

    recipe = replace(data.recipe, shards=Shards(target_bytes=4000, codec="none"))
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    m = write_shards(qs, data.read_volume, tmp_path, recipe)
    train = [e for e in m["shards"] if e["split"] == "train"]
    n = len(train)
    assert n > 1 and [e["path"] for e in train] == [
        f"data/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)
    ]
    assert [e["volumes_path"] for e in train] == [
        f"_volumes/train-{i:05d}-of-{n:05d}.parquet" for i in range(n)
    ]
    val = [e["path"] for e in m["shards"] if e["split"] == "val"]
    assert val and all(p.startswith("data/validation-") for p in val)
    assert all(e["bytes"] >= 4000 for e in train[:-1])
    assert sum(e["rows"] for e in m["shards"]) == len(qs)
    for e in m["shards"]:
        pf = pq.ParquetFile(tmp_path / e["path"])
        assert [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)] == e["row_group_rows"]
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["volume_id", "image"])
            firsts = [
                v
                for v, im in zip(
                    t.column("volume_id").to_pylist(), t.column("image").to_pylist(), strict=True
                )
                if im
            ]
            assert firsts == sorted(
                set(t.column("volume_id").to_pylist())
            )  # every volume of the group is in it
    assert validate_shards(tmp_path) == []


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd", "blosc-lz4", "blosc-zstd"])
def test_codecs_round_trip(data, tmp_path, codec):
    import pyarrow.parquet as pq

    recipe = replace(data.recipe, shards=Shards(codec=codec, level=5))
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    m = write_shards(qs[:6], data.read_volume, tmp_path, recipe)
    rg = pq.ParquetFile(tmp_path / m["shards"][0]["path"]).metadata.row_group(0)
    col = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == "image")
    assert col.compression in {"none": ("UNCOMPRESSED",), "lz4": ("LZ4", "LZ4_RAW"), "zstd": ("ZSTD",)}.get(
        codec,
        ("UNCOMPRESSED",),  # Blosc: kneeprep compresses, Parquet stores
    )
    assert validate_shards(tmp_path) == []
    assert m["codec"] == codec
    t = pq.read_table(tmp_path / m["shards"][0]["path"], columns=["image", "image_codec"])
    assert set(t.column("image_codec").to_pylist()) == {"blosc" if codec.startswith("blosc") else "raw"}
    for r in iter_quintuples(tmp_path, columns=["volume_id", "image"]):
        np.testing.assert_array_equal(r["image"], data.volumes[r["volume_id"]][0])
        assert not r["image"].flags.writeable


def test_blosc_shards_deterministic_whatever_the_thread_count(data, tmp_path):
    from numcodecs import blosc

    recipe = replace(data.recipe, shards=Shards(codec="blosc-zstd", level=3))
    qs, _ = build_quintuples(data.annotations, data.attrs, recipe)
    big = FakeData(n_patients=1, shape=(24, 256, 256)).volumes  # 3 MiB: three 1 MiB Blosc blocks per frame
    vid = next(iter(big))
    qs1 = [replace(q, volume_id=vid) for q in qs if q.volume_id == qs[0].volume_id]
    before = blosc.get_nthreads()
    try:
        outs = []
        for n in (1, 2, 4):
            blosc.set_nthreads(n)
            write_shards(qs1, lambda v: big[v], tmp_path / str(n), recipe)
            outs.append((tmp_path / str(n) / MANIFEST).read_bytes())
    finally:
        blosc.set_nthreads(before)
    assert outs[0] == outs[1] == outs[2]


def test_validate_catches_blosc_frame_of_the_wrong_size(data, tmp_path):
    from kneeprep.formats.shard_schema import decode_image, encode_image
    from kneeprep.stages.validate import _check_image

    img = data.volumes[next(iter(data.volumes))][0]
    frame, codec = encode_image(img, "blosc-lz4", 5)
    assert codec == "blosc" and len(frame) < img.nbytes
    np.testing.assert_array_equal(decode_image(frame, "<u2", img.shape, "blosc"), img)
    assert _check_image("f", "row", frame, "<u2", img.shape, "blosc") == []
    (p,) = _check_image("f", "row", frame, "<u2", (1, *img.shape[1:]), "blosc")
    assert p.kind == "image" and "needs" in p.message
    (p,) = _check_image("f", "row", frame[:-9], "<u2", img.shape, "blosc")
    assert p.kind == "image"
    (p,) = _check_image("f", "row", frame, "<u2", img.shape, "jpeg")
    assert "image_codec 'jpeg'" in p.message


@pytest.mark.parametrize("codec", ["zstd", "blosc-zstd"])
def test_decode_with_plain_pyarrow_in_subprocess(data, built, tmp_path, codec):
    _, _, out, manifest = built
    if codec != data.recipe.shards.codec:
        recipe = replace(data.recipe, shards=Shards(codec=codec))
        out, manifest = tmp_path, write_shards(built[0], data.read_volume, tmp_path, recipe)
    path = out / manifest["shards"][0]["path"]
    code = f"""
import sys, numcodecs, numpy as np, pyarrow.parquet as pq
t = pq.read_table({str(path)!r})
row = next(r for r in t.to_pylist() if r["image"] is not None)
buf = {{"raw": lambda b: b, "blosc": lambda b: numcodecs.Blosc().decode(b)}}[row["image_codec"]](row["image"])
v = np.frombuffer(buf, row["image_dtype"]).reshape(row["image_shape"])
assert row["image_codec"] == {"blosc" if codec.startswith("blosc") else "raw"!r}
z0, y0, x0, z1, y1, x1 = next(r["box_voxels"] for r in t.to_pylist() if r["box_voxels"] and r["volume_id"] == row["volume_id"])
assert "kneeprep" not in sys.modules
print(row["volume_id"], v.dtype, v.shape, int(v.astype(np.int64).sum()), v[z0:z1, y0:y1, x0:x1].size)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    vid, dtype, *rest = res.stdout.split(" ", 2)
    img = data.volumes[vid][0]
    assert dtype == "uint16"
    assert res.stdout.split(")")[1].split()[0] == str(int(img.astype(np.int64).sum()))


def test_manifest_contents(data, built):
    qs, _, out, manifest = built
    m = read_manifest(out)
    assert m == manifest
    assert m["recipe_hash"] == data.recipe.stage_hash("shards") and m["schema_version"] == 3
    assert {s: m["splits"][s]["rows"] for s in m["splits"]} == {
        s: sum(q.split == s for q in qs) for s in ("train", "val", "test")
    }
    image_columns = {
        "image",
        "image_shape",
        "image_dtype",
        "image_codec",
        "image_spacing",
        "image_affine_lps",
    }
    assert set(QUINTUPLE_COLUMNS) | image_columns == set(SCHEMA.names)


# ----------------------------------------------------------------------------------------------------------
# validation


@pytest.fixture
def copy_of(built, tmp_path):
    import shutil

    _, _, out, manifest = built
    dst = tmp_path / "shards"
    shutil.copytree(out, dst)
    return dst, manifest


def test_validate_clean(built):
    assert validate_shards(built[2]) == []


def test_validate_catches_flipped_byte(copy_of):
    d, m = copy_of
    p = d / m["shards"][0]["path"]
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    probs = validate_shards(d)
    assert [(pr.path, pr.kind) for pr in probs] == [(m["shards"][0]["path"], "checksum")]


def test_validate_catches_wrong_checksum_in_manifest(copy_of):
    d, m = copy_of
    mm = json.loads((d / MANIFEST).read_text())
    mm["shards"][1]["sha256"] = "0" * 64
    (d / MANIFEST).write_text(json.dumps(mm))
    assert [(p.path, p.kind) for p in validate_shards(d)] == [(m["shards"][1]["path"], "checksum")]


def test_validate_compares_the_volumes_file_with_the_quintuples_file(copy_of):
    """A volumes file rewritten with other content (and the manifest's size and sha256 made to match) is
    caught by the comparison with its quintuples file: image bytes, patient, question counts, volume order."""
    import hashlib

    import pyarrow.parquet as pq

    d, m = copy_of
    e = next(e for e in m["shards"] if e["volumes"] >= 2)
    vp = d / e["volumes_path"]
    good = pq.read_table(vp)

    def rewrite(table):
        pq.write_table(table, vp)
        mm = json.loads((d / MANIFEST).read_text())
        me = next(x for x in mm["shards"] if x["path"] == e["path"])
        me["volumes_bytes"], me["volumes_sha256"] = (
            vp.stat().st_size,
            hashlib.sha256(vp.read_bytes()).hexdigest(),
        )
        (d / MANIFEST).write_text(json.dumps(mm))
        return [(p.path, p.kind, p.message) for p in validate_shards(d)]

    def with_column(name, values):
        return good.set_column(
            good.schema.get_field_index(name),
            good.schema.field(name),
            pa.array(values, good.schema.field(name).type),
        )

    images = good.column("image").to_pylist()
    flipped = [bytes([images[0][0] ^ 1]) + images[0][1:], *images[1:]]
    found = rewrite(with_column("image", flipped))
    assert [(p, k) for p, k, _ in found] == [(e["volumes_path"], "image")]
    assert "differ from the quintuples file" in found[0][2]
    patients = good.column("patient_id").to_pylist()
    found = rewrite(with_column("patient_id", ["someone-else", *patients[1:]]))
    assert [(p, k, msg) for p, k, msg in found] == [
        (e["volumes_path"], "volumes", "patient_id differs from the quintuples file")
    ]
    counts = good.column("questions").to_pylist()
    found = rewrite(with_column("questions", [counts[0] + 1, *counts[1:]]))
    assert [msg for _, _, msg in found] == ["questions per volume differ from the quintuples file"]
    found = rewrite(good.take(list(range(good.num_rows))[::-1]))
    assert [(p, k) for p, k, _ in found] == [(e["volumes_path"], "volumes")]
    assert rewrite(good) == []


def test_validate_catches_missing_and_extra_shards(copy_of):
    d, m = copy_of
    (d / m["shards"][0]["path"]).rename(d / "data" / "train-00099-of-00100.parquet")
    (d / "train").mkdir()
    (d / "train" / "part-00000.parquet").write_bytes(b"old layout")
    kinds = sorted((p.kind, p.path) for p in validate_shards(d))
    assert kinds == [
        ("extra", "data/train-00099-of-00100.parquet"),
        ("extra", "train/part-00000.parquet"),
        ("missing", m["shards"][0]["path"]),
    ]


def test_validate_catches_bad_box_rows_and_split_leak(data, built, tmp_path):
    qs, _, _, _ = built
    bad = list(qs)
    i = next(k for k, q in enumerate(bad) if q.box is not None)
    b = bad[i].box
    bad[i] = replace(
        bad[i], box=replace(b, voxels=(b.voxels[0], b.voxels[1], b.voxels[2], 99, b.voxels[4], b.voxels[5]))
    )
    j = next(k for k, q in enumerate(bad) if q.split == "val")
    bad[j] = replace(bad[j], patient_id=bad[0].patient_id)  # a train patient now also in val
    write_shards(bad, data.read_volume, tmp_path, data.recipe)
    kinds = sorted({p.kind for p in validate_shards(tmp_path)})
    assert kinds == ["box", "split_leak"]
    mm = json.loads((tmp_path / MANIFEST).read_text())
    mm["shards"][0]["rows"] += 1
    (tmp_path / MANIFEST).write_text(json.dumps(mm))
    assert "rows" in {p.kind for p in validate_shards(tmp_path)}


def test_validate_without_manifest(tmp_path):
    (tmp_path / "train").mkdir()
    probs = validate_shards(tmp_path)
    assert len(probs) == 1 and probs[0].kind == "manifest" and "no manifest" in probs[0].message


# ----------------------------------------------------------------------------------------------------------
# the commands


@pytest.fixture(scope="module")
def on_disk(data, tmp_path_factory):
    """The fake data as a real volume store and annotation directory."""
    from kneeprep.formats.annotations import write_quintuples_jsonl
    from kneeprep.formats.splits import write_split_csv
    from kneeprep.formats.store import init_store, write_volume

    root = tmp_path_factory.mktemp("cli")
    store = init_store(root / "volumes.zarr")
    for vid, (img, geom) in data.volumes.items():
        write_volume(store, vid, img, geom, {k: v for k, v in data.attrs[vid].items() if k != "geometry"})
    ann = root / "annotations"
    for split in ("train", "val", "test"):
        rows = [s for s in data.annotations.splits if s.split == split]
        write_split_csv(ann / "split_files" / f"{split}_split.csv", [r.__dict__ for r in rows])
    write_quintuples_jsonl(ann / "quintuples.jsonl", data.annotations.records)
    return store, ann, root


def run_cli(*args):
    from click.testing import CliRunner

    from kneeprep.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_shards_then_validate_then_rerun(data, built, on_disk):
    store, ann, root = on_disk
    out = root / "shards"
    r = run_cli("shards", store, ann, out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert "quintuples: train 24, val 6, test 6 (total 36)" in r.output
    assert "rejected: 12 (no_box 12)" in r.output
    report = json.loads((out / "report.json").read_text())
    assert (
        report["rejected"] == {"no_box": 12} and report["errors"] == 0 and len(report["rejected_items"]) == 12
    )
    # the same quintuples as the in-memory join (the JSONL round trip loses nothing)
    assert [quintuple_from_row(x) for x in iter_quintuples(out)] == built[0]
    v = run_cli("validate", out, "--workers", "0")
    assert v.exit_code == 0 and "OK (" in v.output, v.output
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run_cli("shards", store, ann, out, "--workers", "0")
    assert again.exit_code == 0 and "up to date" in again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    changed = root / "recipe.toml"
    changed.write_text('[shards]\ncodec = "lz4"\n')
    r3 = run_cli("shards", store, ann, out, "--recipe", changed, "--workers", "0")
    assert r3.exit_code == 0 and "up to date" not in r3.output and "(lz4)" in r3.output


def test_cli_exit_1_on_error_rejections_and_validate_problems(on_disk, tmp_path):
    import shutil

    store, ann, root = on_disk
    ann2 = tmp_path / "ann"
    shutil.copytree(ann, ann2)
    with (ann2 / "quintuples.jsonl").open("a") as fh:
        fh.write('{"sample_id": "x", "volume_id": "9999999_00M_20040101_10000001_1", "question_id": "3"\n')
    r = run_cli("shards", store, ann2, tmp_path / "shards", "--workers", "0")
    assert r.exit_code == 1 and "[annotation]" in r.output and "annotation 1" in r.output
    p = next((tmp_path / "shards").rglob("*.parquet"))
    p.write_bytes(p.read_bytes()[:-20])
    v = run_cli("validate", tmp_path / "shards", "--workers", "0")
    assert (
        v.exit_code == 1 and "[bytes]" in v.output and "[checksum]" in v.output and "problem(s)" in v.output
    )
