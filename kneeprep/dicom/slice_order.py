"""Slices in position order along the slice normal (:func:`order_slices`): duplicates dropped (saying which
copy is kept and why), and missing slices, irregular spacing, shear and a SpacingBetweenSlices that disagrees
found. One step of the series checklist (:func:`kneeprep.dicom.qc.check_series`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kneeprep.dicom.qc_records import QC, Finding, Stack, fmt_vector, short_names
from kneeprep.dicom.slice_header import SliceHeader


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
                Finding(
                    "fail", f"degenerate ImageOrientationPatient {fmt_vector(iop)} in {headers[0].label}"
                ),
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
                    f"(e.g. {short_names([hs[i] for i in g])} at {d[g[0]]:.4g} mm)",
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
