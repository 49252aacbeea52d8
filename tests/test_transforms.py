"""Transforms: orientation codes, mirroring, resampling and normalization as pure functions."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from kneeprep.errors import GeometryError, RecipeError
from kneeprep.geometry import Geometry, affine_from_itk, index_to_world
from kneeprep.transforms import (
    MirrorParams,
    NormalizeParams,
    OrientParams,
    ResampleParams,
    apply_mirror,
    apply_normalize,
    apply_orient,
    apply_resample,
    mirror,
    normalize,
    orient,
    plan_mirror,
    plan_normalize,
    plan_orient,
    plan_resample,
    resample,
)

ALL_CODES = [
    "".join(p) for axes in itertools.permutations(["LR", "PA", "SI"]) for p in itertools.product(*axes)
]


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def dess_like(shape=(6, 7, 8), tilt=(0.15, -0.1, 0.2)) -> tuple[np.ndarray, Geometry]:
    """A small sagittal 'PIR' grid tilted by a few degrees, with distinct voxel values."""
    base = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)  # ITK columns: P, I, R
    direction = rotation(*tilt) @ base
    affine = affine_from_itk((-12.5, 30.0, 41.0), (0.36, 0.4, 0.7), direction.ravel())
    arr = np.arange(np.prod(shape), dtype=np.int16).reshape(shape)
    return arr, Geometry(shape, (0.7, 0.4, 0.36), affine)


def world_to_value(array: np.ndarray, geometry: Geometry) -> dict[tuple, int]:
    idx = np.indices(array.shape).reshape(3, -1).T
    pts = np.round(index_to_world(geometry.affine_lps, idx), 6)
    return {tuple(p): int(v) for p, v in zip(pts, array.reshape(-1), strict=True)}


@pytest.mark.parametrize("module", [orient, mirror, resample, normalize])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# -- orient ---------------------------------------------------------------------------------------------


def test_sample_geometry_is_pir():
    _, g = dess_like()
    assert orient.axis_code(g.affine_lps) == "PIR"


@pytest.mark.parametrize("code", ALL_CODES)
def test_reorient_gives_the_code_and_keeps_world_position_of_every_voxel(code):
    arr, g = dess_like()
    params = plan_orient(g, code)
    out, g2 = apply_orient(arr, g, params)
    assert orient.axis_code(g2.affine_lps) == code
    assert g2.shape == out.shape and sorted(out.shape) == sorted(arr.shape)
    assert world_to_value(out, g2) == world_to_value(arr, g)
    # params survive JSON and reproduce the result
    again, g3 = apply_orient(arr, g, OrientParams.from_json(params.to_json()))
    assert np.array_equal(again, out) and np.allclose(g3.affine_lps, g2.affine_lps)


@pytest.mark.parametrize("code", ["LPS", "RAS", "PIR", "SLA", "IRP"])
def test_reorient_matches_simpleitk_dicomorient(code):
    arr, g = dess_like(tilt=(0.3, -0.2, 0.25))
    image = sitk.GetImageFromArray(arr)
    g.apply_to_sitk(image)
    ref = sitk.DICOMOrient(image, code)
    out, g2 = apply_orient(arr, g, plan_orient(g, code))
    assert np.array_equal(out, sitk.GetArrayFromImage(ref))
    assert np.allclose(g2.affine_lps, Geometry.from_sitk(ref).affine_lps, atol=1e-9)


def test_orientation_round_trip_restores_array_and_affine():
    arr, g = dess_like()
    for code in ("LPS", "RAI", "ASL"):
        out, g2 = apply_orient(arr, g, plan_orient(g, code))
        back, g3 = apply_orient(out, g2, plan_orient(g2, "PIR"))
        assert np.array_equal(back, arr)
        assert np.allclose(g3.affine_lps, g.affine_lps, atol=1e-12)


def test_native_is_identity_and_bad_code_is_an_error():
    arr, g = dess_like()
    p = plan_orient(g, "native")
    assert p.is_identity and p.target == "PIR"
    out, g2 = apply_orient(arr, g, p)
    assert out is arr and g2 is g
    with pytest.raises(GeometryError, match="LLS"):
        plan_orient(g, "LLS")


def test_axis_code_stays_valid_near_45_degrees():
    # Two columns equally close to the same patient axis: the closest-axis code repeats a letter,
    # axis_code still returns three distinct axes.
    affine = affine_from_itk((0, 0, 0), (1, 1, 1), rotation(0, 0, np.pi / 4).ravel())
    code = orient.axis_code(affine)
    assert sorted(orient.LETTER_AXIS[c][0] for c in code) == [0, 1, 2]


# -- mirror ---------------------------------------------------------------------------------------------


def test_mirror_flips_exactly_the_left_right_axis_and_keeps_world_positions():
    arr, g = dess_like()
    p = plan_mirror(g, knee_side=2, mirror_left=True)
    assert p.axis == 0  # sagittal slices run across the knee: closest to patient L-R
    out, g2 = apply_mirror(arr, g, p)
    assert np.array_equal(out, arr[::-1])
    assert np.array_equal(out[:, ::-1, ::-1][::-1], arr[:, ::-1, ::-1])
    assert g2.shape == g.shape and g2.spacing == g.spacing
    assert np.allclose(g2.affine_lps[:3, 0], -g.affine_lps[:3, 0]) and np.allclose(
        g2.affine_lps[:3, 1:3], g.affine_lps[:3, 1:3]
    )
    assert world_to_value(out, g2) == world_to_value(arr, g)
    assert orient.axis_code(g2.affine_lps) == "PIL"
    assert MirrorParams.from_json(p.to_json()) == p and p.to_json()["mirrored"] is True


def test_mirror_only_left_knees_when_asked():
    arr, g = dess_like()
    assert plan_mirror(g, knee_side=1, mirror_left=True).axis is None
    assert plan_mirror(g, knee_side=2, mirror_left=False).axis is None
    out, g2 = apply_mirror(arr, g, MirrorParams(None))
    assert out is arr and g2 is g


def test_mirror_axis_follows_orientation():
    arr, g = dess_like()
    out, g2 = apply_orient(arr, g, plan_orient(g, "LPS"))
    assert plan_mirror(g2, 2, True).axis == 2


# -- resample -------------------------------------------------------------------------------------------


def physical_extent(g: Geometry) -> np.ndarray:
    return np.asarray(g.shape) * np.asarray(g.spacing)


def centre(g: Geometry) -> np.ndarray:
    return index_to_world(g.affine_lps, (np.asarray(g.shape) - 1) / 2)


def test_resample_to_shape_keeps_extent_centre_and_direction():
    _, g = dess_like((40, 48, 48))
    p = plan_resample(g, shape=(8, 32, 24))
    t = p.target
    assert t.shape == (8, 32, 24)
    assert np.allclose(physical_extent(t), physical_extent(g))
    assert np.allclose(centre(t), centre(g))
    unit = lambda a: a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)  # noqa: E731
    assert np.allclose(unit(t.affine_lps), unit(g.affine_lps))
    assert ResampleParams.from_json(p.to_json()).target.shape == t.shape


def test_resample_to_spacing_keeps_extent_within_a_voxel():
    _, g = dess_like((40, 48, 48))
    t = plan_resample(g, spacing=(1.0, 0.5, 0.5)).target
    assert t.spacing == (1.0, 0.5, 0.5)
    assert np.all(np.abs(physical_extent(t) - physical_extent(g)) <= np.asarray(t.spacing) / 2 + 1e-9)
    assert np.allclose(centre(t), centre(g))


def test_resample_linear_reproduces_a_linear_ramp_and_nearest_keeps_labels():
    _, g = dess_like((20, 24, 24), tilt=(0, 0, 0))
    ramp = (np.indices(g.shape)[0] * 10 + 100).astype(np.uint16)  # linear along axis 0
    out, t = apply_resample(ramp, g, plan_resample(g, shape=(10, 12, 12)))
    assert out.dtype == np.uint16 and out.shape == (10, 12, 12)
    # each interior target voxel holds the ramp at its continuous source index (found through world space)
    idx = np.indices(out.shape).reshape(3, -1).T
    src = np.linalg.solve(g.affine_lps, t.affine_lps)
    i0 = (idx @ src[:3, :3].T + src[:3, 3])[:, 0].reshape(out.shape)
    inner = (slice(1, -1),) * 3
    assert np.abs(out[inner].astype(float) - (100 + 10 * i0[inner])).max() <= 0.5
    labels = np.zeros(g.shape, np.uint8)
    labels[5:15, 6:18, 6:18] = 7
    lab, _ = apply_resample(labels, g, ResampleParams(t, "nearest"))
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 7}


def test_resample_noop_and_bad_interpolator():
    arr, g = dess_like()
    assert plan_resample(g).target is None
    assert plan_resample(g, spacing=g.spacing).target is None
    with pytest.raises(GeometryError):
        plan_resample(g, shape=(2, 2, 2), interpolator="cubic")


# -- normalize ------------------------------------------------------------------------------------------


def test_none_keeps_values_in_the_smallest_integer_type():
    a = np.array([[[0, 12, 4095]]], dtype=np.float32)
    p = plan_normalize(a, "none")
    out = apply_normalize(a, p)
    assert p.dtype == "uint16" and out.dtype == np.uint16 and out.tolist() == [[[0, 12, 4095]]]
    neg = plan_normalize(np.array([-1024, 3071], dtype=np.int32), "none")
    assert neg.dtype == "int16"
    assert plan_normalize(np.array([0.5, 2.0], dtype=np.float32), "none").dtype == "float32"
    with pytest.raises(RecipeError, match="uint8 cannot hold"):
        plan_normalize(np.array([0, 300], dtype=np.int16), "none", dtype="uint8")


@given(
    st.lists(st.integers(-2000, 5000), min_size=1, max_size=400),
    st.floats(0, 50),
    st.floats(50.0001, 100),
)
@settings(max_examples=60, deadline=None)
def test_integer_percentiles_equal_numpy(values, lo, hi):
    a = np.asarray(values, dtype=np.int16)
    assert np.allclose(normalize.percentiles(a, [lo, hi]), np.percentile(a, [lo, hi]), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "method,kw",
    [
        ("percentile", {"lower": 1, "upper": 99, "dtype": "uint8"}),
        ("percentile", {}),
        ("window", {"lower": 100, "upper": 400, "dtype": "uint16"}),
        ("zscore", {}),
    ],
)
def test_params_saved_as_json_reproduce_the_output(method, kw):
    rng = np.random.default_rng(1)
    a = rng.normal(300, 80, (12, 16, 16)).clip(0).astype(np.uint16)
    p = plan_normalize(a, method, **kw)
    out = apply_normalize(a, p)
    again = apply_normalize(a, NormalizeParams.from_json(p.to_json()))
    assert again.dtype == out.dtype and np.array_equal(again, out)
    if method == "percentile":
        lo, hi = np.percentile(a, [kw.get("lower", 0.5), kw.get("upper", 99.5)])
        assert (p.clip_min, p.clip_max) == (pytest.approx(lo), pytest.approx(hi))
        top = 255 if kw.get("dtype") == "uint8" else 1.0
        assert out.min() == 0 and out.max() == pytest.approx(top)
        assert np.all(out[a >= hi] == pytest.approx(top))
    if method == "window":
        assert out[a <= 100].max() == 0 and out[a >= 400].min() == 65535
    if method == "zscore":
        assert out.dtype == np.float32
        assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-4
        assert p.mean == pytest.approx(a.mean()) and p.std == pytest.approx(a.std())


def test_constant_volume_does_not_divide_by_zero():
    a = np.full((3, 4, 4), 7, np.uint16)
    assert np.all(apply_normalize(a, plan_normalize(a, "percentile")) == 0)
    assert np.all(apply_normalize(a, plan_normalize(a, "zscore")) == 0)
