"""What scan returns: one :class:`SeriesInfo` per series (files in position order, geometry, QC verdict,
volume id) and the :class:`ScanResult` of a tree; both round-trip through JSON (the convert report, the
scan tasks' records, ``kneeprep scan --out``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneeprep.dicom.qc_records import QCVerdict
from kneeprep.geometry import Geometry, orientation_code


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series as scan found it. JSON round-trips through :meth:`to_json` / :meth:`from_json`.

    ``files`` are in position order along the slice normal (array axis 0), dropped files removed;
    ``dropped`` pairs each removed file with the reason. ``spacing`` is in array order (slice, row, column),
    mm; ``orientation`` is ImageOrientationPatient (0020,0037); ``affine_lps`` follows
    :mod:`kneeprep.geometry` (``None`` when the files carry no usable geometry).
    """

    volume_id: str
    patient_id: str
    time: str
    study_folder: str
    series_folder: str
    knee_side: int
    description: str
    study_description: str
    series_uid: str
    frame_of_reference_uid: str
    files: tuple[Path, ...]
    dropped: tuple[tuple[Path, str], ...]
    rows: int
    cols: int
    n_slices: int
    spacing: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    affine_lps: tuple[tuple[float, ...], ...] | None
    modality: str
    transfer_syntax: str
    qc: QCVerdict
    id_source: str = "path"
    technical: dict | None = None
    #: enhanced multi-frame series: the slices as (index into ``files``, 1-based frame number), in position
    #: order; None for classic series (one file per slice, ``files`` in position order)
    frames: tuple[tuple[int, int], ...] | None = None
    #: one image set of a series split by echo, time, diffusion or component (ImageSet.to_json()), else None
    image_set: dict | None = None

    @property
    def geometry(self) -> Geometry | None:
        if self.affine_lps is None or self.spacing is None:
            return None
        return Geometry((self.n_slices, self.rows, self.cols), self.spacing, np.array(self.affine_lps))

    @property
    def orientation_code(self) -> str:
        return orientation_code(np.array(self.affine_lps)) if self.affine_lps is not None else ""

    def to_json(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["files"] = [str(p) for p in self.files]
        d["dropped"] = [[str(p), r] for p, r in self.dropped]
        d["spacing"] = list(self.spacing) if self.spacing is not None else None
        d["orientation"] = list(self.orientation) if self.orientation is not None else None
        d["affine_lps"] = [list(r) for r in self.affine_lps] if self.affine_lps is not None else None
        d["qc"] = self.qc.to_json()
        d["frames"] = [list(f) for f in self.frames] if self.frames is not None else None
        return d

    def __reduce__(self):
        """Pickled compactly (scan tasks return these; convert tasks take them): the files as runs of one
        folder's names -- unpickling a ``Path`` costs 7 us, a folder's child 2 us, and the driver unpickles
        every file of every scan result (430 series of 11,954 files: 109 -> 39 ms, measured)."""
        state = {f: getattr(self, f) for f in self.__dataclass_fields__}
        runs: list[tuple[str, list[str]]] = []
        for f in self.files:
            parent, name = os.path.split(str(f))
            if runs and runs[-1][0] == parent:
                runs[-1][1].append(name)
            else:
                runs.append((parent, [name]))
        state["files"] = runs
        return (_from_pickle, (state,))

    @classmethod
    def from_json(cls, d: dict) -> SeriesInfo:
        d = dict(d)
        d["files"] = tuple(Path(p) for p in d["files"])
        d["dropped"] = tuple((Path(p), r) for p, r in d["dropped"])
        d["spacing"] = tuple(d["spacing"]) if d["spacing"] is not None else None
        d["orientation"] = tuple(d["orientation"]) if d["orientation"] is not None else None
        d["affine_lps"] = tuple(tuple(r) for r in d["affine_lps"]) if d["affine_lps"] is not None else None
        d["qc"] = QCVerdict.from_json(d["qc"])
        if d.get("frames") is not None:
            d["frames"] = tuple((int(a), int(b)) for a, b in d["frames"])
        return cls(**d)


def _from_pickle(state: dict) -> SeriesInfo:
    state["files"] = tuple(
        base / n for parent, names in state["files"] for base in (Path(parent),) for n in names
    )
    return SeriesInfo(**state)


@dataclass(frozen=True)
class ScanResult:
    """Every series under ``root``, plus the files that were not part of one."""

    root: Path
    series: tuple[SeriesInfo, ...]
    non_dicom_skipped: int
    unreadable: tuple[tuple[Path, str], ...]
    n_files: int

    def by_status(self) -> dict[str, int]:
        out = {s: 0 for s in ("ok", "warn", "fail", "unsupported")}
        for s in self.series:
            out[s.qc.status] += 1
        return out

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "series": [s.to_json() for s in self.series],
            "non_dicom_skipped": self.non_dicom_skipped,
            "unreadable": [[str(p), r] for p, r in self.unreadable],
            "n_files": self.n_files,
        }

    @classmethod
    def from_json(cls, d: dict) -> ScanResult:
        return cls(
            Path(d["root"]),
            tuple(SeriesInfo.from_json(s) for s in d["series"]),
            d["non_dicom_skipped"],
            tuple((Path(p), r) for p, r in d["unreadable"]),
            d["n_files"],
        )
