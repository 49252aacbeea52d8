"""Convert benchmark: ``kneeprep convert`` (one worker) vs ``dcm2niix -z y`` and ``-z n`` on the same series.

Inputs: a full-size OAI-like sample (``kneeprep.synth.generate(size="full")``: 160x384x384 DESS series of
extensionless DICOM files, with masks). Measured in this run, on this machine:

* **kneeprep, batch**: ``kneeprep convert RAW OUT --workers 1`` as a child process (scan, cluster start,
  all DESS series, report), per recipe; per series = batch wall time / series, and the task's own time from
  the run report (read + transforms + mask + boxes + write).
* **kneeprep, memory**: each series converted by ``convert_series`` in a fresh child process; peak RSS
  (``ru_maxrss``) minus the RSS after imports = what one conversion needs, compared with the raw volume size.
* **dcm2niix**: one child process per series, ``-z y`` (gzip NIfTI) and ``-z n``; wall time and peak RSS
  from ``wait4``.

Recipes: ``3dreasonknee`` (exact DICOM values, native PIR grid, uint16) and the same with ``percentile``
normalization to uint16 (measuring percentiles included); both write Blosc-zstd Zarr, masks and boxes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

PATIENTS = 2
ROOT = Path(__file__).resolve().parents[1]

_MEMORY_CHILD = r"""
import json, sys
from pathlib import Path
from kneeprep.dicom import scan_tree
from kneeprep.pipeline import convert_series
from kneeprep.recipe import load_recipe
from kneeprep import store
import kneeprep.masks, kneeprep.boxes, kneeprep.transforms, zarr, SimpleITK  # imports before the baseline
def hwm():  # VmHWM belongs to this process's own address space (ru_maxrss would include the parent's at fork)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
folder, out, recipe_file, mask = sys.argv[1:5]
recipe = load_recipe(recipe_file)
(info,) = [s for s in scan_tree(folder, recipe.qc).series]
store.init_store(out)
base = hwm()
r = convert_series(info, recipe, out, mask or None)
peak = hwm()
print(json.dumps({"status": r.status, "message": r.message, "base_kib": base, "peak_kib": peak, "seconds": r.seconds}))
"""


def _run(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``cmd``; return (wall seconds, result)."""
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, **kw)
    return time.perf_counter() - t, res


_RSS_WRAPPER = r"""
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps([time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))
"""


def _run_rss(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) and exit code of one child process. It is started from a small wrapper
    interpreter: Linux's ru_maxrss keeps the high-water mark of the address space forked from, so forking
    from this (large) process would report its size instead of the child's."""
    res = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, check=True)
    wall, kib, code = json.loads(res.stdout)
    return wall, kib / 1024, code


def _dcm2niix() -> str:
    exe = Path(sys.executable).with_name("dcm2niix")
    return str(exe) if exe.exists() else "dcm2niix"


def run(workdir: Path) -> str:
    from kneeprep.synth import generate

    workdir = Path(workdir)
    sample = workdir / "sample"
    t = time.perf_counter()
    generate(sample, patients=PATIENTS, size="full", seed=0)
    print(f"  sample generated in {time.perf_counter() - t:.0f} s", flush=True)
    truth = json.loads((sample / "truth.json").read_text())["volumes"]
    vids = sorted(truth)
    raw_mb = {v: 2 * 160 * 384 * 384 / 2**20 for v in vids}  # uint16 volume

    recipes = {"3dreasonknee": ROOT / "recipes" / "3dreasonknee.toml"}
    pct = workdir / "percentile.toml"
    pct.write_text(
        (ROOT / "recipes" / "3dreasonknee.toml")
        .read_text()
        .replace('method = "none"', 'method = "percentile"')
    )
    recipes["3dreasonknee + percentile"] = pct

    rows = {}
    # kneeprep, batch with one worker
    batch = {}
    for name, recipe in recipes.items():
        out = workdir / f"out-{len(batch)}.zarr"
        cmd = [
            sys.executable,
            "-m",
            "kneeprep",
            "convert",
            str(sample / "raw"),
            str(out),
            "--recipe",
            str(recipe),
        ]
        cmd += ["--annotations", str(sample), "--workers", "1", "--no-progress"]
        wall, res = _run(cmd, cwd=ROOT)
        if res.returncode != 0:
            raise RuntimeError(f"kneeprep convert failed: {res.stdout.decode()}\n{res.stderr.decode()}")
        report = json.loads((out / "report.json").read_text())
        items = {i["item"]: i for i in report["items"] if i["status"] == "written"}
        size = sum(f.stat().st_size for v in vids for f in (out / v / "image").rglob("*") if f.is_file())
        batch[name] = {
            "wall": wall,
            "per_series": wall / len(items),
            "items": items,
            "image_mb": size / 2**20 / len(vids),
        }
        print(
            f"  kneeprep [{name}]: {len(items)} series in {wall:.1f} s ({wall / len(items):.2f} s/series)",
            flush=True,
        )

    # kneeprep, memory per conversion
    mem = {}
    for v in vids:
        out = workdir / "mem.zarr"
        cmd = [
            sys.executable,
            "-c",
            _MEMORY_CHILD,
            str(sample / truth[v]["path"]),
            str(out),
            str(recipes["3dreasonknee + percentile"]),
            str(sample / truth[v]["mask"]),
        ]
        res = subprocess.run(cmd, capture_output=True, cwd=ROOT)
        d = json.loads(res.stdout.decode().strip().splitlines()[-1])
        if d["status"] != "written":
            raise RuntimeError(f"memory run of {v}: {d['status']}: {d['message']}")
        mem[v] = (d["peak_kib"] - d["base_kib"]) / 1024, d["peak_kib"] / 1024
        subprocess.run(["rm", "-rf", str(out)])

    # dcm2niix
    for v in vids:
        folder = sample / truth[v]["path"]
        r = {}
        for flag in ("y", "n"):
            o = workdir / f"nii-{flag}" / v
            o.mkdir(parents=True, exist_ok=True)
            wall, rss, code = _run_rss(
                [_dcm2niix(), "-z", flag, "-b", "y", "-f", "%f", "-o", str(o), str(folder)]
            )
            if code != 0:
                raise RuntimeError(f"dcm2niix -z {flag} failed on {folder}")
            r[flag] = (wall, rss, sum(f.stat().st_size for f in o.glob("*.nii*")) / 2**20)
        rows[v] = r
        print(f"  dcm2niix {v}: -z y {r['y'][0]:.2f} s, -z n {r['n'][0]:.2f} s", flush=True)

    lines = [
        "<!-- bench:convert -->",
        "## convert: kneeprep (1 worker) vs dcm2niix, full-size 160×384×384 DESS series",
        "",
        f"{len(vids)} series of a `kneeprep synth --size full` sample ({PATIENTS} patients), same run. kneeprep per",
        "series = batch wall time / series (includes scan, Dask start, masks, boxes, report); task = the series' own",
        "time in the report. Memory: one conversion in a fresh process, peak RSS above the post-import baseline.",
        "",
        "| series | dcm2niix -z y s | -z n s | "
        + " | ".join(f"kneeprep {n} s/series (task s)" for n in batch)
        + " | ratio vs -z y | ratio vs -z n | kneeprep MB above baseline (× raw) | dcm2niix -z y peak MB |",
        "|---" * (7 + len(batch)) + "|",
    ]
    for v in vids:
        zy, zn = rows[v]["y"], rows[v]["n"]
        cells = [f"{batch[n]['per_series']:.2f} ({batch[n]['items'][v]['seconds']:.2f})" for n in batch]
        per = batch[list(batch)[-1]]["per_series"]
        lines.append(
            f"| {v} | {zy[0]:.2f} | {zn[0]:.2f} | "
            + " | ".join(cells)
            + f" | {per / zy[0]:.2f}× | {per / zn[0]:.2f}× | {mem[v][0]:.0f} ({mem[v][0] / raw_mb[v]:.1f}×) | {zy[1]:.0f} |"
        )
    tot_y = sum(rows[v]["y"][0] for v in vids)
    tot_n = sum(rows[v]["n"][0] for v in vids)
    last = batch[list(batch)[-1]]
    lines += [
        "",
        f"Totals: dcm2niix -z y {tot_y:.1f} s, -z n {tot_n:.1f} s; kneeprep "
        + ", ".join(f"[{n}] {b['wall']:.1f} s" for n, b in batch.items())
        + f". With percentile normalization: {last['wall'] / tot_y:.2f}× dcm2niix -z y, {last['wall'] / tot_n:.2f}× -z n"
        f" (goal ≤ 1.0× -z y; stretch ≤ 1.5× -z n).",
        "Stored image size per volume: "
        + ", ".join(f"[{n}] {b['image_mb']:.1f} MB" for n, b in batch.items())
        + f"; dcm2niix .nii.gz {sum(rows[v]['y'][2] for v in vids) / len(vids):.1f} MB, .nii {sum(rows[v]['n'][2] for v in vids) / len(vids):.1f} MB."
        f" Raw volume {raw_mb[vids[0]]:.0f} MB; memory goal ≤ 4× raw above baseline.",
    ]
    return "\n".join(lines)
