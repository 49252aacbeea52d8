"""The scale benchmark's larger tree: every stage of ``rebuild`` on a full-size sample of ``LARGE_PATIENTS``
patients, with 1 worker on one core, 1 worker as started by default and 2 workers (the configurations of
:data:`bench.bench_scale.CONFIGS`), ``LARGE_ROUNDS`` rounds, medians.

The 8-volume sample of the main table has 3 shard files (one with half its volumes) and 2 scan tasks, so its
stages end with one worker idle and each pays its fixed costs (a worker's first task, a task round trip) over
few volumes; this tree gives each stage several tasks per worker, as a real tree does. Competitors in the same
run: ``dcm2niix -z y`` over the same series with 1 and 2 processes (one round), and the scan alone once a
cluster is up (one cluster each). Convert starts each series as soon as the scan has found it, so on one worker
the scan's tasks wait behind conversions: ``scan`` and ``convert`` are shown apart as the report has them, and
together.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.bench_scale import CONFIGS, _dcm2niix_tree, _ratio, _rebuild, _scan_alone

LARGE_PATIENTS = 16
LARGE_ROUNDS = 2
ROWS = (("scan", ("scan",)), ("convert", ("convert",)), ("scan + convert", ("scan", "convert")),
        ("shards", ("shards",)), ("validate", ("validate",)))  # fmt: skip


def larger_tree(workdir: Path) -> tuple[list[str], dict]:
    """The section's lines, and ``{"volumes": n, "wall_1c": s, "bytes": b, "files": f}`` (the 1-core rebuild's
    median wall; the raw tree's bytes and files)."""
    import json

    from kneeprep.synth import generate

    med = statistics.median
    sample = Path(workdir) / f"large-{LARGE_PATIENTS}"
    t = time.perf_counter()
    generate(sample, patients=LARGE_PATIENTS, size="full", seed=2)
    print(
        f"  larger tree ({LARGE_PATIENTS} patients) generated in {time.perf_counter() - t:.0f} s", flush=True
    )
    truth = json.loads((sample / "truth.json").read_text())["volumes"]
    n = len(truth)
    runs: dict[object, list[dict]] = {c: [] for c in CONFIGS}
    for rnd in range(LARGE_ROUNDS):
        for c in CONFIGS:
            runs[c].append(_rebuild(sample / "raw", sample, Path(workdir) / f"out-large-{c}", c))
        print(f"  larger tree, round {rnd + 1}: " + ", ".join(f"w{c} {r[-1]['wall']:.1f} s" for c, r in runs.items()),
              flush=True)  # fmt: skip
    series_dirs = sorted({sample / v["path"] for v in truth.values()})
    nii = {p: _dcm2niix_tree(series_dirs, Path(workdir) / "nii-large", p) for p in (1, 2)}
    alone = {w: _scan_alone(sample / "raw", w)["scan"] for w in (1, 2)}

    def wall(c, stages) -> float:
        return med(sum(r["seconds"].get(s, 0.0) for s in stages) for r in runs[c])

    lines = [
        "",
        f"### every stage on a larger tree: {LARGE_PATIENTS} patients, {n} full-size volumes",
        "",
        f"The sample above has 3 shard files (one holds half its volumes) and 2 scan tasks: its stages end with "
        f"one worker idle, and each pays its fixed costs over few volumes. The same rebuild of a "
        f"{LARGE_PATIENTS}-patient full-size sample ({n} DESS volumes, masks; the same generator, another seed) "
        f"gives each stage several tasks per worker; {LARGE_ROUNDS} rounds, medians, the same three "
        "configurations. Convert starts each series as soon as the scan finds it, so with one worker the scan's "
        "tasks wait behind conversions: `scan` and `convert` apart as the report has them, and together.",
        "",
        "| stage | wall 1 worker, one core s | wall 1 worker s | wall 2 workers s | speed-up from one core | "
        "speed-up from 1 worker |",
        "|---|---|---|---|---|---|",
    ]
    for name, stages in ROWS:
        c1, w1, w2 = (wall(c, stages) for c in CONFIGS)
        lines.append(f"| {name} | {c1:.2f} | {w1:.2f} | {w2:.2f} | {_ratio(c1, w2)} | {_ratio(w1, w2)} |")
    c1, w1, w2 = (med(r["wall"] for r in runs[c]) for c in CONFIGS)
    lines += [
        f"| **rebuild (process wall)** | {c1:.2f} | {w1:.2f} | {w2:.2f} | {_ratio(c1, w2)} | {_ratio(w1, w2)} |",
        f"| dcm2niix -z y, {n} series (1 process, 2; one round) | {nii[1]:.2f} | | {nii[2]:.2f} | "
        f"{_ratio(nii[1], nii[2])} | |",
        f"| scan alone, the cluster already up (median of 3 scans, one cluster) | | {alone[1]:.2f} | {alone[2]:.2f} "
        f"| | {_ratio(alone[1], alone[2])} |",
    ]
    raw = [f.stat().st_size for f in (sample / "raw").rglob("*") if f.is_file()]
    return lines, {"volumes": n, "wall_1c": c1, "bytes": sum(raw), "files": len(raw)}
