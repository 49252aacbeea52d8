"""The shards stage as tasks: byte-identical shards and manifest in this process (``--workers 0``), on a local
cluster (``workers=2``) and on an external ``dask scheduler`` + ``dask worker`` cluster on loopback that loses a
worker mid-stage (the fixture of tests/test_distributed.py, with a preload that slows each shard task and marks
which worker runs it). Validation as tasks on the same clusters finds nothing wrong.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import running_cluster
from test_shards import data, on_disk  # noqa: F401 - fixtures

from kneeprep.recipe import load_recipe
from kneeprep.stages.shards import build_shards
from kneeprep.stages.validate import validate_shards

DEADLINE = 120

_HOOK = """
import os, time
from pathlib import Path
import kneeprep.formats.shard_writer as w
if not getattr(w, "_busy_hook", False):  # dask may run a preload file more than once
    w._busy_hook = True
    _write_shard = w.write_shard
    def write_shard(plan, *a, **k):
        mark = Path(os.environ["KNEEPREP_TEST_BUSY_DIR"]) / f"{os.getpid()}-{plan.path.replace('/', '_')}"
        mark.write_text(str(os.getpgrp()))
        try:
            time.sleep(0.3)
            return _write_shard(plan, *a, **k)
        finally:
            mark.unlink(missing_ok=True)
    w.write_shard = write_shard
"""


def files(d: Path) -> dict[str, bytes]:
    """Every shard file and the manifest (report.json holds timings, so it is not compared)."""
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != "report.json" and not p.name.startswith(".")
    }


@pytest.fixture
def slow_cluster(tmp_path):
    with running_cluster(tmp_path / "cluster", _HOOK) as c:
        yield c


@pytest.fixture
def recipe_file(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text('[shards]\ntarget_bytes = 6000\ncodec = "blosc-lz4"\nlevel = 5\n')
    return p


def test_shards_byte_identical_serial_local_and_external_cluster_losing_a_worker(
    on_disk,  # noqa: F811 - the fixture imported from test_shards
    slow_cluster,
    recipe_file,
    tmp_path,
):
    store, ann, _ = on_disk
    recipe = load_recipe(recipe_file)
    serial = build_shards(store, ann, tmp_path / "serial", recipe, workers=0)
    assert serial["errors"] == 0 and serial["shards"] >= 6
    expected = files(tmp_path / "serial")
    assert len([k for k in expected if k.startswith("data/")]) == serial["shards"]

    local = build_shards(store, ann, tmp_path / "local", recipe, workers=2)
    assert local["workers"] == 2 and files(tmp_path / "local") == expected
    assert validate_shards(tmp_path / "local", workers=2) == []

    out = tmp_path / "external"
    args = [sys.executable, "-m", "kneeprep", "shards", str(store), str(ann), str(out), "--recipe", str(recipe_file),
            "--scheduler", slow_cluster.address, "--no-progress"]  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    try:
        t0 = time.monotonic()
        while driver.poll() is None and time.monotonic() - t0 < DEADLINE:
            marks = list(slow_cluster.busy.iterdir()) if killed is None else []
            if marks and any((out / "data").glob("*.parquet")):  # a shard done, another one being written
                pgid = int(marks[0].read_text())
                killed = next(n for n, p in slow_cluster.procs.items() if p.pid == pgid)
                slow_cluster.kill(killed)
            time.sleep(0.01)
        output = driver.communicate(timeout=max(1.0, DEADLINE - (time.monotonic() - t0)))[0].decode()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=10)
    assert killed is not None, "no worker was busy with a shard after the first one\n" + slow_cluster.logs()
    assert driver.returncode == 0, output[-3000:] + slow_cluster.logs()
    assert files(out) == expected  # the killed worker's shard was written again, elsewhere, the same
    assert not list(out.rglob("*.partial*"))
    assert validate_shards(out, scheduler=slow_cluster.address) == []
