"""Masks are placed on volume grids through world coordinates, never by array order."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from kneeprep.errors import InputNotFoundError, MaskError
from kneeprep.formats.masks import load_mask_onto, place_mask, read_mask
from kneeprep.geometry import Geometry, affine_from_itk, index_to_world, lps_to_ras, world_to_index
from kneeprep.transforms.orient import permute_flip

LABEL_MAP = {1: "femur", 2: "tibia", 3: "femoral cartilage"}


def target_grid(shape=(20, 24, 28)) -> Geometry:
    """A tilted sagittal grid like the DESS (PIR), small."""
    c, s = np.cos(0.2), np.sin(0.2)
    direction = np.array([[c, 0, -s], [s, 0, c], [0, -1, 0]])  # ITK columns: ~P, I, ~R ... tilted about z
    return Geometry(
        shape, (0.7, 0.4, 0.36), affine_from_itk((-20.0, 10.0, 35.0), (0.36, 0.4, 0.7), direction.ravel())
    )


def blob_labels(shape) -> np.ndarray:
    z, y, x = np.indices(shape)
    lab = np.zeros(shape, np.uint8)
    lab[(z - 8) ** 2 / 30 + (y - 10) ** 2 / 40 + (x - 12) ** 2 / 50 < 1] = 1
    lab[2:6, 15:20, 3:9] = 2
    lab[12:18, 4:8, 18:26] = 3
    return lab


def write_sitk(path, array, geometry):
    image = sitk.GetImageFromArray(array)
    geometry.apply_to_sitk(image)
    sitk.WriteImage(image, str(path))


def test_ras_nifti_in_another_voxel_order_lands_on_the_right_voxels(tmp_path):
    g = target_grid()
    lab = blob_labels(g.shape)
    # Store the mask in a different voxel order (axes permuted and two flipped), then as RAS NIfTI written
    # by nibabel, whose (i, j, k) SimpleITK reads back as (k, j, i).
    other, og = permute_flip(lab, g, (2, 0, 1), (True, False, True))
    path = tmp_path / "knee_001.nii.gz"
    nib.save(nib.Nifti1Image(other, lps_to_ras(og.affine_lps)), str(path))
    raw, mg = read_mask(path)
    assert raw.shape != lab.shape  # really another voxel order
    placed = load_mask_onto(path, g, LABEL_MAP)
    assert placed.labels.dtype == np.uint8
    assert np.array_equal(placed.labels, lab)
    assert placed.present == (1, 2, 3) and placed.unknown_labels == ()
    assert placed.grid_coverage == pytest.approx(1.0) and placed.label_coverage == pytest.approx(1.0)
    assert placed.warnings() == []


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_other_formats_on_the_same_grid_are_copied(tmp_path, suffix):
    g = target_grid()
    lab = blob_labels(g.shape)
    write_sitk(tmp_path / f"m{suffix}", lab, g)
    assert np.array_equal(load_mask_onto(tmp_path / f"m{suffix}", g).labels, lab)


def test_mask_on_a_coarser_grid_is_resampled_by_nearest_neighbour_in_world_space(tmp_path):
    g = target_grid()
    a = g.affine_lps @ np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] += a[:3, :3] @ [0.3, 0.2, 0.35]  # off the target's voxel centres: no exact rounding ties
    coarse = Geometry((10, 12, 14), (1.4, 0.8, 0.72), a)
    lab = blob_labels(coarse.shape)
    lab[3:6, 4:8, 4:8] = 9  # a label outside the map
    write_sitk(tmp_path / "coarse.mha", lab, coarse)
    placed = load_mask_onto(tmp_path / "coarse.mha", g, LABEL_MAP)
    # reference: for every target voxel, the coarse voxel nearest to its world position
    idx = np.indices(g.shape).reshape(3, -1).T
    src = np.rint(world_to_index(coarse.affine_lps, index_to_world(g.affine_lps, idx))).astype(int)
    inside = np.all((src >= 0) & (src < np.asarray(coarse.shape)), axis=1)
    expected = np.zeros(len(idx), np.uint8)
    expected[inside] = lab[tuple(src[inside].T)]
    assert np.array_equal(placed.labels.reshape(-1), expected)
    assert placed.unknown_labels == (9,)
    assert any("[9]" in w for w in placed.warnings())


def test_mask_that_does_not_overlap_is_an_error_naming_the_file(tmp_path):
    g = target_grid()
    far = Geometry(
        g.shape,
        g.spacing,
        g.affine_lps + np.array([[0, 0, 0, 500.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
    )
    write_sitk(tmp_path / "far.nii.gz", blob_labels(g.shape), far)
    with pytest.raises(MaskError, match=r"far\.nii\.gz.*does not overlap"):
        load_mask_onto(tmp_path / "far.nii.gz", g)


def test_overlapping_grid_whose_labels_all_fall_outside_is_an_error():
    g = target_grid()
    lab = np.zeros(g.shape, np.uint8)
    lab[:, :, -3:] = 1  # labels only at the far end of axis 2
    shifted = Geometry(g.shape, g.spacing, g.affine_lps.copy())
    a = shifted.affine_lps.copy()
    a[:3, 3] += a[:3, 2] * (g.shape[2] - 5)  # overlap only in the first 5 columns of the mask
    with pytest.raises(MaskError, match="none of the mask's"):
        place_mask(lab, Geometry(g.shape, g.spacing, a), g, source="edge.nii.gz")


def test_partial_overlap_is_reported():
    g = target_grid()
    lab = blob_labels(g.shape)
    a = g.affine_lps.copy()
    a[:3, 3] += a[:3, 0] * 10  # shifted by 10 slices: half the mask lies outside
    placed = place_mask(lab, Geometry(g.shape, g.spacing, a), g, LABEL_MAP, source="half.nii.gz")
    assert 0.4 < placed.grid_coverage < 0.6
    assert placed.label_coverage < 0.99 and any("lie inside" in w for w in placed.warnings())


def test_bad_masks(tmp_path):
    g = target_grid()
    with pytest.raises(InputNotFoundError):
        read_mask(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(MaskError, match="junk"):
        read_mask(tmp_path / "junk.nii.gz")
    write_sitk(tmp_path / "float.nrrd", np.full(g.shape, 0.5, np.float32), g)
    with pytest.raises(MaskError, match="integers"):
        read_mask(tmp_path / "float.nrrd")
    nan = np.zeros(g.shape, np.float32)
    nan[1:3, 2:5, 2:5] = 4.0
    nan[1, 2, 2] = np.nan  # SimpleITK reads this NIfTI voxel as 0: the check must look at the stored values
    for value, name in ((np.nan, "nan"), (np.inf, "inf")):
        nan[1, 2, 2] = value
        write_sitk(tmp_path / f"{name}.nii.gz", nan, g)
        with pytest.raises(
            MaskError, match=rf"{name}\.nii\.gz: label values must be finite integers, found 1 NaN"
        ):
            read_mask(tmp_path / f"{name}.nii.gz")
    write_sitk(tmp_path / "empty.nrrd", np.zeros(g.shape, np.uint8), g)
    with pytest.raises(MaskError, match="no labels"):
        load_mask_onto(tmp_path / "empty.nrrd", g)
    write_sitk(tmp_path / "wide.nrrd", np.full(g.shape, 300, np.int32), g)
    assert read_mask(tmp_path / "wide.nrrd")[0].dtype == np.uint16
