"""Painting solids onto a voxel grid.

A :class:`Canvas` holds two ``uint8`` arrays on the grid: ``labels`` (the mask, label map
:data:`kneeprep.moaks.anatomy.SAMPLE_LABELS`) and ``tissue`` (what the image shows,
:class:`~kneeprep.synth.image.Tissue`). Each shape is evaluated only inside the index block that bounds it, in
chunks of slices, so memory and time stay proportional to the shape, not to the volume. Later paints overwrite
earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from kneeprep.geometry import Geometry
from kneeprep.synth.image import Tissue
from kneeprep.synth.shapes import KneeFrame, Shape


class Canvas:
    """Label and tissue arrays on a grid, painted shape by shape in knee-frame coordinates."""

    def __init__(self, geometry: Geometry, frame: KneeFrame, chunk: int = 24):
        self.geometry = geometry
        self.frame = frame
        self.labels = np.zeros(geometry.shape, dtype=np.uint8)
        self.tissue = np.full(geometry.shape, Tissue.AIR, dtype=np.uint8)
        a = geometry.affine_lps
        r = frame.rotation
        # local = R^T (A[:3,:3] ijk + A[:3,3] - c)
        self._m = r.T @ a[:3, :3]
        self._t = r.T @ (a[:3, 3] - np.asarray(frame.centre_lps))
        self._chunk = chunk

    def local_of_indices(self, ijk: np.ndarray) -> np.ndarray:
        """Knee-frame coordinates of ``(N, 3)`` voxel indices."""
        return np.asarray(ijk, dtype=np.float64) @ self._m.T + self._t

    def index_block(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices bounding the local box ``[lo, hi]`` (None when it misses the grid)."""
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        idx = (corners - self._t) @ np.linalg.inv(self._m).T
        i0 = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        i1 = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, self.geometry.shape)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(i0, i1, strict=True))

    def blocks(
        self, lo, hi
    ) -> Iterator[tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]]:
        """Chunks of the index block of ``[lo, hi]`` with their knee-frame coordinates ``m, p, s`` (float32)."""
        block = self.index_block(lo, hi)
        if block is None:
            return
        bi, bj, bk = block
        j = np.arange(bj.start, bj.stop, dtype=np.float32)[None, :, None]
        k = np.arange(bk.start, bk.stop, dtype=np.float32)[None, None, :]
        for start in range(bi.start, bi.stop, self._chunk):
            stop = min(start + self._chunk, bi.stop)
            i = np.arange(start, stop, dtype=np.float32)[:, None, None]
            coords = [
                (self._m[r, 0] * i + self._m[r, 1] * j + self._m[r, 2] * k + self._t[r]).astype(np.float32)
                for r in range(3)
            ]
            yield (slice(start, stop), bj, bk), coords[0], coords[1], coords[2]

    def paint(
        self,
        shape: Shape,
        *,
        label: int | Callable | None = None,
        tissue: int | None = None,
        where: Callable | None = None,
    ) -> int:
        """Paint ``shape``: set ``label`` (a value, or ``f(m, p, s) -> values``) and/or ``tissue`` inside it,
        restricted to voxels where ``where(labels, tissue, m, p, s)`` is true. Returns the voxels painted."""
        count = 0
        for sl, m, p, s in self.blocks(shape.lo, shape.hi):
            inside = shape.contains(m, p, s)
            if where is not None:
                inside &= where(self.labels[sl], self.tissue[sl], m, p, s)
            if not inside.any():
                continue
            count += int(inside.sum())
            if label is not None:
                values = label(m, p, s) if callable(label) else label
                target = self.labels[sl]
                target[inside] = values[inside] if callable(label) else values
            if tissue is not None:
                self.tissue[sl][inside] = tissue
        return count
