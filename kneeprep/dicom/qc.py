"""The series checklist: from the headers of one series to slices in position order and a QC verdict.

Pure functions of :class:`~kneeprep.dicom.slice_header.SliceHeader` lists and a :class:`QC`
(the tolerances); nothing here touches files. The checklist follows highdicom's: one series UID, one frame
of reference, consistent orientation, identical pixel spacing, regular slice spacing -- each failure
names the offending values and the tolerance.

Verdicts, from best to worst: ``ok``; ``warn`` (usable, but something was dropped or looks odd);
``fail`` (the slices do not form one faithful regular grid); ``unsupported`` (a kind of object kneeprep
does not convert: mosaic, colour, single image, no pixel data, non-image SOP class). The frames of an enhanced
multi-frame object are checked as slices (one header per frame, :mod:`kneeprep.dicom.enhanced`); messages
name them ``<file> frame <n>``.

The records (tolerances, findings, verdict, stack) are in :mod:`kneeprep.dicom.qc_records`, the ordering of
slices along the normal in :mod:`kneeprep.dicom.slice_order`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kneeprep.dicom.qc_records import QC, STATUSES, Finding, QCVerdict, Stack, fmt_vector, short_names
from kneeprep.dicom.slice_header import SliceHeader
from kneeprep.dicom.slice_order import order_slices

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
            Finding("unsupported", f"no pixel data (PixelData (7FE0,0010) absent) in {short_names(missing)}")
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
                    f"{fmt_vector(iops[worst])} vs {ref.label} {fmt_vector(iops[0])}",
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
                    f"inconsistent pixel spacing: PixelSpacing (0028,0030) {fmt_vector(ps[worst])} in "
                    f"{headers[worst].label} vs {fmt_vector(ps[0])} in {ref.label} (relative difference "
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


__all__ = [  # the records are re-exported: callers import the checklist and its records from here
    "ENHANCED_SOP_CLASSES",
    "QC",
    "STACKABLE_SOP_CLASSES",
    "STATUSES",
    "Finding",
    "QCVerdict",
    "Stack",
    "check_series",
    "consistency_findings",
    "count_findings",
    "kind_findings",
    "order_slices",
]
