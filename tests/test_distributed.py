"""``kneeprep convert --scheduler`` on a real Dask cluster on loopback, losing a worker mid-run.

The fixture starts ``dask scheduler`` and two ``dask worker`` processes (one worker process, one thread each) on
127.0.0.1 with free ports, each in its own session so that a SIGKILL of the session takes the nanny and its
worker process together (a machine lost), and kills whatever is left when the test ends, passed or not. A
preload file on the workers marks which series each worker process is converting (and slows each task a little
so the kill lands mid-run); the test SIGKILLs a worker that is busy with a series once the first volume is in
the store, and the store must still end up complete and equal to a local run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kneeprep.formats import store
from kneeprep.recipe import load_recipe
from kneeprep.stages.convert import run_convert

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"
DASK = str(Path(sys.executable).parent / "dask")
DEADLINE = 120

_HOOK = """
import os, time
from pathlib import Path
import kneeprep.stages.convert as p
if not getattr(p, "_busy_hook", False):  # dask may run a preload file more than once
    p._busy_hook = True
    _convert_series = p.convert_series
    def convert_series(info, *a, **k):
        mark = Path(os.environ["KNEEPREP_TEST_BUSY_DIR"]) / f"{os.getpid()}-{info.volume_id}"
        mark.write_text(str(os.getpgrp()))
        try:
            time.sleep(0.4)
            return _convert_series(info, *a, **k)
        finally:
            mark.unlink(missing_ok=True)
    p.convert_series = convert_series
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.busy = tmp / "busy"
        self.busy.mkdir(parents=True)
        self.hook = tmp / "busy_hook.py"
        self.hook.write_text(_HOOK)
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = os.environ | {
            "KNEEPREP_TEST_BUSY_DIR": str(self.busy),
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s",
        }

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [DASK, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.tmp,
            start_new_session=True,
        )
        log.close()

    def start(self) -> None:
        self._spawn(
            "scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"]
        )
        for name in ("worker-a", "worker-b"):
            self._spawn(name, [
                "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                "--no-dashboard", "--death-timeout", "20", "--preload", str(self.hook),
                "--local-directory", str(self.tmp / name),
            ])  # fmt: skip
        from distributed import Client

        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)

    def stop(self) -> None:
        for name in list(self.procs):
            try:
                self.kill(name)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self.tmp.glob("*.log")
        )


@contextlib.contextmanager
def running_cluster(tmp: Path, hook: str | None = None):
    """A started :class:`Cluster` (its workers preloading ``hook`` instead of the default busy hook), stopped
    on leaving."""
    c = Cluster(tmp)
    if hook is not None:
        c.hook.write_text(hook)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path / "cluster") as c:
        yield c
    assert all(p.poll() is not None for p in c.procs.values())


def test_convert_on_a_cluster_that_loses_a_worker_mid_run(small_sample, cluster, tmp_path):
    local = tmp_path / "local.zarr"
    rep = run_convert(small_sample / "raw", local, load_recipe(RECIPE), annotations=small_sample, masks=small_sample,
                      workers=0)  # fmt: skip
    assert rep.counts["written"] == 5

    out = tmp_path / "cluster.zarr"
    args = [sys.executable, "-m", "kneeprep", "convert", str(small_sample / "raw"), str(out), "--recipe", str(RECIPE),
            "--annotations", str(small_sample), "--masks", str(small_sample), "--scheduler", cluster.address,
            "--no-progress"]  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    killed = None
    try:
        t0 = time.monotonic()
        while driver.poll() is None and time.monotonic() - t0 < DEADLINE:
            if killed is None and (out / "zarr.json").is_file() and store.list_volumes(out):
                marks = list(
                    cluster.busy.iterdir()
                )  # "<pid>-<volume id>": a worker process busy with a series
                if marks:
                    pgid = int(marks[0].read_text())
                    killed = next(n for n, p in cluster.procs.items() if p.pid == pgid)
                    victim = marks[0].name.split("-", 1)[1]
                    cluster.kill(killed)
            time.sleep(0.01)
        output = driver.communicate(timeout=max(1.0, DEADLINE - (time.monotonic() - t0)))[0].decode()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=10)
    assert killed is not None, (
        "no worker was busy after the first volume: nothing was killed\n" + cluster.logs()
    )
    assert driver.returncode == 0, output[-3000:] + cluster.logs()
    report = json.loads(store.report_path(out).read_text())
    # a task whose result was lost with the worker after its volume was installed is re-run and finds the
    # volume complete: "skipped" (unchanged) instead of "written"; either way each series is done exactly once
    done = [i for i in report["items"] if i["kind"] != "not_selected"]
    assert report["counts"]["failed"] == 0 and len(done) == 5, output
    assert all(i["status"] == "written" or i["kind"] == "unchanged" for i in done), output
    assert report["context"]["scheduler"] == cluster.address
    assert cluster.procs[killed].poll() is not None and all(
        p.poll() is None for n, p in cluster.procs.items() if n != killed
    )
    assert store.list_volumes(out) == store.list_volumes(local)
    for vid in store.list_volumes(local):
        a, b = store.read_volume(out, vid)[0], store.read_volume(local, vid)[0]
        assert a.dtype == b.dtype and np.array_equal(a, b), vid
        assert np.array_equal(store.read_labels(out, vid), store.read_labels(local, vid)), vid
        assert store.read_attrs(out, vid) == store.read_attrs(local, vid), vid
    # the series whose worker was killed was converted again, by the other worker
    assert victim in store.list_volumes(out)
