"""Segmentation masks: read a label image and place it on a volume's grid through world coordinates.

A mask file (NIfTI ``.nii``/``.nii.gz``, NRRD, MetaImage ``.mha``/``.mhd`` -- anything SimpleITK reads) carries
its own geometry; SimpleITK converts NIfTI's RAS to LPS on reading. Masks are never matched to images by array
shape or axis order (OAI-ZIB masks, for one, store their axes permuted): every voxel centre of the target grid
is mapped to world (LPS) and looked up in the mask by nearest neighbour. On identical grids that is a copy; on a
permuted or flipped grid it is an exact reordering; on another grid it is nearest-neighbour resampling.

Failures raise :class:`~kneeprep.errors.MaskError` naming the file: unreadable, not an integer label image,
no labels at all, or no overlap with the volume in world space -- never a silently empty label array. Label
ids present in the mask but absent from the label map are reported in :attr:`PlacedMask.unknown_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from kneeprep.errors import InputNotFoundError, MaskError
from kneeprep.files import sha256_file
from kneeprep.geometry import Geometry
from kneeprep.transforms.orient import axis_code, permute_flip, plan_orient
from kneeprep.transforms.resample import resample_onto


@dataclass(frozen=True)
class PlacedMask:
    """A mask resampled onto a volume grid, with what was found on the way."""

    labels: np.ndarray
    source: str
    #: label ids present on the grid, and those not in the recipe's label map.
    present: tuple[int, ...]
    unknown_labels: tuple[int, ...]
    #: share of the target grid's voxels that lie inside the mask's grid, and share of the mask's labelled
    #: voxels that landed on the target grid (1.0 and 1.0 for matching grids).
    grid_coverage: float
    label_coverage: float
    source_geometry: Geometry = field(repr=False)

    def warnings(self) -> list[str]:
        out = []
        if self.unknown_labels:
            out.append(f"{self.source}: label ids {list(self.unknown_labels)} are not in the label map")
        if self.label_coverage < 0.99:
            out.append(
                f"{self.source}: only {self.label_coverage:.1%} of the labelled voxels lie inside the volume"
            )
        return out


def read_mask(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label image: ``(array in (z, y, x) order as an unsigned integer type, Geometry in LPS)``."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: mask file not found")
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise MaskError(f"{p}: cannot read the mask: {str(e).strip().splitlines()[-1]}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError(
            f"{p}: expected a 3D single-component label image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    array = sitk.GetArrayFromImage(image)
    geometry = Geometry.from_sitk(image)
    if array.dtype.kind == "f":
        _refuse_nonfinite_nifti(p)
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise MaskError(f"{p}: label values must be integers, found non-integral values ({array.dtype})")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise MaskError(f"{p}: label values must be >= 0, found {int(array.min())}")
    top = int(array.max()) if array.size else 0
    return array.astype(
        np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32, copy=False
    ), geometry


def _refuse_nonfinite_nifti(p: Path) -> None:
    """SimpleITK's NIfTI reader returns NaN voxels as 0, so a float NIfTI mask is checked as stored (nibabel):
    a NaN over a label would otherwise erase that label's voxels without a word."""
    if not p.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        raw = np.asarray(nib.load(str(p)).dataobj)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported as the file's problem
        raise MaskError(f"{p}: cannot read the mask's values: {e}") from None
    n = int(raw.size - np.count_nonzero(np.isfinite(raw)))
    if n:
        raise MaskError(f"{p}: label values must be finite integers, found {n} NaN or infinite voxels")


def place_mask(
    labels: np.ndarray,
    geometry: Geometry,
    target: Geometry,
    label_map: dict[int, str] | None = None,
    *,
    source: str = "mask",
) -> PlacedMask:
    """Resample ``labels`` (on ``geometry``) onto ``target`` by nearest neighbour in world space."""
    if labels.shape != geometry.shape:
        raise MaskError(f"{source}: array shape {labels.shape} differs from its geometry {geometry.shape}")
    n_labelled = int(np.count_nonzero(labels))
    if n_labelled == 0:
        raise MaskError(f"{source}: the mask holds no labels (all voxels are 0)")
    reordered = _same_voxels(labels, geometry, target)
    if reordered is not None:
        out = reordered
        grid_coverage = 1.0
    else:
        out = resample_onto(labels, geometry, target, "nearest")
        ones = np.ones(geometry.shape, np.uint8)
        grid_coverage = float(np.count_nonzero(resample_onto(ones, geometry, target, "nearest"))) / out.size
        if grid_coverage == 0.0:
            raise MaskError(
                f"{source}: the mask does not overlap the volume in world space "
                f"(mask grid centred at {_centre(geometry)} mm LPS, volume at {_centre(target)} mm)"
            )
    landed = int(np.count_nonzero(out))
    if landed == 0:
        raise MaskError(f"{source}: none of the mask's {n_labelled} labelled voxels lies inside the volume")
    present = tuple(int(v) for v in np.unique(out[out != 0]))  # labels are sparse: skip the background first
    unknown = tuple(v for v in present if label_map is not None and v not in label_map)
    volume_ratio = np.prod(target.spacing) / np.prod(geometry.spacing)
    label_coverage = min(1.0, landed * volume_ratio / n_labelled)
    return PlacedMask(out, source, present, unknown, grid_coverage, float(label_coverage), geometry)


def load_mask_onto(path: str | Path, target: Geometry, label_map: dict[int, str] | None = None) -> PlacedMask:
    """:func:`read_mask` then :func:`place_mask`, errors naming the file."""
    labels, geometry = read_mask(path)
    return place_mask(labels, geometry, target, label_map, source=str(path))


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes (hex, 16 chars), the mask's content hash in the volume attributes."""
    return sha256_file(path)[:16]


def _same_voxels(labels: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray | None:
    """``labels`` in ``target``'s voxel order when both grids have the same voxel centres (identical, or the
    axes permuted/flipped, as a mask saved by another tool usually is), else ``None``. Exact and much
    faster than resampling."""
    if sorted(labels.shape) != sorted(target.shape):
        return None
    params = plan_orient(geometry, axis_code(target.affine_lps))
    out, g = permute_flip(labels, geometry, params.permutation, params.flips)
    if out.shape != target.shape:
        return None
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in target.shape], indexing="ij")).reshape(3, -1).T
    drift = np.abs(g.index_to_world(corners) - target.index_to_world(corners)).max()
    if drift > 0.01 * min(target.spacing):  # every voxel centre within 1 % of a voxel of its counterpart
        return None
    return out.copy() if out is labels else out


def _centre(g: Geometry) -> list[float]:
    c = g.affine_lps[:3, :3] @ ((np.asarray(g.shape) - 1) / 2) + g.affine_lps[:3, 3]
    return [round(float(v), 1) for v in c]
