"""Mirror left knees so they look like right knees in array space.

With ``geometry.mirror_left`` a left knee (OAI side code 2) is flipped along the array axis closest to the
patient's left-right axis (LPS x). The affine is updated with the flip (that axis's column negated, origin moved
to the new first voxel), so every voxel -- image and labels alike -- keeps its true LPS position: the array
now reads like a right knee (medial and lateral swap sides along that axis) while world coordinates stay
truthful, masks still land through world space and the orientation code shows the flip (``PIR`` -> ``PIL``).
Boxes are computed after mirroring, on the stored grid, so they move with the image. ``mirrored`` and the
axis go into the volume's attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneeprep.geometry import Geometry
from kneeprep.transforms.orient import permute_flip

LEFT = 2


@dataclass(frozen=True)
class MirrorParams:
    """``axis`` is the array axis flipped, or ``None`` when the volume is not mirrored."""

    axis: int | None

    @property
    def mirrored(self) -> bool:
        return self.axis is not None

    def to_json(self) -> dict:
        return {"mirrored": self.mirrored, "axis": self.axis}

    @classmethod
    def from_json(cls, d: dict) -> MirrorParams:
        return cls(d["axis"])


def left_right_axis(geometry: Geometry) -> int:
    """The array axis whose direction is closest to the patient's left-right (LPS x) axis.

    >>> left_right_axis(Geometry((4, 5, 6), (1, 1, 1), np.diag([1.0, 1.0, 1.0, 1.0])[:, [2, 1, 0, 3]]))
    2
    """
    a = geometry.affine_lps[:3, :3]
    unit = a / np.linalg.norm(a, axis=0)[None, :]
    return int(np.argmax(np.abs(unit[0])))


def plan_mirror(geometry: Geometry, knee_side: int, mirror_left: bool) -> MirrorParams:
    """Mirror only left knees (side 2), and only when the recipe asks for it."""
    if mirror_left and int(knee_side) == LEFT:
        return MirrorParams(left_right_axis(geometry))
    return MirrorParams(None)


def apply_mirror(array: np.ndarray, geometry: Geometry, params: MirrorParams) -> tuple[np.ndarray, Geometry]:
    """Flip ``array`` along ``params.axis`` (no-op when ``None``); the affine flips with it."""
    if params.axis is None:
        return array, geometry
    flips = [False, False, False]
    flips[params.axis] = True
    return permute_flip(array, geometry, (0, 1, 2), flips)
