"""``kneeprep rebuild --scheduler`` on an external ``dask scheduler`` + two ``dask worker`` processes on loopback
(the fixture of tests/test_distributed.py): every stage's tasks (scan, convert, boxes, shards, validate) run on
that cluster, and the outputs are those of ``rebuild --workers 0`` in one process -- volumes, attrs, labels, the
boxes table and every shard byte."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_distributed import RECIPE, cluster  # noqa: F401 - fixture

from kneeprep.formats import store


def _rebuild(sample: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kneeprep", "rebuild", "--recipe", str(RECIPE), "--raw", str(sample / "raw"),
           "--annotations", str(sample), "--masks", str(sample), "--out", str(out), "--no-progress", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _shard_bytes(d: Path) -> dict[str, bytes]:
    """The Parquet files and the manifest (the reports and the card name their run, so they differ)."""
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and (p.suffix == ".parquet" or p.name == "manifest.json")
    }


def test_rebuild_on_an_external_cluster_equals_one_process(small_sample, cluster, tmp_path):  # noqa: F811
    local, remote = tmp_path / "local", tmp_path / "remote"
    res = _rebuild(small_sample, local, "--workers", "0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = _rebuild(small_sample, remote, "--scheduler", cluster.address)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + cluster.logs()
    report = json.loads((remote / "report.json").read_text())
    assert report["ok"] and report["stages"]["validate"]["problems"] == []
    conv = json.loads(store.report_path(remote / "volumes.zarr").read_text())
    assert conv["context"]["scheduler"] == cluster.address
    vols = store.list_volumes(local / "volumes.zarr")
    assert vols and store.list_volumes(remote / "volumes.zarr") == vols
    for vid in vols:
        a, b = (store.read_volume(d / "volumes.zarr", vid)[0] for d in (local, remote))
        assert a.dtype == b.dtype and np.array_equal(a, b), vid
        assert np.array_equal(
            store.read_labels(local / "volumes.zarr", vid), store.read_labels(remote / "volumes.zarr", vid)
        ), vid
        assert store.read_attrs(local / "volumes.zarr", vid) == store.read_attrs(remote / "volumes.zarr", vid)
    assert (
        store.boxes_table_path(local / "volumes.zarr").read_bytes()
        == store.boxes_table_path(remote / "volumes.zarr").read_bytes()
    )
    assert _shard_bytes(local / "shards") == _shard_bytes(remote / "shards")
    assert len(_shard_bytes(local / "shards")) > 2
