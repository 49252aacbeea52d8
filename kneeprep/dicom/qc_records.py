"""The series checklist's records: its tolerances (:class:`QC`, the recipe's ``[qc]`` section), one
:class:`Finding`, a series' :class:`QCVerdict` (the worst status, every finding's text) and the
:class:`Stack` of ordered slices the checklist returns; plus the formatting its messages share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kneeprep.dicom.slice_header import SliceHeader

STATUSES = ("ok", "warn", "fail", "unsupported")


@dataclass(frozen=True)
class QC:
    """Tolerances of the series checklist (scan)."""

    #: max |slice gap - median gap| / median gap before a series counts as irregular.
    slice_spacing_rtol: float = 0.01
    #: max deviation (dot-product units) between slices' orientation vectors.
    orientation_atol: float = 1e-4
    #: max relative difference between slices' PixelSpacing.
    pixel_spacing_rtol: float = 1e-4
    #: fewest slices a series needs to be a volume.
    min_slices: int = 8


@dataclass(frozen=True)
class QCVerdict:
    """A series' verdict: the worst status of its findings, and every finding's text (worst first)."""

    status: str = "ok"
    reasons: tuple[str, ...] = ()

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"QCVerdict.status must be one of {STATUSES}, got {self.status!r}")
        object.__setattr__(self, "reasons", tuple(self.reasons))

    @property
    def first_reason(self) -> str:
        return self.reasons[0] if self.reasons else ""

    def to_json(self) -> dict:
        return {"status": self.status, "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, d: dict) -> QCVerdict:
        return cls(d["status"], tuple(d.get("reasons", ())))

    @classmethod
    def from_findings(cls, findings: Sequence[Finding]) -> QCVerdict:
        ranked = sorted(
            findings, key=lambda f: -STATUSES.index(f.status)
        )  # stable: keeps order within a status
        status = ranked[0].status if ranked else "ok"
        return cls(status, tuple(f.text for f in ranked))


@dataclass(frozen=True)
class Finding:
    status: str  # "warn" | "fail" | "unsupported"
    text: str


@dataclass(frozen=True)
class Stack:
    """The slices of one series in position order along the slice normal, and what the checklist found.

    ``positions`` are distances (mm) along ``normal`` = row cosine x column cosine, ascending.
    ``slice_spacing`` is ``(last - first) / (n - 1)``: the spacing that maps the first and last slices
    exactly (``None`` for fewer than two slices or no geometry).
    """

    slices: tuple[SliceHeader, ...]
    dropped: tuple[tuple[Path, str], ...] = ()
    findings: tuple[Finding, ...] = ()
    positions: tuple[float, ...] = ()
    normal: tuple[float, float, float] | None = None
    slice_spacing: float | None = None
    geometry_ok: bool = False


def fmt_vector(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"


def short_names(items: Sequence, limit: int = 3) -> str:
    names = [x.label if isinstance(x, SliceHeader) else x.name for x in items]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
