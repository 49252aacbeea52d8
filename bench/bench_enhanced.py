"""Enhanced benchmark: the same full-size 160x384x384 volume as a classic series (160 files) and as one
Enhanced MR file (160 frames, functional groups), read by kneeprep (scan + ``read_series``, in this process)
and converted by ``dcm2niix -z n`` (a child process), ``ROUNDS`` rounds alternating, medians reported.

The enhanced file is ``kneeprep.synth.write_enhanced`` of the classic series' voxels, frames written in a
shuffled order (readers must sort them by position), Explicit VR Little Endian. Both reads are checked to give
the same voxels and affine before anything is timed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROUNDS = 3
SHAPE = (160, 384, 384)


def _dcm2niix() -> str:
    exe = Path(sys.executable).with_name("dcm2niix")
    return str(exe) if exe.exists() else "dcm2niix"


def _kneeprep(root: Path) -> tuple[float, float, np.ndarray, np.ndarray]:
    from kneeprep.dicom import read_series, scan_tree

    t = time.perf_counter()
    (s,) = scan_tree(root).series
    scan = time.perf_counter() - t
    t = time.perf_counter()
    vol, geo = read_series(s)
    return scan, time.perf_counter() - t, vol, geo.affine_lps


def _dcm2niix_run(folder: Path, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    t = time.perf_counter()
    subprocess.run([_dcm2niix(), "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
                   check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - t


def run(workdir: Path) -> str:
    from kneeprep.geometry import Geometry, affine_from_itk
    from kneeprep.synth import write_series
    from kneeprep.synth.enhanced_writer import write_enhanced

    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    vol = (400 + 3 * z + (y + x) % 97 + rng.integers(0, 200, SHAPE)).astype(np.uint16)
    spacing = (0.7, 0.3646, 0.3646)
    geo = Geometry(SHAPE, spacing, affine_from_itk((10.0, -60.0, 70.0), spacing[::-1],
                                                   (0, 0, -1, 1, 0, 0, 0, -1, 0)))  # fmt: skip
    classic, enhanced = workdir / "classic", workdir / "enhanced"
    write_series(vol, geo, classic, tags={"SeriesDescription": "SAG_3D_DESS_RIGHT", "BitsStored": 16})
    write_enhanced(vol, geo, enhanced / "dess.dcm", tags={"SeriesDescription": "SAG_3D_DESS_RIGHT"},
                   frame_order=rng.permutation(SHAPE[0]))  # fmt: skip
    _, _, vc, ac = _kneeprep(classic)
    _, _, ve, ae = _kneeprep(enhanced)
    if not (np.array_equal(vc, ve) and np.allclose(ac, ae, atol=1e-5) and np.array_equal(vc, vol)):
        raise RuntimeError("classic and enhanced reads differ")
    del vc, ve
    times: dict[str, list[float]] = {k: [] for k in ("cs", "cr", "es", "er", "cn", "en")}
    for rnd in range(ROUNDS):
        s, r, _, _ = _kneeprep(classic)
        times["cs"].append(s)
        times["cr"].append(r)
        times["cn"].append(_dcm2niix_run(classic, workdir / "nii_c"))
        s, r, _, _ = _kneeprep(enhanced)
        times["es"].append(s)
        times["er"].append(r)
        times["en"].append(_dcm2niix_run(enhanced, workdir / "nii_e"))
        print(f"  round {rnd + 1}: classic {times['cs'][-1] + times['cr'][-1]:.2f} s (dcm2niix "
              f"{times['cn'][-1]:.2f}), enhanced {times['es'][-1] + times['er'][-1]:.2f} s (dcm2niix "
              f"{times['en'][-1]:.2f})", flush=True)  # fmt: skip
    m = {k: statistics.median(v) for k, v in times.items()}
    ck, ek = m["cs"] + m["cr"], m["es"] + m["er"]
    raw_mb = vol.nbytes / 1e6
    lines = [
        "<!-- bench:enhanced -->",
        "## enhanced: one 160×384×384 volume as a classic series and as one Enhanced MR file",
        "",
        f"The same uint16 volume ({raw_mb:.0f} MB raw) written as 160 classic MR files and as one Enhanced MR",
        "Image Storage file (functional groups, frames stored in shuffled order), Explicit VR Little Endian.",
        "kneeprep: `scan_tree` + `read_series` in this process (imports warm); dcm2niix: `-z n`, one child",
        f"process per conversion. {ROUNDS} rounds alternating, medians. Both kneeprep reads give the same voxels",
        "and affine (checked before timing). dcm2niix's time includes writing the NIfTI; kneeprep's convert",
        "adds orient, normalize and the Zarr write on top of this read (section convert).",
        "",
        "| input | kneeprep scan s | kneeprep read s | kneeprep total s | dcm2niix -z n s | kneeprep / dcm2niix |",
        "|---|---|---|---|---|---|",
        f"| classic (160 files) | {m['cs']:.2f} | {m['cr']:.2f} | {ck:.2f} | {m['cn']:.2f} | {ck / m['cn']:.2f}× |",
        f"| enhanced (1 file, 160 frames) | {m['es']:.2f} | {m['er']:.2f} | {ek:.2f} | {m['en']:.2f} | "
        f"{ek / m['en']:.2f}× |",
        "",
        f"Enhanced vs classic: kneeprep {ek / ck:.2f}×, dcm2niix {m['en'] / m['cn']:.2f}×.",
    ]
    text = "\n".join(lines)
    print(text)
    return text
