"""The series checklist: from the headers of one series to slices in position order and a QC verdict.

Pure functions of :class:`~kneeprep.dicom.headers.SliceHeader` lists and a :class:`QC`
(the tolerances); nothing here touches files. The checklist follows highdicom's: one series UID, one frame
of reference, consistent orientation, identical pixel spacing, regular slice spacing -- each failure
names the offending values and the tolerance.

Verdicts, from best to worst: ``ok``; ``warn`` (usable, but something was dropped or looks odd);
``fail`` (the slices do not form one faithful regular grid); ``unsupported`` (a kind of object kneeprep
does not convert: mosaic, colour, single image, no pixel data, non-image SOP class). The frames of an enhanced
multi-frame object are checked as slices (one header per frame, :mod:`kneeprep.dicom.enhanced`); messages
name them ``<file> frame <n>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kneeprep.dicom.headers import SliceHeader

STATUSES = ("ok", "warn", "fail", "unsupported")

#: Classic single-frame cross-sectional image storage SOP classes kneeprep stacks into volumes.
STACKABLE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
#: Enhanced / legacy-converted multi-frame image classes (per-frame geometry in functional groups).
ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}


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


def _fmt(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"


def _names(items: Sequence, limit: int = 3) -> str:
    names = [x.label if isinstance(x, SliceHeader) else x.name for x in items]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def kind_findings(headers: Sequence[SliceHeader]) -> list[Finding]:
    """Why a group of files is not a kind kneeprep stacks (empty list: it is)."""
    h = headers[0]
    out: list[Finding] = []
    sop = h.sop_class_uid
    if sop and sop not in STACKABLE_SOP_CLASSES and sop not in ENHANCED_SOP_CLASSES:
        out.append(Finding("unsupported", f"not a cross-sectional image: SOP class {_sop_name(sop)} ({sop})"))
    if not all(x.has_pixels for x in headers):
        missing = [x for x in headers if not x.has_pixels]
        out.append(
            Finding("unsupported", f"no pixel data (PixelData (7FE0,0010) absent) in {_names(missing)}")
        )
    mosaic = [x for x in headers if x.mosaic_images > 1]
    if mosaic:
        out.append(
            Finding(
                "unsupported",
                f"Siemens mosaic (ImageType MOSAIC, NumberOfImagesInMosaic (0019,100A) "
                f"{mosaic[0].mosaic_images}): slices are tiled inside one frame; kneeprep does not un-tile mosaics",
            )
        )
    if sop not in ENHANCED_SOP_CLASSES and any(x.n_frames > 1 for x in headers):
        out.append(
            Finding(
                "unsupported",
                f"multi-frame image (NumberOfFrames (0028,0008) {h.n_frames}): kneeprep stacks single-frame files",
            )
        )
    if any(x.samples_per_pixel != 1 for x in headers):
        out.append(
            Finding("unsupported", f"colour image (SamplesPerPixel (0028,0002) {h.samples_per_pixel})")
        )
    if not out:
        absent = [
            name
            for name, ok in (
                ("ImagePositionPatient (0020,0032)", all(x.ipp is not None for x in headers)),
                ("ImageOrientationPatient (0020,0037)", all(x.iop is not None for x in headers)),
                ("PixelSpacing (0028,0030)", all(x.pixel_spacing is not None for x in headers)),
            )
            if not ok
        ]
        if absent:
            where = (
                f" (enhanced multi-frame object, {ENHANCED_SOP_CLASSES[sop]}, {h.n_frames} frames in {h.label}: "
                "no per-frame or shared functional groups hold them)"
                if sop in ENHANCED_SOP_CLASSES
                else ""
            )
            out.append(Finding("unsupported", f"no patient geometry: {', '.join(absent)} absent{where}"))
    if len(headers) == 1 and not any(f.status == "unsupported" and "multi-frame" in f.text for f in out):
        what = "one frame" if h.frame is not None else "single file"
        out.append(Finding("unsupported", f"{what} ({h.label}): one 2D image is not a volume"))
    return out


def _sop_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return name if name != uid else "unknown"
    except Exception:  # pragma: no cover - pydicom always has UID
        return "unknown"


def consistency_findings(headers: Sequence[SliceHeader], qc: QC) -> list[Finding]:
    """One frame of reference, one orientation, one pixel spacing, one matrix size, one pixel encoding."""
    out: list[Finding] = []
    ref = headers[0]
    frames = sorted({h.frame_uid for h in headers})
    if len(frames) > 1:
        out.append(
            Finding(
                "fail", f"inconsistent FrameOfReferenceUID (0020,0052): {len(frames)} values {frames[:3]}"
            )
        )
    if all(h.iop is not None for h in headers):
        iops = np.array([h.iop for h in headers])
        dev = np.abs(iops - iops[0]).max(axis=1)
        worst = int(np.argmax(dev))
        if dev[worst] > qc.orientation_atol:
            out.append(
                Finding(
                    "fail",
                    f"inconsistent orientation: ImageOrientationPatient (0020,0037) varies by up to {dev[worst]:.3g} "
                    f"(tolerance orientation_atol {qc.orientation_atol:g}): {headers[worst].label} "
                    f"{_fmt(iops[worst])} vs {ref.label} {_fmt(iops[0])}",
                )
            )
    if all(h.pixel_spacing is not None for h in headers):
        ps = np.array([h.pixel_spacing for h in headers])
        rel = (np.abs(ps - ps[0]) / np.abs(ps[0]).clip(1e-12)).max(axis=1)
        worst = int(np.argmax(rel))
        if rel[worst] > qc.pixel_spacing_rtol:
            out.append(
                Finding(
                    "fail",
                    f"inconsistent pixel spacing: PixelSpacing (0028,0030) {_fmt(ps[worst])} in "
                    f"{headers[worst].label} vs {_fmt(ps[0])} in {ref.label} (relative difference "
                    f"{rel[worst]:.3g} > pixel_spacing_rtol {qc.pixel_spacing_rtol:g})",
                )
            )
    sizes = sorted({(h.rows, h.cols) for h in headers})
    if len(sizes) > 1:
        out.append(
            Finding(
                "fail", f"inconsistent matrix size: Rows x Columns {', '.join(f'{r}x{c}' for r, c in sizes)}"
            )
        )
    enc = sorted({(h.bits_allocated, h.bits_stored, h.pixel_representation) for h in headers})
    if len(enc) > 1:
        out.append(
            Finding(
                "fail", f"inconsistent pixel encoding (BitsAllocated, BitsStored, PixelRepresentation): {enc}"
            )
        )
    return out


def order_slices(headers: Sequence[SliceHeader], qc: QC) -> Stack:
    """Sort slices along the normal, drop duplicates (saying which is kept and why), and find gaps,
    irregular spacing and shear. Assumes a consistent orientation (see :func:`consistency_findings`)."""
    iop = np.array(headers[0].iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return Stack(
            tuple(headers),
            findings=(
                Finding("fail", f"degenerate ImageOrientationPatient {_fmt(iop)} in {headers[0].label}"),
            ),
        )
    normal = normal / norm
    ipp = np.array([h.ipp for h in headers], dtype=np.float64)
    d = ipp @ normal
    order = np.lexsort(([f"{h.path}\0{h.frame or 0:09d}" for h in headers], d))
    hs = [headers[i] for i in order]
    d = d[order]
    ipp = ipp[order]
    findings: list[Finding] = []
    dropped: list[tuple[Path, str]] = []

    # -- duplicates: positions closer than a small fraction of the typical spacing --------------------
    steps = np.diff(d)
    real = steps[steps > 1e-3]
    typical = float(np.median(real)) if real.size else 0.0
    same_tol = max(1e-3, qc.slice_spacing_rtol * typical)
    groups: list[list[int]] = []
    for i in range(len(hs)):
        if groups and d[i] - d[groups[-1][0]] <= same_tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    copies, distinct = [], []
    keep: list[int] = []
    for g in groups:
        if len(g) == 1:
            keep.append(g[0])
            continue
        uids = {(hs[i].sop_instance_uid, hs[i].frame) for i in g}
        if len(uids) == 1:
            k = g[0]  # same instance written twice: the first by file name (lexsort tie-break)
            for i in g[1:]:
                dropped.append(
                    (
                        hs[i].path,
                        f"duplicate of {hs[k].label}: same SOPInstanceUID at {d[k]:.4g} mm; kept the first by file name",
                    )
                )
            copies.append(g)
        else:
            k = max(
                g,
                key=lambda i: (
                    hs[i].instance_number if hs[i].instance_number is not None else -1,
                    str(hs[i].path),
                    hs[i].frame or 0,
                ),
            )
            for i in g:
                if i != k:
                    dropped.append(
                        (
                            hs[i].path,
                            f"same position ({d[k]:.4g} mm) as {hs[k].label} with a different SOPInstanceUID; "
                            f"kept {hs[k].label}, the higher InstanceNumber ({hs[k].instance_number})",
                        )
                    )
            distinct.append(g)
        keep.append(k)
    if copies:
        n_extra = sum(len(g) - 1 for g in copies)
        g = copies[0]
        findings.append(
            Finding(
                "warn",
                f"duplicate slices: {n_extra} extra cop{'y' if n_extra == 1 else 'ies'} of the same instance dropped "
                f"(e.g. {hs[g[1]].label} duplicates {hs[g[0]].label} at {d[g[0]]:.4g} mm)",
            )
        )
    if distinct:
        sizes = {len(g) for g in distinct}
        if len(distinct) == len(groups) and len(sizes) == 1:
            k = sizes.pop()
            findings.append(
                Finding(
                    "unsupported",
                    f"every slice position holds {k} distinct images (multi-echo, multi-phase or repeated "
                    f"acquisition in one series); kneeprep converts one image per position",
                )
            )
        else:
            g = distinct[0]
            findings.append(
                Finding(
                    "fail",
                    f"duplicate slice positions: {len(distinct)} position(s) hold more than one distinct image "
                    f"(e.g. {_names([hs[i] for i in g])} at {d[g[0]]:.4g} mm)",
                )
            )
    hs = [hs[i] for i in keep]
    d = d[keep]
    ipp = ipp[keep]
    n = len(hs)
    spacing = float((d[-1] - d[0]) / (n - 1)) if n > 1 else None
    geometry_ok = n > 1 and spacing is not None and spacing > 0

    # -- gaps and irregular spacing -------------------------------------------------------------------
    if n > 2:
        steps = np.diff(d)
        nominal = float(np.median(steps))
        ratio = steps / nominal
        whole = np.rint(ratio)
        is_gap = (whole >= 2) & (np.abs(ratio - whole) <= qc.slice_spacing_rtol * whole)
        irregular = ~is_gap & (np.abs(ratio - 1) > qc.slice_spacing_rtol)
        if is_gap.any():
            idx = np.flatnonzero(is_gap)
            missing = int((whole[idx] - 1).sum())
            where = "; ".join(
                f"{int(whole[i] - 1)} between {hs[i].label} ({d[i]:.4g} mm) and {hs[i + 1].label} "
                f"({d[i + 1]:.4g} mm), a {steps[i]:.4g} mm step"
                for i in idx[:3]
            )
            findings.append(
                Finding(
                    "fail",
                    f"missing slices: {missing} slice(s) missing at the {nominal:.4g} mm spacing "
                    f"({len(idx)} gap{'s' if len(idx) > 1 else ''}: {where}{'; ...' if len(idx) > 3 else ''})",
                )
            )
            geometry_ok = False
        if irregular.any():
            dev = np.abs(steps - nominal)
            i = int(np.argmax(np.where(irregular, dev, -1)))
            findings.append(
                Finding(
                    "fail",
                    f"non-uniform slice spacing: steps {steps.min():.4g}..{steps.max():.4g} mm, max deviation "
                    f"{dev[i]:.4g} mm ({dev[i] / nominal:.2%}) from the median {nominal:.4g} mm between "
                    f"{hs[i].label} and {hs[i + 1].label} > slice_spacing_rtol {qc.slice_spacing_rtol:g}",
                )
            )
            geometry_ok = False
    if n > 1 and spacing is not None and spacing > 0:
        offsets = (ipp - ipp[0]) - np.outer(d - d[0], normal)
        shear = float(np.linalg.norm(offsets, axis=1).max())
        if shear > qc.slice_spacing_rtol * spacing:
            findings.append(
                Finding(
                    "fail",
                    f"slices are not stacked along their normal: ImagePositionPatient drifts {shear:.4g} mm in-plane "
                    f"(gantry tilt or shear; tolerance {qc.slice_spacing_rtol:g} x {spacing:.4g} mm)",
                )
            )
            geometry_ok = False
        declared = {h.spacing_between_slices for h in hs} - {None}
        if geometry_ok and len(declared) == 1:
            sbs = declared.pop()
            if sbs > 0 and abs(sbs - spacing) > qc.slice_spacing_rtol * sbs:
                findings.append(
                    Finding(
                        "warn",
                        f"measured slice spacing {spacing:.4g} mm differs from SpacingBetweenSlices (0018,0088) "
                        f"{sbs:.4g} mm (slices missing at a regular interval?)",
                    )
                )
    return Stack(
        tuple(hs),
        tuple(dropped),
        tuple(findings),
        tuple(float(x) for x in d),
        tuple(float(x) for x in normal),
        spacing,
        geometry_ok,
    )


def count_findings(n_slices: int, qc: QC) -> list[Finding]:
    if n_slices < qc.min_slices:
        return [Finding("fail", f"too few slices: {n_slices} < min_slices {qc.min_slices}")]
    return []


def check_series(headers: Sequence[SliceHeader], qc: QC) -> Stack:
    """Run the whole checklist on the readable files of one series; returns the ordered :class:`Stack`."""
    headers = sorted(headers, key=lambda h: str(h.path))
    findings = list(kind_findings(headers))
    broken = [h for h in headers if h.pixel_problem]
    dropped = [(h.path, h.pixel_problem) for h in broken]
    usable = [h for h in headers if not h.pixel_problem]
    if broken:
        findings.append(
            Finding(
                "fail",
                f"{len(broken)} file(s) with incomplete pixel data dropped: {broken[0].label}: {broken[0].pixel_problem}",
            )
        )
    if any(f.status == "unsupported" for f in findings) or not usable:
        return Stack(tuple(usable), tuple(dropped), tuple(findings))
    findings += consistency_findings(usable, qc)
    stack = order_slices(usable, qc)
    findings += stack.findings
    findings += count_findings(len(stack.slices), qc)
    consistent = not any(f.status == "fail" and f.text.startswith("inconsistent") for f in findings)
    return Stack(
        stack.slices,
        tuple(dropped) + stack.dropped,
        tuple(findings),
        stack.positions,
        stack.normal,
        stack.slice_spacing,
        stack.geometry_ok and consistent,
    )
