"""Boxes from label arrays: one-pass stats vs a naive ``np.nonzero`` per region, forms, margins, world mapping."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kneeprep import boxes as kb
from kneeprep.boxes import boxes_for_volume, compute_boxes, label_stats, question_box
from kneeprep.errors import AnnotationError, MaskError
from kneeprep.formats.box import (
    Box,
    boxes_schema,
    list_form_to_voxels,
    normalized_to_voxels,
    voxels_to_list_form,
    voxels_to_normalized,
)
from kneeprep.geometry import Geometry
from kneeprep.recipe import Recipe

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def naive_box(labels: np.ndarray, ids) -> tuple[tuple[int, ...] | None, int, tuple[float, ...] | None]:
    """The reference: ``np.nonzero`` of the region's mask."""
    idx = np.nonzero(np.isin(labels, list(ids)))
    if idx[0].size == 0:
        return None, 0, None
    box = tuple(int(i.min()) for i in idx) + tuple(int(i.max()) + 1 for i in idx)
    return box, int(idx[0].size), tuple(float(i.mean()) for i in idx)


def assert_matches_naive(labels, regions, got):
    assert set(got) == set(regions)
    for name, ids in regions.items():
        box, count, centroid = naive_box(labels, ids)
        b = got[name]
        assert b.region == name and b.label_ids == tuple(sorted(set(ids)))
        assert b.voxels == box, name
        assert b.voxel_count == count
        assert b.empty is (count == 0)
        if centroid is None:
            assert b.centroid is None and b.list_form is None and b.normalized is None
        else:
            np.testing.assert_allclose(b.centroid, centroid, rtol=0, atol=1e-9)
            z0, y0, x0, z1, y1, x1 = box
            # the box is exactly the region: every face touches it, nothing outside
            m = np.isin(labels, list(ids))
            assert m[z0:z1, y0:y1, x0:x1].sum() == count


# ----------------------------------------------------------------------------------------------------------
# strategies

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))


@st.composite
def label_arrays(draw, dtypes=(np.uint8, np.uint16, np.int32, np.int64)):
    shape = draw(shapes)
    dtype = draw(st.sampled_from(dtypes))
    info = np.iinfo(dtype)
    # small dense ids, or a few wide ones (exercises the direct, lookup-table and sorted-search paths)
    pool = draw(
        st.one_of(
            st.lists(st.integers(0, 6), min_size=1, max_size=7),
            st.lists(st.integers(max(info.min, -(2**40)), min(info.max, 2**40)), min_size=1, max_size=5),
        )
    )
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    arr = rng.choice(np.array(pool, dtype=dtype), size=shape)
    if draw(st.booleans()):
        arr[rng.random(shape) < 0.7] = 0  # mostly background, like a knee mask
    return arr


@st.composite
def region_maps(draw, ids):
    ids = sorted({int(i) for i in ids} | {1, 2, 3})
    n = draw(st.integers(1, 5))
    return {f"r{k}": draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4)) for k in range(n)}


# ----------------------------------------------------------------------------------------------------------
# exactness


@SETTINGS
@given(data=st.data())
def test_matches_naive_nonzero_on_random_arrays(data):
    labels = data.draw(label_arrays())
    regions = data.draw(region_maps(np.unique(labels)))
    assert_matches_naive(labels, regions, compute_boxes(labels, regions))


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    data=st.data(),
    label=st.integers(1, 65535),
    dtype=st.sampled_from([np.uint16, np.int32]),
)
def test_single_painted_box_comes_back_exactly(shape, data, label, dtype):
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    hi = [data.draw(st.integers(a + 1, n)) for a, n in zip(lo, shape, strict=True)]
    labels = np.zeros(shape, dtype=dtype)
    labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = label
    b = compute_boxes(labels, {"r": [label]})["r"]
    assert b.voxels == (*lo, *hi)
    assert b.voxel_count == int(np.prod([h - a for a, h in zip(lo, hi, strict=True)]))
    assert b.centroid == tuple((a + h - 1) / 2 for a, h in zip(lo, hi, strict=True))
    assert b.list_form == (lo[0], hi[0] - 1, lo[2], hi[2] - 1, lo[1], hi[1] - 1)
    assert b.normalized == tuple(v / n for v, n in zip((*lo, *hi), shape * 2, strict=True))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_labels=st.integers(2, 40))
def test_many_blobs_and_their_unions(seed, n_labels):
    """Many labelled blobs painted over each other (later ones win), many unions at once."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(4, 20, size=3))
    labels = np.zeros(shape, dtype=np.uint8)
    zz, yy, xx = np.indices(shape)
    for lid in range(1, n_labels + 1):
        c = rng.uniform(0, shape)
        r = rng.uniform(0.5, 4, size=3)
        labels[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = lid
    regions = {str(lid): [lid] for lid in range(1, n_labels + 1)}
    for k in range(8):
        regions[f"union{k}"] = sorted(
            rng.choice(np.arange(1, n_labels + 1), size=rng.integers(2, 6)).tolist()
        )
    got = compute_boxes(labels, regions)
    assert_matches_naive(labels, regions, got)
    # a union's box is the box of its members' boxes; counts add
    for k in range(8):
        u = got[f"union{k}"]
        members = [got[str(i)] for i in set(regions[f"union{k}"]) if not got[str(i)].empty]
        assert u.voxel_count == sum(m.voxel_count for m in members)
        if members:
            v = np.array([m.voxels for m in members])
            assert u.voxels == (*v[:, :3].min(0).tolist(), *v[:, 3:].max(0).tolist())


@SETTINGS
@given(data=st.data(), splits=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))
def test_block_stats_merge_to_the_whole(data, splits):
    """dask-image style: stats of awkward blocks (uneven, size-1) merged equal the serial stats."""
    labels = data.draw(label_arrays())
    edges = []
    for n, k in zip(labels.shape, splits, strict=True):
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=k)))) if n > 1 else []
        edges.append([0, *cuts, n])
    whole = label_stats(labels)
    merged = None
    for z0, z1 in zip(edges[0], edges[0][1:], strict=False):
        for y0, y1 in zip(edges[1], edges[1][1:], strict=False):
            for x0, x1 in zip(edges[2], edges[2][1:], strict=False):
                s = label_stats(labels[z0:z1, y0:y1, x0:x1], offset=(z0, y0, x0), shape=labels.shape)
                merged = s if merged is None else merged.merge(s)
    np.testing.assert_array_equal(merged.ids, whole.ids)
    for name in ("per_z", "per_y", "per_x"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
    regions = {str(i): [int(i)] for i in whole.ids}
    assert kb.boxes_from_stats(merged, regions) == kb.boxes_from_stats(whole, regions)


def test_awkward_inputs():
    # bool masks, Fortran order, non-contiguous views, size-1 axes, negative and huge ids
    m = np.zeros((3, 1, 5), dtype=bool)
    m[1, 0, 2:4] = True
    assert compute_boxes(m, {"m": [1]})["m"].voxels == (1, 0, 2, 2, 1, 4)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, size=(7, 6, 9)).astype(np.uint16)
    for view in (np.asfortranarray(a), a[::2, ::-1, 1::3], a.transpose(2, 0, 1)):
        assert_matches_naive(view, {"a": [1], "b": [2, 4]}, compute_boxes(view, {"a": [1], "b": [2, 4]}))
    b = rng.choice(np.array([0, -3, 7, 2**40], dtype=np.int64), size=(4, 5, 6))
    regs = {"neg": [-3], "big": [2**40], "both": [-3, 2**40, 99]}
    assert_matches_naive(b, regs, compute_boxes(b, regs))
    empty = np.zeros((0, 4, 4), dtype=np.uint8)
    assert compute_boxes(empty, {"x": [1]})["x"].empty


def test_unknown_labels_are_counted_not_boxed():
    labels = np.zeros((4, 4, 4), dtype=np.uint16)
    labels[0, 0, :3] = 1
    labels[1, :2, 0] = 500
    labels[3, 3, 3] = 9
    stats = label_stats(labels)
    assert stats.unknown_labels({"one": [1], "nine": [9]}) == {500: 2}
    assert stats.counts == {0: 64 - 6, 1: 3, 9: 1, 500: 2}
    got = compute_boxes(labels, {"one": [1]})
    assert got["one"].voxels == (0, 0, 0, 1, 1, 3)


def test_empty_region_is_flagged_never_invented():
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[2, 3, 4] = 1
    g = Geometry((5, 6, 7), (1.0, 1.0, 1.0), np.eye(4))
    got = compute_boxes(labels, {"absent": [2, 3], "present": [1, 2]}, g, margin_mm=2.0)
    e = got["absent"]
    assert e.empty and e.voxels is None and e.voxel_count == 0 and e.list_form is None
    assert e.size_mm is None and e.center_lps is None and e.normalized is None and e.centroid is None
    assert Box.from_json(json.loads(json.dumps(e.to_json()))) == e
    assert not got["present"].empty


def test_boxes_table_rows_read_the_stored_boxes_as_box_records_do():
    """The table's rows come from the stored dicts directly; each equals what ``Box.from_json`` then
    ``to_json`` gives -- for computed boxes, an empty one, and older or looser attrs (no ``margin_mm`` or
    ``empty``, integer-valued floats, string numbers)."""
    from types import SimpleNamespace

    from kneeprep.stages.boxes import table_rows

    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:3, 2:5, 3] = 1
    g = Geometry((5, 6, 7), (1.0, 0.5, 0.5), np.eye(4))
    stored = [b.to_json() for b in compute_boxes(labels, {"a": [1], "gone": [2]}, g, margin_mm=1.0).values()]
    loose = {"region": "old", "label_ids": ["1"], "voxels": [0, 0, 0, 1, 1, 1], "voxel_count": "4",
             "centroid": [1, 2, 3], "size_mm": [1, 1, 1], "center_lps": None, "normalized": [0, 0, 0, 1, 1, 1],
             "list_form": [0, 0, 0, 0, 0, 0]}  # fmt: skip
    attrs = SimpleNamespace(volume_id="v", boxes=(*stored, loose))
    want = [{"volume_id": "v", **Box.from_json(d).to_json()} for d in attrs.boxes]
    got = table_rows(attrs)
    assert got == want and [list(r) for r in got] == [list(r) for r in want]
    assert [type(x) for x in got[-1]["centroid"]] == [float] * 3 and got[-1]["voxel_count"] == 4
    assert got[-1]["empty"] is False and got[-1]["margin_mm"] == 0.0 and got[1]["empty"] is True
    assert table_rows(SimpleNamespace(volume_id="v", boxes=None)) == []


# ----------------------------------------------------------------------------------------------------------
# forms, margins, records


@SETTINGS
@given(
    z0=st.integers(0, 200),
    y0=st.integers(0, 500),
    x0=st.integers(0, 500),
    dz=st.integers(1, 50),
    dy=st.integers(1, 50),
    dx=st.integers(1, 50),
)
def test_list_form_round_trips(z0, y0, x0, dz, dy, dx):
    v = (z0, y0, x0, z0 + dz, y0 + dy, x0 + dx)
    lf = voxels_to_list_form(v)
    assert lf[1] - lf[0] + 1 == dz and lf[3] - lf[2] + 1 == dx and lf[5] - lf[4] + 1 == dy
    assert list_form_to_voxels(lf) == v
    shape = (z0 + dz, y0 + dy, x0 + dx)
    assert normalized_to_voxels(voxels_to_normalized(v, shape), shape) == v


def test_bad_forms_are_refused():
    with pytest.raises(ValueError, match="z0 < z1"):
        voxels_to_list_form([3, 0, 0, 3, 1, 1])
    with pytest.raises(ValueError, match="start <= end"):
        list_form_to_voxels([4, 3, 0, 0, 0, 0])


@SETTINGS
@given(
    data=st.data(),
    margin_mm=st.floats(0, 5),
    spacing=st.tuples(*[st.sampled_from([0.3646, 0.5, 0.7, 1.0])] * 3),
)
def test_margin_grows_each_side_and_clips_at_the_border(data, margin_mm, spacing):
    shape = (10, 12, 14)
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    hi = [data.draw(st.integers(a + 1, n)) for a, n in zip(lo, shape, strict=True)]
    labels = np.zeros(shape, np.uint8)
    labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 3
    g = Geometry(shape, spacing, np.diag([*spacing, 1.0]))
    b = compute_boxes(labels, {"r": [3]}, g, margin_mm)["r"]
    pad = [int(np.ceil(margin_mm / s - 1e-9)) for s in spacing]
    want = [max(a - p, 0) for a, p in zip(lo, pad, strict=True)] + [
        min(h + p, n) for h, p, n in zip(hi, pad, shape, strict=True)
    ]
    assert list(b.voxels) == want
    assert b.margin_mm == margin_mm
    # the margin covers at least margin_mm wherever it is not clipped
    for a in range(3):
        if want[a] > 0:
            assert (lo[a] - want[a]) * spacing[a] >= margin_mm - 1e-6
    assert b.voxel_count == int(np.prod(np.subtract(hi, lo)))  # the mask, not the box
    np.testing.assert_allclose(b.size_mm, [(want[a + 3] - want[a]) * spacing[a] for a in range(3)])


def test_margin_needs_a_geometry_and_a_matching_shape():
    labels = np.ones((2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="needs a geometry"):
        compute_boxes(labels, {"r": [1]}, None, 1.0)
    with pytest.raises(MaskError, match=r"\(2, 2, 2\).*\(3, 2, 2\)"):
        compute_boxes(labels, {"r": [1]}, Geometry((3, 2, 2), (1, 1, 1), np.eye(4)))
    with pytest.raises(MaskError, match="integer"):
        compute_boxes(labels.astype(np.float32), {"r": [1]})
    with pytest.raises(MaskError, match="3D"):
        compute_boxes(labels[0], {"r": [1]})


@SETTINGS
@given(labels=label_arrays(dtypes=(np.uint8,)))
def test_json_round_trip(labels):
    g = Geometry(labels.shape, (0.7, 0.36, 0.36), np.diag([0.7, 0.36, 0.36, 1.0]))
    for b in compute_boxes(labels, {"a": [1], "b": [2, 3]}, g, 0.5).values():
        assert Box.from_json(json.loads(json.dumps(b.to_json()))) == b


def test_doctests():
    from kneeprep.formats import box as box_mod

    results = [doctest.testmod(m) for m in (kb, box_mod)]
    assert sum(r.attempted for r in results) >= 6 and not any(r.failed for r in results)


# ----------------------------------------------------------------------------------------------------------
# world coordinates


def oblique_affine(spacing, angles=(0.3, -0.5, 0.8), origin=(-40.0, 12.5, 80.0)):
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    m = np.eye(4)
    m[:3, :3] = (rz @ ry @ rx) * np.asarray(spacing)[None, :]
    m[:3, 3] = origin
    return m


def reorient(arr, affine, flips, perm):
    """Flip array axes ``flips`` then transpose to ``perm``; return the new array and the affine that keeps
    every voxel's world position."""
    shape = np.array(arr.shape)
    new = np.flip(arr, axis=flips) if flips else arr
    new = new.transpose(perm)
    # new index j -> index after flips i' (i'[perm[k]] = j[k]) -> original index i (i = n-1-i' on flipped axes)
    p = np.zeros((4, 4))
    for k, ax in enumerate(perm):
        p[ax, k] = 1
    p[3, 3] = 1
    f = np.eye(4)
    for ax in flips:
        f[ax, ax] = -1
        f[ax, 3] = shape[ax] - 1
    return np.ascontiguousarray(new), affine @ f @ p


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    flips=st.lists(st.integers(0, 2), unique=True, max_size=3),
    perm=st.permutations([0, 1, 2]),
    margin_mm=st.sampled_from([0.0, 1.3]),
)
def test_world_boxes_survive_reorientation(seed, flips, perm, margin_mm):
    """Box centres and mask centroids in LPS do not depend on how the array is stored (oblique affine)."""
    rng = np.random.default_rng(seed)
    shape = (9, 14, 11)
    spacing = (0.7, 0.3646, 0.5)
    labels = np.zeros(shape, np.uint8)
    for lid in (1, 2, 3):
        lo = rng.integers(0, np.array(shape) - 1)
        hi = lo + rng.integers(1, np.array(shape) - lo + 1)
        labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = lid
    labels[rng.random(shape) < 0.05] = 4
    affine = oblique_affine(spacing)
    g = Geometry(shape, spacing, affine)
    new, affine2 = reorient(labels, affine, tuple(flips), tuple(perm))
    g2 = Geometry(new.shape, tuple(spacing[a] for a in perm), affine2)
    # sanity of the helper: a voxel keeps its world position
    i = np.array([3, 5, 7])
    j = np.array([(shape[a] - 1 - i[a]) if a in flips else i[a] for a in perm])
    assert new[tuple(j)] == labels[tuple(i)]
    np.testing.assert_allclose(g2.index_to_world(j), g.index_to_world(i), atol=1e-9)

    regions = {"a": [1], "b": [2, 3], "c": [1, 2, 3, 4], "none": [9]}
    before = compute_boxes(labels, regions, g, margin_mm)
    after = compute_boxes(new, regions, g2, margin_mm)
    voxel = min(spacing)
    for name in regions:
        b, a = before[name], after[name]
        assert b.empty == a.empty and b.voxel_count == a.voxel_count
        if b.empty:
            continue
        assert np.linalg.norm(np.subtract(a.center_lps, b.center_lps)) < voxel
        np.testing.assert_allclose(a.center_lps, b.center_lps, atol=1e-6)
        np.testing.assert_allclose(a.size_mm, [b.size_mm[p] for p in perm], atol=1e-9)
        np.testing.assert_allclose(g2.index_to_world(a.centroid), g.index_to_world(b.centroid), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# recipe helpers


def test_boxes_for_volume_uses_recipe_regions_and_margin():
    r = Recipe()
    regions = r.labels.region_labels()
    lids = {name: ids[0] for name, ids in regions.items() if len(ids) == 1}
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:5, 3:9, 4:6] = lids["femur medial central"]
    labels[10:12, 20:25, 20:29] = lids["femur lateral central"]
    g = Geometry(labels.shape, (0.7, 0.5, 0.5), np.diag([0.7, 0.5, 0.5, 1.0]))
    out = boxes_for_volume(labels, g, r)
    assert [b.region for b in out] == list(regions)
    by = {b.region: b for b in out}
    assert by["femur medial central"].voxels == (2, 3, 4, 5, 9, 6)
    assert by["femur"].voxels == (2, 3, 4, 12, 25, 29)
    assert sum(not b.empty for b in out) == 3
    r2 = Recipe(boxes=kb_boxes(0.7))
    by2 = {b.region: b for b in boxes_for_volume(labels, g, r2)}
    assert by2["femur medial central"].voxels == (1, 1, 2, 6, 11, 8)


def kb_boxes(margin):
    from kneeprep.recipe import Boxes

    return Boxes(margin_mm=margin)


def test_question_box_and_its_reasons():
    from kneeprep.moaks.anatomy import QUESTIONS

    r = Recipe()
    labels = np.zeros((6, 6, 6), np.uint8)
    regions = r.labels.region_labels()
    labels[1:3, 1:3, 1:3] = regions["femur medial central"][0]
    by = compute_boxes(labels, regions)
    # question ids looked up by region, so the test does not depend on the bank's order
    boxed = next(q for q, reg in r.questions.items() if reg == "femur medial central")
    other = next(q for q, reg in r.questions.items() if reg == "femur lateral central")
    unboxed = next(q for q, reg in r.questions.items() if reg is None)
    box, why = question_box(by, r, boxed)
    assert why is None and box.region == "femur medial central" and box.voxels == (1, 1, 1, 3, 3, 3)
    box, why = question_box(list(by.values()), r, int(other))
    assert box is None and why == "region femur lateral central is empty in this mask"
    box, why = question_box(by, r, unboxed)
    assert box is None and why == f"no mask region for {QUESTIONS[unboxed].finding}"
    box, why = question_box({}, r, boxed)
    assert box is None and "has no box" in why
    with pytest.raises(AnnotationError, match="'70'"):
        question_box(by, r, "70")


# ----------------------------------------------------------------------------------------------------------
# CLI (the store side is tested once kneeprep.formats.store exists)


def test_cli_boxes_help_and_misuse(tmp_path):
    from click.testing import CliRunner

    from kneeprep.cli import cli

    r = CliRunner().invoke(cli, ["boxes", "--help"])
    assert r.exit_code == 0 and "boxes.parquet" in r.output and "--recipe" in r.output
    r = CliRunner().invoke(cli, ["boxes", str(tmp_path / "missing.zarr")])
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.slow
def test_full_size_knee_mask_matches_naive():
    from bench.bench_boxes import knee_mask, naive_boxes

    mask = knee_mask()
    regions = Recipe().labels.region_labels()
    got = compute_boxes(mask, regions)
    for name, ref in naive_boxes(mask, regions).items():
        assert ref is not None, name  # every sample label is painted
        assert (got[name].voxels, got[name].voxel_count) == ref[:2]
        np.testing.assert_allclose(got[name].centroid, ref[2], atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# the store side: boxes.parquet and `kneeprep boxes`


def _store_with_volumes(tmp_path, recipe):
    from kneeprep.formats import store

    root = store.init_store(tmp_path / "volumes.zarr")
    regions = recipe.labels.region_labels()
    lid = {name: ids[0] for name, ids in regions.items() if len(ids) == 1}
    g = Geometry((6, 8, 10), (0.7, 0.5, 0.5), oblique_affine((0.7, 0.5, 0.5)))
    a = np.zeros(g.shape, np.uint8)
    a[1:3, 2:5, 3:9] = lid["tibia medial central"]
    a[4, 0, 0] = 200  # not in the label map
    b = np.zeros(g.shape, np.uint8)
    b[0:6, 7:8, 9:10] = lid["acl"]
    for vid, lab in (("9000001_00M_20040101_10000001_1", a), ("9000002_00M_20040101_10000002_2", b)):
        attrs = {"volume_id": vid, "boxes": [], "provenance": {"recipe_name": "x", "convert_hash": "c0ffee"}}
        store.write_volume(
            root, vid, np.zeros(g.shape, np.uint16), g, attrs, {"anatomy": (lab, recipe.labels.map)}
        )
    return root, g, {"9000001_00M_20040101_10000001_1": a, "9000002_00M_20040101_10000002_2": b}


def test_recompute_store_boxes_updates_attrs_and_table(tmp_path):
    import pyarrow.parquet as pq

    from kneeprep.formats import store
    from kneeprep.recipe import Boxes
    from kneeprep.stages.boxes import recompute_store_boxes

    recipe = Recipe(boxes=Boxes(margin_mm=0.5))
    root, g, arrays = _store_with_volumes(tmp_path, recipe)
    summary = recompute_store_boxes(root, recipe)
    n_regions = len(recipe.labels.region_labels())
    assert summary.volumes == 2 and summary.failures == ()
    # vol a: the label + tibia, tibia medial; vol b: acl alone
    assert summary.boxes == 3 + 1 and summary.empty == 2 * n_regions - 4
    assert summary.unknown_labels == {"9000001_00M_20040101_10000001_1": {200: 1}}
    assert summary.boxes_hash == recipe.stage_hash("boxes") != Recipe().stage_hash("boxes")
    for vid, lab in arrays.items():
        attrs = store.read_attrs(root, vid)
        assert attrs["provenance"] == {
            "recipe_name": "x",
            "convert_hash": "c0ffee",
            "boxes_hash": summary.boxes_hash,
        }
        want = [b.to_json() for b in boxes_for_volume(lab, g, recipe)]
        assert attrs["boxes"] == want
    table = pq.read_table(summary.table)
    assert table.schema.equals(boxes_schema())
    assert table.num_rows == 2 * n_regions
    rows = table.to_pylist()
    tmc = next(
        r for r in rows if r["region"] == "tibia medial central" and r["volume_id"].startswith("9000001")
    )
    # margin 0.5 mm = 1 voxel on every side, clipped at 0 on nothing here
    assert tmc["voxels"] == [0, 1, 2, 4, 6, 10] and tmc["voxel_count"] == 2 * 3 * 6 and not tmc["empty"]
    assert tmc["list_form"] == [0, 3, 2, 9, 1, 5]
    acl = next(r for r in rows if r["region"] == "acl" and r["volume_id"].startswith("9000001"))
    assert acl["empty"] and acl["voxels"] is None and acl["list_form"] is None
    assert not list(root.glob("*.partial"))


def test_stale_only_leaves_the_volumes_known_current_unread(tmp_path):
    """``current`` (rebuild: what convert has just written) are counted unchanged without being checked;
    the other stale volumes are still recomputed."""
    from kneeprep.formats import store
    from kneeprep.recipe import Boxes
    from kneeprep.stages.boxes import recompute_store_boxes

    recipe = Recipe(boxes=Boxes(margin_mm=0.5))  # the store's volumes carry no boxes hash: all stale
    root, _, arrays = _store_with_volumes(tmp_path, recipe)
    known, other = sorted(arrays)
    s = recompute_store_boxes(root, recipe, stale_only=True, current={known, "not-in-the-store"})
    assert (s.volumes, s.unchanged, s.failures) == (1, 1, ())
    assert store.read_attrs(root, other)["provenance"]["boxes_hash"] == recipe.stage_hash("boxes")
    assert "boxes_hash" not in store.read_attrs(root, known)["provenance"]  # not touched: taken as current
    s = recompute_store_boxes(root, recipe, current={known})  # not stale_only: every volume recomputed
    assert (s.volumes, s.unchanged) == (2, 0)


def test_recompute_records_a_volume_without_labels(tmp_path):
    from kneeprep.formats import store
    from kneeprep.stages.boxes import recompute_store_boxes, write_boxes_table

    recipe = Recipe()
    root, g, _ = _store_with_volumes(tmp_path, recipe)
    store.write_volume(
        root,
        "9000003_00M_20040101_10000003_1",
        np.zeros(g.shape, np.uint16),
        g,
        {"volume_id": "9000003_00M_20040101_10000003_1"},
    )
    s = recompute_store_boxes(root, recipe)
    assert s.volumes == 2
    assert [(v, k) for v, k, _ in s.failures] == [("9000003_00M_20040101_10000003_1", "not_found")]
    assert "no label layers" in s.failures[0][2]
    import pyarrow.parquet as pq

    assert pq.read_table(write_boxes_table(root)).num_rows == 2 * len(recipe.labels.region_labels())


def test_cli_boxes_on_a_store(tmp_path):
    from click.testing import CliRunner

    from kneeprep.cli import cli

    recipe = Recipe()
    root, _, _ = _store_with_volumes(tmp_path, recipe)
    toml = tmp_path / "r.toml"
    toml.write_text('[recipe]\nname = "m"\n[boxes]\nmargin_mm = 1.0\n')
    r = CliRunner().invoke(cli, ["boxes", str(root), "--recipe", str(toml)])
    assert r.exit_code == 0, r.output
    assert "2 volumes: 4 boxes" in r.output and "unknown labels 200 (1 voxels)" in r.output
    from kneeprep.formats import store

    assert store.boxes_table_path(root).is_file()
    vid = store.list_volumes(root)[0]
    assert {b["margin_mm"] for b in store.read_attrs(root, vid)["boxes"]} == {1.0}
