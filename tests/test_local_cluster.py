"""The local cluster (kneeprep.parallel_procs): its scheduler and nannies run in a process of their own, this
process is only their client; the workers get kneeprep's settings; nothing outlives the driver, not even a
``kill -9`` of it; a cluster that cannot start is a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kneeprep import parallel_procs
from kneeprep.errors import KneeprepError
from kneeprep.parallel import executor

pytestmark = pytest.mark.skipif(not parallel_procs.available(), reason="the process cluster is Linux-only")


def test_the_scheduler_runs_beside_this_process_with_kneeprep_settings():
    # defined here, not at module level: the scheduler unpickles them by value (the tests are not a package)
    def _worker_facts():
        import os
        import sys

        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "warm": "kneeprep.warm" in sys.modules,
            "codec": os.environ.get("KNEEPREP_CODEC_THREADS"),
            "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        }

    def _scheduler_facts():
        import os
        import sys

        import dask

        return {
            "pid": os.getpid(),
            "allowed_failures": dask.config.get("distributed.scheduler.allowed-failures"),
            "stealing": dask.config.get("distributed.scheduler.work-stealing"),
            "convert_imported": "kneeprep.stages.convert" in sys.modules,
        }

    with executor(workers=2) as ex:
        client = ex.client
        sched = client.run_on_scheduler(_scheduler_facts)
        deadline = time.monotonic() + 30  # the tasks' modules: imported by a thread once the cluster is up
        while not sched["convert_imported"] and time.monotonic() < deadline:
            time.sleep(0.1)
            sched = client.run_on_scheduler(_scheduler_facts)
        workers = list(client.run(_worker_facts).values())
    assert sched["pid"] != os.getpid() and sched["allowed_failures"] == 1 and sched["stealing"] is False
    assert sched["convert_imported"]
    assert len(workers) == 2 and all(w["ppid"] == sched["pid"] for w in workers)  # nannies in its process
    assert all(w["warm"] and w["codec"] == "1" and w["trim"] == str(4 * 2**20) for w in workers)
    deadline = time.monotonic() + 10
    while _alive(sched["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(sched["pid"]) and not any(_alive(w["pid"]) for w in workers)  # stopped on leaving


_DRIVER = r"""
import json, os, sys, time
from kneeprep.parallel import executor
if __name__ == "__main__":
    with executor(workers=1) as ex:
        c = ex.client
        pids = [c.run_on_scheduler(os.getpid), *c.run(os.getpid).values()]
        print(json.dumps(pids), flush=True)
        time.sleep(600)
"""


def test_a_killed_driver_leaves_no_scheduler_or_worker(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_cluster_that_cannot_start_is_one_clear_error(monkeypatch, tmp_path):
    """The child's own error (here: a Dask configuration it cannot use) is in the message, not a hang."""
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", "no-such-method")
    import dask

    dask.config.refresh()
    try:
        with pytest.raises(
            KneeprepError, match=r"local Dask cluster's process exited with code \d+:\n(.|\n)*"
        ):
            with executor(workers=1) as ex:
                _ = ex.client
    finally:
        monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD")
        dask.config.refresh()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
