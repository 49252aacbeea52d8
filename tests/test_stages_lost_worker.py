"""Scan, boxes and validate on an external cluster (``dask scheduler`` + 2 ``dask worker`` processes on
loopback, tests/test_distributed.py's fixture) that loses a worker mid-stage: the result is the one-process
result. A preload slows each task of the stage and marks which worker runs it; the first marked worker is
SIGKILLed while its task runs, so that task is lost and must be run again elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_distributed import Cluster, running_cluster
from test_rebuild import _rebuild

from kneeprep.dicom import scan_tasks, scan_tree
from kneeprep.formats import store
from kneeprep.parallel import executor
from kneeprep.recipe import load_recipe
from kneeprep.stages import boxes
from kneeprep.stages.scan import series_row
from kneeprep.stages.validate import validate_shards

_HOOK = """
import os, time
from pathlib import Path
import kneeprep.dicom.scan_tasks as scan_tasks
import kneeprep.stages.boxes as boxes
import kneeprep.stages.validate as validate
if not getattr(boxes, "_busy_hook", False):  # dask may run a preload file more than once
    boxes._busy_hook = True
    def slowed(module, name):
        fn = getattr(module, name)
        def run(*a, **k):
            mark = Path(os.environ["KNEEPREP_TEST_BUSY_DIR"]) / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
            mark.write_text(str(os.getpgrp()))
            try:
                time.sleep(0.4)
                return fn(*a, **k)
            finally:
                mark.unlink(missing_ok=True)
        setattr(module, name, run)
    slowed(scan_tasks, "scan_batch")
    slowed(boxes, "recompute_volumes")
    slowed(validate, "check_shard")
"""


@pytest.fixture
def slow_cluster(tmp_path):
    with running_cluster(tmp_path / "cluster", _HOOK) as c:
        yield c


@pytest.fixture(scope="module")
def built(small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("lost_worker")
    res = _rebuild(small_sample, out)  # --workers 0
    assert res.exit_code == 0, res.output
    return small_sample, out


class Killer(threading.Thread):
    """Kills the first worker seen running a task of ``task`` (a mark in the cluster's busy folder)."""

    def __init__(self, cluster: Cluster, task: str):
        super().__init__(daemon=True)
        self.cluster, self.task = cluster, task
        self.killed: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for mark in self.cluster.busy.glob(f"{self.task}-*"):
                try:
                    pgid = int(mark.read_text())
                except (OSError, ValueError):  # the task just ended
                    continue
                name = next(n for n, p in self.cluster.procs.items() if p.pid == pgid)
                self.cluster.kill(name)
                self.killed = name
                return
            time.sleep(0.01)

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(timeout=10)


def test_scan_on_a_cluster_that_loses_a_worker(built, slow_cluster, monkeypatch):
    sample, _ = built
    monkeypatch.setattr(scan_tasks, "BATCH_FILES", 16)  # many small tasks from a small tree
    serial = scan_tree(sample / "raw")
    with executor(None, slow_cluster.address) as ex, Killer(slow_cluster, "scan_batch") as k:
        remote = scan_tree(sample / "raw", executor=ex)
    assert k.killed is not None, slow_cluster.logs()
    assert [series_row(s) for s in remote.series] == [series_row(s) for s in serial.series]
    assert remote.series == serial.series and remote.n_files == serial.n_files
    assert remote.unreadable == serial.unreadable


def _store_state(root: Path) -> dict:
    return {
        "table": pq.read_table(store.boxes_table_path(root)).to_pylist(),
        "attrs": {v: store.read_attrs(root, v) for v in store.list_volumes(root)},
    }


def test_boxes_on_a_cluster_that_loses_a_worker(built, slow_cluster, monkeypatch, tmp_path):
    _, out = built
    recipe = load_recipe("3dreasonknee")
    monkeypatch.setattr(boxes, "VOLUMES_PER_TASK", 1)  # one task per volume
    copies = {}
    for name in ("serial", "cluster"):
        copies[name] = tmp_path / name / "volumes.zarr"
        shutil.copytree(out / "volumes.zarr", copies[name])
        shutil.copytree(store.kneeprep_dir(out / "volumes.zarr"), store.kneeprep_dir(copies[name]))
        store.boxes_table_path(copies[name]).unlink()  # so both runs write it anew
    margin = dataclasses.replace(recipe, boxes=dataclasses.replace(recipe.boxes, margin_mm=2.0))
    serial = boxes.recompute_store_boxes(copies["serial"], margin, workers=0)
    with Killer(slow_cluster, "recompute_volumes") as k:
        remote = boxes.recompute_store_boxes(copies["cluster"], margin, scheduler=slow_cluster.address)
    assert k.killed is not None, slow_cluster.logs()
    assert not serial.failures and not remote.failures
    assert _store_state(copies["cluster"]) == _store_state(copies["serial"])
    assert _store_state(copies["serial"]) != _store_state(
        out / "volumes.zarr"
    )  # the margin changed the boxes


def test_validate_on_a_cluster_that_loses_a_worker(built, slow_cluster, tmp_path):
    _, out = built
    shards = tmp_path / "shards"
    shutil.copytree(out / "shards", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 2
    bad = shards / manifest["shards"][-1]["path"]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a damaged shard: its sha256 no longer matches
    bad.write_bytes(bytes(data))
    serial = validate_shards(shards, workers=0)
    assert serial and any(p.path.endswith(bad.name) for p in serial)
    with Killer(slow_cluster, "check_shard") as k:
        remote = validate_shards(shards, scheduler=slow_cluster.address)
    assert k.killed is not None, slow_cluster.logs()
    assert remote == serial
