"""``scan``: walk a raw tree, read DICOM headers only, and describe each series with a QC verdict.

Grouping: files are grouped by SeriesInstanceUID (0020,000E); a UID whose files have different matrix sizes
(Rows x Columns) or clearly different orientations (ImageOrientationPatient components differing by more
than ``split_orientation_atol``, e.g. a three-plane localizer) is split into parts, each its own
:class:`SeriesInfo` (the largest part keeps the plain volume id, the others get ``.2``, ``.3``, ... on the
series folder). Small orientation differences within a part are a QC failure, not a split.

Volume ids (``kneeprep.formats.splits.make_volume_id``): from the OAI layout
``<visit>/<release>/<patient>/<YYYYMMDD>/<8-digit series>/<file>`` when the series' first file sits in one
(``id_source="path"``); otherwise from tags (``id_source="tags"``): PatientID (0010,0020), the visit from
ClinicalTrialTimePointID (0012,0051) or the StudyDescription ``OAI^MR^<visit>^...``, StudyDate (0008,0020),
SeriesNumber (0020,0011); a missing part becomes ``NA``, and ``_``, ``/`` or spaces inside a part become
``-`` so the id still splits into five parts. Knee side 0 (unknown) stays 0 in the id. Ids are unique within
one scan: a later series whose id collides gets a ``.2``, ``.3`` ... suffix on its series folder and a warning.

The records are in :mod:`kneeprep.dicom.series`, the id parts from paths or tags in
:mod:`kneeprep.dicom.volume_ids`.

Enhanced multi-frame files contribute one header per frame (:mod:`kneeprep.dicom.enhanced`); a series record
then lists each file once in ``files`` and its slices as ``frames`` (file index, 1-based frame number). A part
whose positions hold several images is split into image sets (:mod:`kneeprep.dicom.imagesets`): each set is a
series record of its own, its volume id ending in ``_<suffix>`` (``..._2_e2``) and ``image_set`` saying which.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from kneeprep.dicom.enhanced import frame_headers
from kneeprep.dicom.fields import knee_side, technical_fields
from kneeprep.dicom.headers import DicomError, NotDicomError, SliceHeader, read_header
from kneeprep.dicom.imagesets import ImageSet, split_image_sets
from kneeprep.dicom.qc import ENHANCED_SOP_CLASSES, QC, Finding, QCVerdict, check_series
from kneeprep.dicom.series import ScanResult, SeriesInfo
from kneeprep.dicom.volume_ids import parse_oai_path, volume_id_parts
from kneeprep.formats.splits import make_volume_id


def read_folder(files: Sequence[Path]) -> tuple[list[SliceHeader], list[tuple[Path, str]], set[Path], int]:
    """Headers of one folder's files: ``(headers, unreadable, not_slices, non_dicom_skipped)``.

    A file that is not DICOM is skipped -- unless its name ends in ``.dcm``, which makes it unreadable (and one
    of ``not_slices``: never counted as a lost slice). Enhanced multi-frame files give one header per frame."""
    here: list[SliceHeader] = []
    lost: list[tuple[Path, str]] = []
    not_slices: set[Path] = set()
    skipped = 0
    for path in files:
        try:
            h = read_header(path)
            here += frame_headers(h) if h.sop_class_uid in ENHANCED_SOP_CLASSES and h.has_pixels else [h]
        except NotDicomError as e:
            if path.suffix.lower() == ".dcm":
                lost.append((path, f"named .dcm but {str(e).split(': ', 1)[-1]}"))
                not_slices.add(path)
            else:
                skipped += 1
        except DicomError as e:
            lost.append((path, str(e).split(": ", 1)[-1] if str(e).startswith(str(path)) else str(e)))
    return here, lost, not_slices, skipped


def group_key(h: SliceHeader) -> str:
    """The series a header belongs to before splitting: its SeriesInstanceUID (or folder + SeriesNumber)."""
    return h.series_uid or f"no-uid:{h.path.parent}:{h.series_number}"


def describe(
    headers: Sequence[SliceHeader],
    unreadable: Sequence[tuple[Path, str]],
    not_slices: set[Path],
    qc: QC,
    split_orientation_atol: float,
    technical_cache: dict[Path, dict | None] | None = None,
) -> list[tuple[tuple[str, str, int], SeriesInfo]]:
    """Group headers into series (by UID, split by matrix size and orientation) and describe each;
    unreadable files whose folder holds exactly one series are that series' lost files.

    Returns ``((group key, first path of the group, order), series)`` pairs in order (groups by their first
    path, then the group's parts and image sets), volume ids not yet made unique (:func:`unique_ids`). What it says of a group depends
    only on the folders that hold the group's files, so any set of whole folders closed under shared groups
    gives the same records as the whole tree (:mod:`kneeprep.dicom.scan_tasks` relies on it)."""
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        groups[group_key(h)].append(h)
    todo: list[tuple[list[SliceHeader], list[Finding], int, ImageSet | None]] = []
    keys: list[tuple[str, str, int]] = []
    for key, members in sorted(groups.items(), key=lambda kv: str(min(h.path for h in kv[1]))):
        first = str(min(h.path for h in members))
        parts = split_series(members, split_orientation_atol)
        for i, part in enumerate(parts):
            extra: list[Finding] = []
            if not part[0].series_uid:
                extra.append(
                    Finding("warn", "no SeriesInstanceUID (0020,000E): grouped by folder and SeriesNumber")
                )
            if len(parts) > 1:
                extra.append(
                    Finding(
                        "warn",
                        f"SeriesInstanceUID shared with {len(members) - len(part)} other file(s) of another matrix size "
                        f"or orientation: split into {len(parts)} series, this is part {i + 1} ({len(part)} files)",
                    )
                )
            sets, refused = split_image_sets(part, qc)
            for s in sets:
                more = [refused] if refused is not None else []
                todo.append(
                    (list(s.headers), extra + more, i + 1 if len(parts) > 1 else 0, s if s.suffix else None)
                )
                keys.append((key, first, len(keys)))

    owners: dict[Path, set[int]] = defaultdict(set)
    for i, (part, _, _, _) in enumerate(todo):
        for h in part:
            owners[h.path.parent].add(i)
    lost: dict[int, list[tuple[Path, str]]] = defaultdict(list)
    for path, reason in unreadable:
        if path not in not_slices and len(owners.get(path.parent, ())) == 1:
            lost[next(iter(owners[path.parent]))].append((path, reason))
    series: list[SeriesInfo] = []
    for i, (part, extra, part_index, image_set) in enumerate(todo):
        if lost[i]:
            p, r = lost[i][0]
            extra.append(
                Finding(
                    "fail", f"{len(lost[i])} unreadable file(s) in the series folder dropped: {p.name}: {r}"
                )
            )
        series.append(_series_info(part, qc, extra, part_index, tuple(lost[i]), technical_cache, image_set))
    return list(zip(keys, series, strict=True))


def split_series(headers: Sequence[SliceHeader], orientation_atol: float) -> list[list[SliceHeader]]:
    """Split one UID's files into parts of one matrix size and one orientation (to ``orientation_atol``);
    largest part first. Files without orientation stay with the first part of their size."""
    parts: list[tuple[tuple, tuple | None, list[SliceHeader]]] = []
    for h in sorted(headers, key=lambda h: str(h.path)):
        size = (h.rows, h.cols)
        for psize, piop, members in parts:
            if psize != size:
                continue
            if (
                h.iop is None
                or piop is None
                or max(abs(a - b) for a, b in zip(h.iop, piop, strict=True)) <= orientation_atol
            ):
                members.append(h)
                break
        else:
            parts.append((size, h.iop, [h]))
    return sorted((m for _, _, m in parts), key=lambda m: (-len(m), str(m[0].path)))


def _series_info(
    headers: list[SliceHeader],
    qc: QC,
    extra: list[Finding],
    part_index: int,
    lost: tuple[tuple[Path, str], ...],
    technical_cache: dict[Path, dict | None] | None = None,
    image_set: ImageSet | None = None,
) -> SeriesInfo:
    stack = check_series(headers, qc)
    first = stack.slices[0] if stack.slices else sorted(headers, key=lambda h: str(h.path))[0]
    ids, source = volume_id_parts(first)
    if part_index > 1:
        ids["series_folder"] = f"{ids['series_folder']}.{part_index}"
    side = knee_side(first.description, first.laterality, first.image_laterality)
    affine = spacing = None
    if stack.slice_spacing and stack.slice_spacing > 0 and first.iop and first.pixel_spacing and first.ipp:
        iop = np.array(first.iop)
        a = np.eye(4)
        a[:3, 0] = np.array(stack.normal) * stack.slice_spacing
        a[:3, 1] = iop[3:] * first.pixel_spacing[0]  # down a column: PixelSpacing[0] = row spacing
        a[:3, 2] = iop[:3] * first.pixel_spacing[1]  # along a row: PixelSpacing[1] = column spacing
        a[:3, 3] = first.ipp
        affine = tuple(tuple(float(v) for v in r) for r in a)
        spacing = (float(stack.slice_spacing), float(first.pixel_spacing[0]), float(first.pixel_spacing[1]))
    cache = technical_cache if technical_cache is not None else {}
    if first.path not in cache:
        try:
            import pydicom

            cache[first.path] = technical_fields(pydicom.dcmread(first.path, stop_before_pixels=True))
        except Exception:  # the header was read once already; a second failure only loses these fields
            cache[first.path] = None
    technical = cache[first.path]
    files = tuple(h.path for h in stack.slices)
    frames = None
    if any(h.frame is not None for h in stack.slices):
        files = tuple(dict.fromkeys(files))
        where = {p: k for k, p in enumerate(files)}
        frames = tuple((where[h.path], h.frame or 1) for h in stack.slices)
    return SeriesInfo(
        volume_id=make_volume_id(
            ids["patient_id"], ids["time"], ids["study_folder"], ids["series_folder"], side
        )
        + (f"_{image_set.suffix}" if image_set is not None else ""),
        patient_id=ids["patient_id"],
        time=ids["time"],
        study_folder=ids["study_folder"],
        series_folder=ids["series_folder"],
        knee_side=side,
        description=first.description,
        study_description=first.study_description,
        series_uid=first.series_uid,
        frame_of_reference_uid=first.frame_uid,
        files=files,
        dropped=stack.dropped + lost,
        rows=first.rows,
        cols=first.cols,
        n_slices=len(stack.slices),
        spacing=spacing,
        orientation=tuple(first.iop) if first.iop else None,
        affine_lps=affine,
        modality=first.modality,
        transfer_syntax=first.transfer_syntax,
        qc=QCVerdict.from_findings([*extra, *stack.findings]),
        id_source=source,
        technical=technical,
        frames=frames,
        image_set=image_set.to_json() if image_set is not None else None,
    )


def unique_ids(series: list[SeriesInfo]) -> list[SeriesInfo]:
    """The series with colliding volume ids renamed (``.2``, ``.3`` ... on the series folder, a warning),
    sorted by volume id."""
    seen: dict[str, int] = {}
    out = []
    for s in sorted(series, key=lambda s: (-s.n_slices, str(s.files[0] if s.files else ""))):
        n = seen.get(s.volume_id, 0) + 1
        seen[s.volume_id] = n
        if n > 1:
            folder = f"{s.series_folder}.{n}"
            vid = make_volume_id(s.patient_id, s.time, s.study_folder, folder, s.knee_side)
            vid += f"_{s.image_set['suffix']}" if s.image_set else ""
            reason = f"volume id {s.volume_id} is taken by another series (two series in one folder?); renamed {vid}"
            s = replace(
                s,
                volume_id=vid,
                series_folder=folder,
                qc=QCVerdict(_worst(s.qc.status, "warn"), (*s.qc.reasons, reason)),
            )
        out.append(s)
    return sorted(out, key=lambda s: s.volume_id)


def _worst(a: str, b: str) -> str:
    order = ("ok", "warn", "fail", "unsupported")
    return a if order.index(a) >= order.index(b) else b


__all__ = [  # the records and parse_oai_path are re-exported: callers import them from here
    "ScanResult",
    "SeriesInfo",
    "describe",
    "group_key",
    "parse_oai_path",
    "read_folder",
    "split_series",
    "unique_ids",
]
