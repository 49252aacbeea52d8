"""Convert benchmark: ``kneeprep convert`` (one worker) vs ``dcm2niix -z y`` and ``-z n`` on the same series.

Inputs: a full-size OAI-like sample (``kneeprep.synth.generate(size="full")``: 160x384x384 DESS series of
extensionless DICOM files, with masks), and a second raw tree holding half of its patients (hard links to
the same files). Measured in this run, on this machine:

* **kneeprep, per series in a batch**: ``kneeprep convert RAW OUT --workers 1`` as a child process on the
  half tree and on the whole tree (scan, cluster start, every series of the tree, boxes table, report),
  ``ROUNDS`` times alternating with dcm2niix; per series = (median whole-tree wall - median half-tree wall) /
  (the series the whole tree has more): what one more series adds to a batch, fixed costs (interpreter,
  imports, Dask cluster start and stop, report) cancelled. Also reported: the whole-tree wall / its series
  (every fixed cost included), the task's own time from the run report, and the wall of a re-run that finds
  everything done (resume).
* **kneeprep, memory**: each series converted by ``convert_series`` in a fresh child process; peak RSS
  (VmHWM) minus the RSS after imports = what one conversion needs, compared with the raw volume size.
* **dcm2niix**: one child process per series, ``-z y`` (gzip NIfTI) and ``-z n``; wall time and peak RSS
  from ``wait4``.

Recipes: ``3dreasonknee`` (exact DICOM values, native PIR grid, uint16) and the same with ``percentile``
normalization to uint16 (measuring percentiles included); both write Blosc-zstd Zarr, masks and boxes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kneeprep.formats.store import kneeprep_dir, report_path

PATIENTS = 4  # the whole tree; the half tree has the first PATIENTS // 2
ROOT = Path(__file__).resolve().parents[1]

_MEMORY_CHILD = r"""
import json, sys
from pathlib import Path
from kneeprep.dicom import scan_tree
from kneeprep.stages.convert_series import convert_series
from kneeprep.recipe import load_recipe
from kneeprep.formats import store
import kneeprep.formats.masks, kneeprep.boxes, kneeprep.transforms, zarr, SimpleITK  # imports before the baseline
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


ROUNDS = 3  # kneeprep batches and dcm2niix passes alternate, this many rounds; medians are reported


def _convert_cmd(raw: Path, sample: Path, out: Path, recipe: Path) -> list[str]:
    """``kneeprep convert`` of a raw tree with one local worker (masks from the sample's split CSVs)."""
    return [sys.executable, "-m", "kneeprep", "convert", str(raw), str(out), "--recipe", str(recipe),
            "--annotations", str(sample), "--workers", "1", "--no-progress"]  # fmt: skip


def _kneeprep_batch(raw: Path, sample: Path, out: Path, recipe: Path) -> tuple[float, dict]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(kneeprep_dir(out), ignore_errors=True)
    cmd = _convert_cmd(raw, sample, out, recipe)
    wall, res = _run(cmd, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"kneeprep convert failed: {res.stdout.decode()}\n{res.stderr.decode()}")
    return wall, json.loads(report_path(out).read_text())


def _resume(raw: Path, sample: Path, out: Path, recipe: Path) -> tuple[float, float]:
    """(wall, scan seconds) of the same command again on the finished store: every series unchanged, nothing
    converted."""
    wall, res = _run(_convert_cmd(raw, sample, out, recipe), cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"kneeprep convert (resume) failed: {res.stdout.decode()}\n{res.stderr.decode()}")
    return wall, json.loads(report_path(out).read_text())["context"]["scan_seconds"]


def _half_tree(sample: Path, dest: Path) -> int:
    """``dest/raw``: hard links to the sample's raw files, less those under the folders of its second half of
    patients; returns how many DESS series it holds."""
    truth = json.loads((sample / "truth.json").read_text())["volumes"]
    patients = sorted({v["patient_id"] for v in truth.values()})
    left_out = set(patients[PATIENTS // 2 :])
    for f in (sample / "raw").rglob("*"):
        rel = f.relative_to(sample / "raw")
        if f.is_file() and not left_out.intersection(rel.parts):
            (dest / "raw" / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dest / "raw" / rel)
    return sum(v["patient_id"] not in left_out for v in truth.values())


def _mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def full_sample(workdir: Path) -> tuple[Path, dict, dict[str, tuple[Path, int]]]:
    """The full-size sample of ``PATIENTS`` patients under ``workdir/sample``, its truth's volumes, and the raw
    trees ``{"half": (raw, volumes), "whole": (raw, volumes)}`` (the half tree: hard links, :func:`_half_tree`)."""
    from kneeprep.synth import generate

    sample = workdir / "sample"
    t = time.perf_counter()
    generate(sample, patients=PATIENTS, size="full", seed=0)
    print(f"  sample generated in {time.perf_counter() - t:.0f} s", flush=True)
    truth = json.loads((sample / "truth.json").read_text())["volumes"]
    n_half = _half_tree(sample, workdir / "half")
    return sample, truth, {"half": (workdir / "half" / "raw", n_half), "whole": (sample / "raw", len(truth))}


def run(workdir: Path) -> str:
    import statistics

    med = statistics.median
    workdir = Path(workdir)
    sample, truth, trees = full_sample(workdir)
    vids = sorted(truth)
    n, n_half = trees["whole"][1], trees["half"][1]
    raw_mb = 2 * 160 * 384 * 384 / 2**20  # uint16 volume

    recipes = {"exact values": ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"}
    pct = workdir / "percentile.toml"
    pct.write_text(
        (ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml")
        .read_text()
        .replace('method = "none"', 'method = "percentile"')
    )
    recipes["percentile"] = pct

    walls = {(k, tree): [] for k in recipes for tree in trees}
    tasks = {k: [] for k in recipes}
    resumes = []
    nii = {"y": [], "n": []}  # per-series wall, every series every round
    nii_rss = {"y": [], "n": []}
    nii_mb = {}
    stores = {name: workdir / f"out-{i}.zarr" for i, name in enumerate(recipes)}
    # one untimed batch first: the first run of a fresh sample pays for cold caches (byte code, page cache)
    _kneeprep_batch(trees["half"][0], sample, stores["exact values"], recipes["exact values"])
    for rnd in range(ROUNDS):
        for flag in ("y", "n"):
            for v in vids:
                o = workdir / f"nii-{flag}" / v
                subprocess.run(["rm", "-rf", str(o)])
                o.mkdir(parents=True)
                cmd = [
                    _dcm2niix(),
                    "-z",
                    flag,
                    "-b",
                    "y",
                    "-f",
                    "%f",
                    "-o",
                    str(o),
                    str(sample / truth[v]["path"]),
                ]
                wall, rss, code = _run_rss(cmd)
                if code != 0:
                    raise RuntimeError(f"dcm2niix -z {flag} failed on {truth[v]['path']}")
                nii[flag].append(wall)
                nii_rss[flag].append(rss)
                nii_mb[flag] = (
                    sum(f.stat().st_size for f in (workdir / f"nii-{flag}").rglob("*.nii*")) / 2**20 / n
                )
        for name, recipe in recipes.items():
            for tree, (raw, count) in trees.items():
                wall, report = _kneeprep_batch(raw, sample, stores[name], recipe)
                items = [i for i in report["items"] if i["status"] == "written"]
                if len(items) != count:
                    raise RuntimeError(
                        f"kneeprep [{name}] wrote {len(items)} of {count} series ({tree} tree)"
                    )
                walls[name, tree].append(wall)
                if tree == "whole":
                    tasks[name] += [i["seconds"] for i in items]
                    scanned = len(report["items"])
                    if name == "exact values":
                        resumes.append(_resume(raw, sample, stores[name], recipe))
        print(
            f"  round {rnd + 1}: dcm2niix -z y {med(nii['y'][-n:]):.2f} s/series, -z n {med(nii['n'][-n:]):.2f}; "
            + ", ".join(f"kneeprep [{k}] {tree} tree {w[-1]:.1f} s" for (k, tree), w in walls.items())
            + f"; resume {resumes[-1][0]:.2f} s",
            flush=True,
        )

    # peak memory of one conversion per series, in a fresh process (what one worker needs), with the
    # environment a local worker of a 1-worker cluster gets (malloc settings, Blosc threads)
    from kneeprep.parallel import WORKER_MALLOC_ENV, default_workers

    worker_env = os.environ | {k: str(v) for k, v in WORKER_MALLOC_ENV.items()}
    worker_env["KNEEPREP_CODEC_THREADS"] = str(default_workers())
    mem = {k: [] for k in recipes}
    for name, recipe in recipes.items():
        for v in vids[:n_half]:
            out = workdir / "mem.zarr"
            cmd = [sys.executable, "-c", _MEMORY_CHILD, str(sample / truth[v]["path"]), str(out), str(recipe)]
            res = subprocess.run(
                [*cmd, str(sample / truth[v]["mask"])], capture_output=True, cwd=ROOT, env=worker_env
            )
            d = json.loads(res.stdout.decode().strip().splitlines()[-1])
            if d["status"] != "written":
                raise RuntimeError(f"memory run of {v}: {d['status']}: {d['message']}")
            mem[name].append((d["peak_kib"] - d["base_kib"]) / 1024)
            subprocess.run(["rm", "-rf", str(out)])

    zy, zn = med(nii["y"]), med(nii["n"])
    fixed = med(wall - scan for wall, scan in resumes)
    old_per = (med(walls["exact values", "whole"]) - fixed) / n
    extra = n - n_half
    lines = [
        "<!-- bench:convert -->",
        "## convert: kneeprep (1 worker) vs dcm2niix, full-size 160×384×384 DESS series",
        "",
        f"A `kneeprep synth --size full` sample of {PATIENTS} patients ({n} DESS series, {scanned} series in all) and",
        f"a tree of its first {PATIENTS // 2} patients ({n_half} DESS series; hard links to the same files); {ROUNDS}",
        "rounds in one run, kneeprep batches and dcm2niix runs alternating; medians over rounds. kneeprep is one",
        "`kneeprep convert --workers 1` process per batch (scan, local Dask cluster of one worker, every series,",
        "boxes table, report). **Per series (batch)** = (whole-tree wall − half-tree wall) / "
        f"{extra}: what one more",
        "series adds to a batch (its share of the scan included; interpreter, imports, cluster start/stop and",
        "report cancel). **Whole batch / series** = whole-tree wall / its series, every fixed cost included.",
        "**Task** = the series' own time in the run report (read, hash, transforms, mask, boxes, write). The scan",
        "hands each series to the worker as soon as its folder is read, so scan and conversion overlap; the",
        "driver process scans on the second core while the worker converts (with 2 Blosc threads).",
        "kneeprep includes normalization, Zarr compression, the mask and boxes; dcm2niix writes the image (and a",
        "BIDS sidecar) only, one process per series. Memory: one conversion in a fresh process with a local",
        "worker's environment (malloc settings, Blosc threads), peak RSS (VmHWM) above the post-import baseline;",
        "dcm2niix: its whole peak RSS.",
        "",
        "| | per series s (batch) | whole batch / series s | task s (median) | per series vs -z y | per series vs -z n | peak MB above baseline (× raw) | stored MB / series |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in recipes:
        whole, half = med(walls[name, "whole"]), med(walls[name, "half"])
        per = (whole - half) / extra
        size = med([_mb(stores[name] / v) for v in vids])
        img = med([_mb(stores[name] / v / "image") for v in vids])
        peak = max(mem[name])
        lines.append(
            f"| kneeprep, {name} | {per:.2f} | {whole / n:.2f} | {med(tasks[name]):.2f} | {per / zy:.2f}× | "
            f"{per / zn:.2f}× | {peak:.0f} ({peak / raw_mb:.1f}×) | {size:.1f} (image {img:.1f}) |"
        )
    lines += [
        f"| dcm2niix -z y | {zy:.2f} | {zy:.2f} | | 1.00× | {zy / zn:.2f}× | {max(nii_rss['y']):.0f} (whole process) | {nii_mb['y']:.1f} |",
        f"| dcm2niix -z n | {zn:.2f} | {zn:.2f} | | {zn / zy:.2f}× | 1.00× | {max(nii_rss['n']):.0f} (whole process) | {nii_mb['n']:.1f} |",
        "",
        "Batch walls (s): "
        + "; ".join(
            f"[{k}] {tree} tree {', '.join(f'{w:.2f}' for w in ws)}" for (k, tree), ws in walls.items()
        )
        + f". Re-run of the whole tree with everything done (resume): {med(r[0] for r in resumes):.2f} s.",
        "The definition used before the scan overlapped conversion -- (whole-tree wall − (resume wall − its scan))"
        f" / series -- gives {old_per:.2f} s ({old_per / zy:.2f}× -z y) for exact values.",
        f"Raw volume {raw_mb:.0f} MB. Goals: per series ≤ 1.0× dcm2niix -z y (stretch ≤ 1.5× -z n); peak ≤ 4× raw",
        "above baseline per worker.",
    ]
    return "\n".join(lines)
