"""Several images per slice position: split a series into one image set (volume) per echo, time point,
diffusion weighting or complex component, by the DICOM attributes that define them.

A series (or one enhanced file) whose positions each hold up to *k* > 1 distinct images (distinct
SOPInstanceUID, or distinct frames of one file) is split by the first key, in this order, that partitions it
**cleanly** -- exactly *k* sets, each holding at most one image per position:

1. one attribute of :data:`ATTRIBUTES` (in that order);
2. a pair of them (e.g. echo and magnitude/phase, b-value and gradient direction);
3. all of those that vary.

Each set becomes its own series record with a volume id suffix ``_<token>`` (:func:`suffix`): ``e2`` for
EchoNumbers 2 (or the 2nd EchoTime), ``t3`` for TemporalPositionIdentifier 3 (or the 3rd TriggerTime),
``b1000`` for DiffusionBValue 1000, ``d2`` for the 2nd gradient direction, ``mag`` / ``phase`` / ``real`` /
``imag`` for the complex component, ``it2`` for the 2nd ImageType, ``a3`` for AcquisitionNumber 3 (a repeated
acquisition of the same positions, e.g. Siemens' repetitions without temporal tags; tried last); several joined
by ``-`` (``e2-phase``, ``b1000-d3``, ``e2-a3``). A set missing a slice is then checked like any series (and fails with ``missing slices``);
a series no key partitions cleanly is refused whole with the reason: never a mixed volume.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from kneeprep.dicom.qc import QC, Finding
from kneeprep.dicom.slice_header import SliceHeader


def _round(v, nd=4):
    return None if v is None else (tuple(round(x, nd) for x in v) if isinstance(v, tuple) else round(v, nd))


#: (classic keyword, enhanced keyword, value of a header, token of a value and its rank among the set values)
ATTRIBUTES: tuple[tuple[str, str, Callable, Callable], ...] = (
    ("EchoNumbers", "EchoNumbers", lambda h: h.echo_number, lambda v, r: f"e{v}"),
    ("EchoTime", "EffectiveEchoTime", lambda h: _round(h.echo_time), lambda v, r: f"e{r}"),
    ("TemporalPositionIdentifier", "TemporalPositionIndex", lambda h: h.temporal_position, lambda v, r: f"t{v}"),
    ("TriggerTime", "NominalCardiacTriggerDelayTime", lambda h: _round(h.trigger_time), lambda v, r: f"t{r}"),
    ("DiffusionBValue", "DiffusionBValue", lambda h: _round(h.b_value, 2), lambda v, r: f"b{v:g}"),
    ("DiffusionGradientOrientation", "DiffusionGradientOrientation", lambda h: _round(h.b_direction),
     lambda v, r: f"d{r}"),
    ("ComplexImageComponent", "ComplexImageComponent", lambda h: h.complex_component or None,
     lambda v, r: {"MAGNITUDE": "mag", "PHASE": "phase", "REAL": "real", "IMAGINARY": "imag"}.get(v, f"c{r}")),
    ("ImageType", "FrameType", lambda h: "\\".join(h.image_type) or None, lambda v, r: f"it{r}"),
    ("AcquisitionNumber", "AcquisitionNumber", lambda h: h.acquisition_number, lambda v, r: f"a{v}"),
)  # fmt: skip


@dataclass(frozen=True)
class ImageSet:
    """One set of images of a series: ``attributes`` (keywords) and their ``values`` shared by its images,
    the volume id ``suffix`` and its place (``index`` 1..``count``) in the key order."""

    headers: tuple[SliceHeader, ...]
    attributes: tuple[str, ...] = ()
    values: tuple = ()
    suffix: str = ""
    index: int = 1
    count: int = 1

    def to_json(self) -> dict | None:
        if not self.suffix:
            return None
        values = [list(v) if isinstance(v, tuple) else v for v in self.values]
        return {"attributes": list(self.attributes), "values": values, "suffix": self.suffix,
                "index": self.index, "count": self.count}  # fmt: skip


def image_set_selected(image_set: dict | None, rule: str) -> bool:
    """Whether recipe ``select.image_sets`` (``rule``) keeps this image set (``SeriesInfo.image_set``):
    "all", "first" (index 1), or a regex matched in full against the suffix. A whole series always is.

    >>> s = {"suffix": "e2", "index": 2}
    >>> image_set_selected(s, "all"), image_set_selected(s, "first"), image_set_selected(s, "e1|e2")
    (True, False, True)
    """
    if image_set is None or rule == "all":
        return True
    if rule == "first":
        return image_set["index"] == 1
    return re.fullmatch(rule, image_set["suffix"]) is not None


def _identity(h: SliceHeader) -> tuple:
    return (h.sop_instance_uid or str(h.path), h.frame)


def _positions(headers: Sequence[SliceHeader], qc: QC) -> list[int] | None:
    """A position number per header (same number = same slice position), or None without geometry."""
    if any(h.ipp is None or h.iop is None for h in headers):
        return None
    iop = np.array(headers[0].iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(normal) < 1e-6:
        return None
    d = np.array([h.ipp for h in headers], dtype=np.float64) @ (normal / np.linalg.norm(normal))
    order = np.argsort(d, kind="stable")
    steps = np.diff(d[order])
    real = steps[steps > 1e-3]
    tol = max(1e-3, qc.slice_spacing_rtol * (float(np.median(real)) if real.size else 0.0))
    out = [0] * len(headers)
    pos, start = 0, None
    for i in order:
        if start is None:
            start = d[i]
        elif d[i] - start > tol:
            pos, start = pos + 1, d[i]
        out[i] = pos
    return out


def _clean(headers, positions, keyfn, k) -> dict | None:
    """The sets of ``keyfn`` when they partition cleanly into ``k`` sets of one image per position."""
    sets: dict = defaultdict(list)
    for h in headers:
        sets[keyfn(h)].append(h)
    if len(sets) != k:
        return None
    for members in sets.values():
        seen: dict[int, tuple] = {}
        for h, p in ((h, positions[id(h)]) for h in members):
            if seen.setdefault(p, _identity(h)) != _identity(h):
                return None
    return sets


def _sort_key(value):
    return tuple(
        (v is None, v if v is not None else 0) if not isinstance(v, tuple) else (False, v) for v in value
    )


def split_image_sets(headers: Sequence[SliceHeader], qc: QC) -> tuple[list[ImageSet], Finding | None]:
    """The image sets of one series part (one matrix size and orientation). One set (no suffix) when every
    position holds one distinct image (or geometry is missing: the checklist then says so); ``([whole],
    finding)`` when positions hold several images and no key partitions them cleanly."""
    whole = [ImageSet(tuple(headers))]
    positions = _positions(headers, qc)
    if positions is None:
        return whole, None
    per_position: dict[int, set] = defaultdict(set)
    for h, p in zip(headers, positions, strict=True):
        per_position[p].add(_identity(h))
    k = max(len(v) for v in per_position.values())
    if k <= 1:
        return whole, None
    pos = {id(h): p for h, p in zip(headers, positions, strict=True)}
    enhanced = headers[0].frame is not None
    varying = [a for a in ATTRIBUTES if len({a[2](h) for h in headers}) > 1]
    if not varying:
        return whole, None  # nothing tells the images apart: the checklist reports the duplicate positions
    candidates = [(a,) for a in varying] + list(combinations(varying, 2))
    if len(varying) > 2:
        candidates.append(tuple(varying))
    for attrs in candidates:
        sets = _clean(headers, pos, lambda h, attrs=attrs: tuple(a[2](h) for a in attrs), k)
        if sets is None:
            continue
        keys = sorted(sets, key=_sort_key)
        ranks = [{v: r + 1 for r, v in enumerate(sorted({key[i] for key in keys if key[i] is not None}))}
                 for i in range(len(attrs))]  # fmt: skip
        tokens = [
            "-".join(
                a[3](v, ranks[i][v]) for i, (a, v) in enumerate(zip(attrs, key, strict=True)) if v is not None
            )
            or "x"
            for key in keys
        ]
        if len(set(tokens)) != len(tokens):  # e.g. two b-values that print alike: number the sets instead
            tokens = [f"s{i + 1}" for i in range(len(keys))]
        names = tuple(a[1] if enhanced else a[0] for a in attrs)
        return [
            ImageSet(tuple(sets[key]), names, key, tok, i + 1, len(keys))
            for i, (key, tok) in enumerate(zip(keys, tokens, strict=True))
        ], None
    seen = "; ".join(
        f"{a[1] if enhanced else a[0]} {len({a[2](h) for h in headers})} values" for a in varying
    )
    return whole, Finding(
        "unsupported",
        f"image sets do not partition: slice positions hold up to {k} distinct images and no attribute "
        f"(echo, temporal position, diffusion b-value/direction, complex component, image type, "
        f"acquisition number, or a pair of them) splits them into {k} sets of one image per position (varying: {seen}); refused, not mixed",
    )
