"""Run reports: what happened to every item of a run, as JSON and as a printed table.

Each item (a series for ``convert``) ends in one status:

* ``written`` -- output produced (``warnings`` may list things worth a look, e.g. unknown mask labels);
* ``skipped`` -- deliberately not produced; ``kind`` says why: ``unchanged`` (inputs and recipe stage as in
  the store), ``qc`` (scan's verdict was fail/unsupported, or warn with ``select.min_qc = "ok"``),
  ``not_selected`` (SeriesDescription does not match the recipe);
* ``failed`` -- an error; ``kind`` is the :class:`~kneeprep.errors.KneeprepError` kind (``dicom``, ``mask``,
  ``geometry`` ...) or ``unexpected`` for a bug, and ``message`` names the file and reason;
* ``removed`` -- (convert) the output of an earlier run was deleted because a clean run would not have it:
  ``kind`` ``vanished`` (its series is gone from the raw tree), ``qc`` or ``not_selected``
  (:func:`kneeprep.stages.resume.vanished`).

The JSON (``<store>/report.json`` for convert) is written atomically and holds the items, counts and timings;
:meth:`RunReport.table` is the summary the CLI prints. ``failed``, ``removed`` and ``nothing_usable`` decide the
exit code.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kneeprep.files import write_text

STATUSES = ("written", "skipped", "failed", "removed")
#: at most this many item rows in the printed table (failures first); the JSON has them all.
TABLE_ROWS = 25


class Progress(Protocol):
    """``progress(task, done, total, item="")``: ``done`` of ``total`` units of ``task`` ("scan", "convert",
    ...) are finished; ``item`` names the last one when there is a name."""

    def __call__(self, task: str, done: int, total: int, item: str = "") -> None: ...


def ticker(progress: Progress | None, task: str):
    """A ``(done, total)`` callback reporting ``task`` to ``progress`` (for functions that take one, such as
    :func:`kneeprep.dicom.scan_tree`); None when ``progress`` is None."""
    if progress is None:
        return None
    return lambda done, total: progress(task, done, total)


@dataclass(frozen=True)
class ItemResult:
    """The outcome of one item; small, so it crosses process boundaries cheaply."""

    item: str
    status: str
    kind: str = ""
    message: str = ""
    seconds: float = 0.0
    source: str = ""
    warnings: tuple[str, ...] = ()
    #: stage-specific numbers (e.g. read/transform/write seconds, stored bytes).
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def to_json(self) -> dict[str, Any]:
        return {  # not dataclasses.asdict: its deep copy was most of a report's cost (a report lists every series)
            "item": self.item,
            "status": self.status,
            "kind": self.kind,
            "message": self.message,
            "seconds": round(self.seconds, 4),
            "source": self.source,
            "warnings": list(self.warnings),
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ItemResult:
        return cls(**{**d, "warnings": tuple(d.get("warnings", ()))})


@dataclass
class RunReport:
    """All item results of a run plus its context (command, inputs, recipe) and wall time."""

    command: str
    context: dict[str, Any] = field(default_factory=dict)
    items: list[ItemResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    def add(self, result: ItemResult) -> None:
        self.items.append(result)

    def add_all(self, results: Iterable[ItemResult]) -> None:
        for r in results:
            self.items.append(r)

    def finish(self) -> RunReport:
        self.finished = time.time()
        return self

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.items)
        return {s: c.get(s, 0) for s in STATUSES if s != "removed" or c.get(s)}  # "removed" only when some

    @property
    def by_kind(self) -> dict[str, int]:
        c = Counter(f"{r.status}:{r.kind}" if r.kind else r.status for r in self.items)
        return dict(sorted(c.items()))

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.items if r.status == "failed"]

    @property
    def removed(self) -> list[ItemResult]:
        return [r for r in self.items if r.status == "removed"]

    @property
    def nothing_usable(self) -> str | None:
        """Why the run left nothing a later stage can use -- no item at all, or none written or unchanged
        (every series refused, failed or not selected) -- as one line; ``None`` when something is usable."""
        if any(
            r.status == "written" or (r.status == "skipped" and r.kind == "unchanged") for r in self.items
        ):
            return None
        if not self.items:
            return f"{self.command}: no DICOM series found"
        reasons = ", ".join(f"{k} {n}" for k, n in self.by_kind.items())
        return f"{self.command}: none of the {len(self.items)} series found was written ({reasons})"

    @property
    def wall_seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_json(self) -> dict[str, Any]:
        written = [r.seconds for r in self.items if r.status == "written"]
        return {
            "command": self.command,
            "context": self.context,
            "started": _iso(self.started),
            "finished": _iso(self.finished) if self.finished else None,
            "wall_seconds": round(self.wall_seconds, 3),
            "counts": self.counts,
            "by_kind": self.by_kind,
            "item_seconds": {
                "total": round(sum(written), 3),
                "mean": round(sum(written) / len(written), 3) if written else None,
                "max": round(max(written), 3) if written else None,
            },
            "items": [r.to_json() for r in sorted(self.items, key=lambda r: r.item)],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunReport:
        r = cls(d["command"], d.get("context", {}), [ItemResult.from_json(i) for i in d["items"]])
        return r

    def write(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (:func:`kneeprep.files.write_text`)."""
        return write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    def table(self, max_rows: int = TABLE_ROWS) -> str:
        """Counts per status and kind, then item rows (failures first, then QC skips, then the rest)."""
        c = self.counts
        lines = [
            f"{self.command}: {c['written']} written, {c['skipped']} skipped, {c['failed']} failed "
            f"{f', {len(self.removed)} removed' if self.removed else ''} in {self.wall_seconds:.1f} s",
        ]
        order = {"failed": 0, "removed": 1, "skipped": 2, "written": 3}
        rows = sorted(self.items, key=lambda r: (order[r.status], r.kind != "qc", r.item))
        rows = [r for r in rows if not (r.status == "skipped" and r.kind == "not_selected")]
        shown = rows[:max_rows]
        if shown:
            w = max(len(r.item) for r in shown)
            lines.append(f"  {'item':<{w}}  {'status':<8} {'kind':<12} {'seconds':>7}  message")
            for r in shown:
                msg = r.message or "; ".join(r.warnings)
                msg = msg if len(msg) <= 100 else msg[:97] + "..."
                lines.append(f"  {r.item:<{w}}  {r.status:<8} {r.kind:<12} {r.seconds:7.2f}  {msg}")
        hidden = len(rows) - len(shown)
        not_selected = sum(r.kind == "not_selected" for r in self.items)
        if hidden:
            lines.append(f"  ... {hidden} more rows in the JSON report")
        if not_selected:
            lines.append(f"  ({not_selected} series not selected by the recipe; listed in the JSON report)")
        if len(self.by_kind) > 1:
            lines.append("  by reason: " + ", ".join(f"{k} {v}" for k, v in self.by_kind.items()))
        return "\n".join(lines)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
