"""Object storage benchmark: ``kneeprep rebuild`` to a local S3 server against local disk, and training reads
of the shards from that server (cold and warm cache) against local files, in the same run.

Inputs: a full-size OAI-like sample (``kneeprep.synth.generate(size="full")``) of ``PATIENTS`` patients.
The S3 server is moto's (``tests/s3server.py``) in its own process on 127.0.0.1: a real HTTP S3 API on the
loopback, so the figures are kneeprep's and s3fs's costs plus moto's (Python, in memory), not a real object
store's latency or bandwidth. Measured:

* **rebuild, per volume**: ``kneeprep rebuild --workers 0`` in a fresh child process, once to local disk and once
  to ``s3://bucket/x`` (a fresh prefix and staging folder), wall divided by the volumes written; the S3 run's
  time in pull (staging folder made equal to the remote), in the tasks' uploads of the volumes and shard files
  they wrote (``kneeprep.publish``; in this process with ``--workers 0``) and in the final push (the rest of
  the publication) from wrappers in the child;
  then a re-run of each (nothing to do), wall.
* **loader**: samples/s of iterating ``ShardDataset`` (no DataLoader, one process, the split with the most
  rows) over the local shards (twice: the first pass pays one-time costs, the second is the figure), over the
  S3 shards with a fresh cache folder (cold: every shard downloaded) and with the same cache again (warm).

Left out: a real object store (AWS S3, MinIO, GCS): request latency, throughput and multipart uploads are not
measured; several workers (with ``--workers 0`` the tasks' uploads run in the one process); DataLoader workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"
PATIENTS = 2

_SERVER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from s3server import S3Server, new_bucket
s = S3Server().start()
b = new_bucket(s)
print(s.endpoint_url, b.bucket, flush=True)
while True:
    time.sleep(3600)
"""

_CHILD = r"""
import json, sys, time
from kneeprep.formats import objstore
from kneeprep.publish import Publisher
spent = {"pull": 0.0, "push": 0.0, "tasks": 0.0}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name] += time.perf_counter() - t
    return run
objstore.pull, objstore.push = timed("pull", objstore.pull), timed("push", objstore.push)
Publisher.volume, Publisher.files = timed("tasks", Publisher.volume), timed("tasks", Publisher.files)
from kneeprep.cli import main
t = time.perf_counter()
try:
    main(sys.argv[2:])
except SystemExit as e:
    code = e.code
else:
    code = 0
json.dump({"wall": time.perf_counter() - t, "code": code, **spent}, open(sys.argv[1], "w"))
"""


def _rebuild(sample: Path, out: str, env: dict, tag: str, work: Path) -> dict:
    res_file = work / f"{tag}.json"
    args = [
        "rebuild", "--recipe", str(RECIPE), "--raw", str(sample / "raw"), "--annotations", str(sample),
        "--masks", str(sample), "--out", out, "--workers", "0", "--no-progress",
    ]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, str(res_file), *args], env=env, capture_output=True)
    wall = time.perf_counter() - t
    r = json.loads(res_file.read_text())
    if r["code"] not in (0, None):
        raise RuntimeError(f"rebuild {tag} failed: {p.stdout.decode()[-2000:]} {p.stderr.decode()[-2000:]}")
    return r | {"process_wall": wall}


def _samples_per_s(path, **kw) -> tuple[float, int]:
    from kneeprep.loader import ShardDataset

    ds = ShardDataset(path, **kw)
    t = time.perf_counter()
    n = sum(1 for _ in ds)
    return n / (time.perf_counter() - t), n


def run(workdir: Path) -> str:
    from kneeprep.formats.shard_reader import read_manifest
    from kneeprep.formats.store import list_volumes
    from kneeprep.synth import generate

    sample = workdir / "sample"
    generate(sample, patients=PATIENTS, size="full", seed=0)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(ROOT / "tests")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint, bucket = server.stdout.readline().decode().split()
        aws = {
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "eu-west-1",
        }  # fmt: skip
        env = os.environ | aws | {"KNEEPREP_STAGE_DIR": str(workdir / "stage"), "PYTHONPATH": str(ROOT)}
        url = f"s3://{bucket}/x"
        local = _rebuild(sample, str(workdir / "local"), env, "local", workdir)
        remote = _rebuild(sample, url, env, "s3", workdir)
        local2 = _rebuild(sample, str(workdir / "local"), env, "local-rerun", workdir)
        remote2 = _rebuild(sample, url, env, "s3-rerun", workdir)
        n = len(list_volumes(workdir / "local" / "volumes.zarr"))
        manifest = read_manifest(workdir / "local" / "shards")
        rows: dict[str, int] = {}
        for e in manifest["shards"]:
            rows[e["split"]] = rows.get(e["split"], 0) + e["rows"]
        split = max(rows, key=rows.get)
        nbytes = sum(e["bytes"] + e.get("volumes_bytes", 0) for e in manifest["shards"])
        os.environ.update(aws)  # the loader reads the endpoint from the AWS environment
        loc_first, count = _samples_per_s(workdir / "local" / "shards", split=split)  # pays one-time costs
        loc, _ = _samples_per_s(workdir / "local" / "shards", split=split)
        cache = workdir / "cache"
        cold, _ = _samples_per_s(f"{url}/shards", split=split, cache_dir=cache)
        warm, _ = _samples_per_s(f"{url}/shards", split=split, cache_dir=cache)
    finally:
        server.kill()
        server.wait()
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            os.environ.pop(k, None)
    shutil.rmtree(workdir / "stage", ignore_errors=True)
    pv = lambda r: r["process_wall"] / n  # noqa: E731
    lines = [
        "<!-- bench:s3 -->",
        "## s3: rebuild to a local S3 server vs local disk; loader from S3 vs local files",
        "",
        f"A `kneeprep synth --size full` sample of {PATIENTS} patients ({n} DESS volumes); `rebuild --workers 0` in",
        "a child process; moto's S3 server in another process on 127.0.0.1 (real HTTP, in-memory objects; not a",
        f"real object store's latency or bandwidth). Shards: {nbytes / 2**20:.1f} MiB in {len(manifest['shards'])}",
        f"shard files; loader over split `{split}` ({count} samples), one process, no DataLoader.",
        "",
        "| | local disk | s3:// (moto) | ratio s3 / local |",
        "|---|---|---|---|",
        f"| rebuild, process wall | {local['process_wall']:.2f} s | {remote['process_wall']:.2f} s | "
        f"{remote['process_wall'] / local['process_wall']:.2f}× |",
        f"| process wall / {n} volumes (fixed costs included) | {pv(local):.2f} s | {pv(remote):.2f} s | "
        f"{pv(remote) / pv(local):.2f}× |",
        f"| of which pull / tasks' uploads / final push | – | {remote['pull']:.2f} s / {remote['tasks']:.2f} s / "
        f"{remote['push']:.2f} s ({(remote['tasks'] + remote['push']) / n:.2f} s of uploads per volume, its share "
        "of the shards included) | |",
        f"| re-run, nothing to do | {local2['process_wall']:.2f} s | {remote2['process_wall']:.2f} s "
        f"(pull {remote2['pull']:.2f} s, push {remote2['push']:.2f} s) | "
        f"{remote2['process_wall'] / local2['process_wall']:.2f}× |",
        f"| loader samples/s (local: second pass; the first, with one-time costs, {loc_first:.1f}) | {loc:.1f} | "
        f"cold cache {cold:.1f}, warm cache {warm:.1f} | {cold / loc:.2f}× / {warm / loc:.2f}× |",
        "",
        "Left out: a real object store (request latency, bandwidth, multipart uploads), several workers (with",
        "`--workers 0` the tasks' uploads run in the one process; with workers they run in parallel on them),",
        "DataLoader workers. The S3 rebuild stages locally and each task uploads what it wrote: its per-volume",
        "cost is the local one plus the upload of the volume's objects.",
    ]
    return "\n".join(lines)
