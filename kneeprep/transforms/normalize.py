"""Intensity normalization: choose the parameters from the data, then apply one clip-shift-scale.

Input is the DICOM pixel data after Modality LUT rescaling (RescaleSlope (0028,1053) and RescaleIntercept
(0028,1052)), as :func:`kneeprep.dicom.read_series` returns it. Every method becomes the same deterministic
operation ``out = cast((clip(x, clip_min, clip_max) - offset) * factor)`` whose numbers the params record holds:

* ``none``: ``offset 0, factor 1``, no clip: the exact values. Stored as ``dtype`` if the recipe names one
  (an error if the values do not fit it), else as the smallest integer type holding ``[min, max]``
  (``uint8``, ``int8``, ``uint16``, ``int16``, ``uint32``, ``int32``), or ``float32`` if not integral.
* ``percentile``: clip at the ``lower``/``upper`` percentiles of the volume (numpy's default "linear"
  percentile, computed exactly from a histogram for integer data) and map that range linearly onto
  ``[0, max of dtype]`` (rounded) for an integer ``dtype``, ``[0, 1]`` for float32 (the default).
* ``window``: the same with ``lower``/``upper`` taken as DICOM values.
* ``zscore``: ``(x - mean) / std`` as float32 (std 0 counts as 1).

The record stores the values actually used (e.g. the measured percentile values) next to the requested ones,
so :func:`apply_normalize` on the raw array with a saved record reproduces the stored volume bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kneeprep.errors import RecipeError

_AUTO_INT = ("uint8", "int8", "uint16", "int16", "uint32", "int32")
_SLAB = 16  # slices per pass when accumulating statistics or scaling, to bound float temporaries
_HIST_STEP = 1 << 21  # values per np.bincount call in percentiles (its intp copy: 16 MiB)


@dataclass(frozen=True)
class NormalizeParams:
    method: str
    dtype: str
    offset: float = 0.0
    factor: float = 1.0
    clip_min: float | None = None
    clip_max: float | None = None
    #: as requested: percentiles (``percentile``) or DICOM values (``window``); None otherwise.
    lower: float | None = None
    upper: float | None = None
    #: statistics of the input, for the record.
    source_min: float | None = None
    source_max: float | None = None
    mean: float | None = None
    std: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> NormalizeParams:
        return cls(**d)


def smallest_dtype(lo: float, hi: float) -> str:
    """The smallest integer dtype holding ``[lo, hi]``.

    >>> smallest_dtype(0, 255), smallest_dtype(-1, 100), smallest_dtype(0, 4095), smallest_dtype(-1024, 3071)
    ('uint8', 'int8', 'uint16', 'int16')
    """
    for name in _AUTO_INT:
        info = np.iinfo(name)
        if info.min <= lo and hi <= info.max:
            return name
    return "float32"


def percentiles(array: np.ndarray, qs) -> list[float]:
    """``np.percentile(array, qs)`` (method "linear"); exact and fast via a histogram for integer arrays."""
    qs = np.asarray(qs, dtype=np.float64)
    if array.dtype.kind in "iub" and array.size:
        lo = int(array.min())
        hi = int(array.max())
        if hi - lo < 1 << 22:
            counts = np.zeros(hi - lo + 1, dtype=np.int64)
            flat = array.reshape(-1)
            for i in range(0, flat.size, _HIST_STEP):  # bincount copies to intp: bound that copy
                part = flat[i : i + _HIST_STEP]
                counts += np.bincount((part - lo) if lo else part, minlength=hi - lo + 1)
            cum = np.cumsum(counts)
            rank = qs / 100.0 * (array.size - 1)
            below = np.floor(rank).astype(np.int64)
            above = np.minimum(below + 1, array.size - 1)
            v_below = np.searchsorted(cum, below, side="right") + lo
            v_above = np.searchsorted(cum, above, side="right") + lo
            return [float(v) for v in v_below + (v_above - v_below) * (rank - below)]
    return [float(v) for v in np.percentile(array, qs)]


def _moments(array: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation with float64 accumulation, a slab at a time."""
    n = array.size
    total = sum(float(array[i : i + _SLAB].sum(dtype=np.float64)) for i in range(0, array.shape[0], _SLAB))
    mean = total / n
    sq = 0.0
    for i in range(0, array.shape[0], _SLAB):
        d = array[i : i + _SLAB].astype(np.float64) - mean
        sq += float(np.vdot(d, d))
    return mean, (sq / n) ** 0.5


def _range_max(dtype: str) -> float:
    return 1.0 if dtype == "float32" else float(np.iinfo(dtype).max)


def plan_normalize(
    array: np.ndarray, method: str = "none", lower: float = 0.5, upper: float = 99.5, dtype: str = ""
) -> NormalizeParams:
    """Measure what ``method`` needs from ``array`` (the recipe's ``[intensity]`` keys as arguments)."""
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    stats = {"source_min": lo, "source_max": hi}
    if method == "none":
        integral = array.dtype.kind in "iub" or bool(np.all(np.mod(array, 1) == 0))
        chosen = dtype or (smallest_dtype(lo, hi) if integral else "float32")
        if chosen != "float32":
            info = np.iinfo(chosen)
            if not integral or lo < info.min or hi > info.max:
                raise RecipeError(
                    f"intensity.dtype: {chosen} cannot hold the values of this series exactly "
                    f"(range {lo:g}..{hi:g}{', not integral' if not integral else ''}) with method 'none'"
                )
        return NormalizeParams("none", chosen, **stats)
    if method == "zscore":
        mean, std = _moments(array)
        return NormalizeParams(
            "zscore", "float32", offset=mean, factor=1.0 / (std or 1.0), mean=mean, std=std, **stats
        )
    if method in ("percentile", "window"):
        chosen = dtype or "float32"
        cmin, cmax = (
            percentiles(array, [lower, upper]) if method == "percentile" else (float(lower), float(upper))
        )
        factor = _range_max(chosen) / (cmax - cmin) if cmax > cmin else 0.0
        return NormalizeParams(
            method,
            chosen,
            offset=cmin,
            factor=factor,
            clip_min=cmin,
            clip_max=cmax,
            lower=float(lower),
            upper=float(upper),
            **stats,
        )
    raise RecipeError(
        f"intensity.method: expected one of 'none', 'percentile', 'zscore', 'window', got {method!r}"
    )


def apply_normalize(array: np.ndarray, params: NormalizeParams) -> np.ndarray:
    """``cast((clip(x, clip_min, clip_max) - offset) * factor)`` to ``params.dtype``; a new array."""
    if params.method == "none":
        return array.astype(params.dtype, copy=True)
    if array.ndim < 1 or array.shape[0] <= _SLAB:
        return _normalize_block(array, params)
    # a slab at a time: the float32 working copy stays a few MB instead of twice the volume
    out = np.empty(array.shape, dtype=params.dtype)
    for i in range(0, array.shape[0], _SLAB):
        out[i : i + _SLAB] = _normalize_block(array[i : i + _SLAB], params)
    return out


def _normalize_block(array: np.ndarray, params: NormalizeParams) -> np.ndarray:
    x = array.astype(np.float32)
    if params.clip_min is not None:
        np.clip(x, np.float32(params.clip_min), np.float32(params.clip_max), out=x)
    x -= np.float32(params.offset)
    x *= np.float32(params.factor)
    if params.dtype == "float32":
        return x
    info = np.iinfo(params.dtype)
    np.rint(x, out=x)
    np.clip(x, info.min, info.max, out=x)
    return x.astype(params.dtype)
