"""The local cluster in a process of its own: a child process runs Dask's ``LocalCluster`` (the scheduler and
the nannies of ``N`` one-thread worker processes, on 127.0.0.1) and this process is only its client
(:func:`process_cluster`), as it is of any existing cluster (``--scheduler``).

Why: a ``LocalCluster`` made in the driver runs the scheduler and the nannies on the driver's event loop,
under its GIL. Each task then costs the driver the scheduler's work too (the graph update and unpickling, the
transitions, the messages to and from the worker, the result's gather: 4.4-5.0 ms of driver CPU per task,
against 1.6-1.7 ms as a client; measured on 400 no-op tasks), and the idle scheduler, nannies and cluster
watch tick on (9 ms of driver CPU per second of run, against under 1 ms) -- all of it competing with
kneeprep's own work in the main thread. Here that work runs on another core, as on any cluster. The cost:
one more interpreter to start, about 0.4-0.9 s more before the first task on this 2-core machine
(docs/SCALING.md).

The child gets this process's Dask configuration (``DASK_INTERNAL_INHERIT_CONFIG``, as Dask's own SSH
cluster passes it: the quiet scheduler, the nannies' ``pre-spawn-environ``, the preloads), its own session
(a Ctrl-C in the terminal reaches only the driver, which stops the run and then the child) and, on Linux,
death with the driver (``PR_SET_PDEATHSIG``: a ``kill -9`` of the driver leaves no scheduler or worker
behind -- a worker process exits when its nanny's process does). Elsewhere :func:`available` is false and
the ``LocalCluster`` is made in the driver, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kneeprep.errors import KneeprepError

#: seconds to wait for the scheduler's address file and then for every worker
START_TIMEOUT_S = 120.0
#: seconds a process is given to stop after SIGTERM before it is killed
STOP_TIMEOUT_S = 10.0


def available() -> bool:
    """Whether the processes can be tied to this one's life (Linux: ``prctl(PR_SET_PDEATHSIG)``)."""
    return sys.platform.startswith("linux")


def _die_with(parent: int):
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

    def preexec() -> None:  # in the child, before exec
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return preexec


@contextlib.contextmanager
def process_cluster(n_workers: int) -> Iterator[str]:
    """Start the local cluster (``LocalCluster`` of ``n_workers`` one-thread worker processes) in a child
    process; yield its scheduler's address once its workers are up; stop it on leaving (SIGTERM: it closes
    the cluster; SIGKILL after :data:`STOP_TIMEOUT_S`). The child runs with the current Dask configuration."""
    import dask

    with tempfile.TemporaryDirectory(prefix="kneeprep-dask-") as tmp:
        address_file, log = Path(tmp) / "scheduler.json", Path(tmp) / "cluster.log"
        env = {**os.environ, "DASK_INTERNAL_INHERIT_CONFIG": dask.config.serialize(dask.config.global_config)}
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(n_workers), str(address_file)],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with(os.getpid()),
            )  # fmt: skip
        try:
            yield _address(address_file, proc, log)
        finally:
            _stop(proc)


def _address(address_file: Path, proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise KneeprepError(
                f"the local Dask cluster's process exited with code {proc.returncode}:\n{tail}"
            )
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(address_file.read_text())["address"]
        time.sleep(0.02)
    raise KneeprepError(f"the local Dask cluster did not start within {START_TIMEOUT_S:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()  # its workers exit with it (a worker process watches its nanny)
        proc.wait()


#: the modules of kneeprep's task functions and their arguments' records: the scheduler unpickles each task
#: it is given, so its process imports them -- on its event loop, at the first task of each stage (0.5 s
#: for the convert stage's, measured) unless a thread has imported them already
TASK_MODULES = (
    "kneeprep.dicom.scan_tasks", "kneeprep.stages.convert", "kneeprep.stages.boxes", "kneeprep.stages.validate",
    "kneeprep.stages.export", "kneeprep.formats.shard_writer", "kneeprep.publish",
)  # fmt: skip


def _main(n_workers: int, address_file: Path) -> None:
    """The child: the cluster, its address written (whole) once the workers are up, then wait for SIGTERM."""
    import importlib
    import logging
    import threading

    from distributed import LocalCluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver handles Ctrl-C, then stops this process
    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.ERROR,
    )  # fmt: skip
    tmp = address_file.with_name(address_file.name + ".tmp")
    tmp.write_text(json.dumps({"address": cluster.scheduler_address}))
    os.replace(tmp, address_file)
    # now, not before: while the driver connects and its scan's first tasks run (the scan's module first);
    # imported earlier, they held the GIL the cluster's start needs (0.5 s later, measured)
    threading.Thread(target=lambda: [importlib.import_module(m) for m in TASK_MODULES], daemon=True).start()
    stop.wait()
    cluster.close(timeout=STOP_TIMEOUT_S / 2)


if __name__ == "__main__":
    _main(int(sys.argv[1]), Path(sys.argv[2]))
