"""The local Dask cluster (``LocalCluster`` of worker processes, one thread each, in a process of its own:
:mod:`kneeprep.parallel_procs`) or a client of an existing scheduler (:func:`dask_client`), and what the local
workers are started with: glibc malloc settings, the cores their Blosc threads may use, the mark
``kneeprep.warm`` reads, a quiet scheduler (no dashboard, slow ticks, no work stealing, no profiler) and
``kneeprep.warm`` preloaded (docs/SCALING.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from kneeprep import parallel_procs


def default_workers() -> int:
    """The cores this process may use (respects CPU affinity / cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: glibc malloc settings for local worker processes. Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` (return freed
#: memory to the OS early), which also freezes glibc's mmap threshold at 128 KiB: every multi-MiB buffer of
#: a volume's read, mask and chunk encoding is then a fresh ``mmap`` whose pages fault in one by one, and a
#: series converts about 2x slower than in a plain process (``write_volume`` 0.50-0.56 s against 0.21-0.30 s
#: in-process, measured). Raising the mmap threshold to 16 MiB keeps those buffers on the heap, while whole
#: volumes (45 MB) are still mapped and returned to the OS when freed. The heap must then not be trimmed after
#: every large free either: with a 64 KiB trim threshold the next buffer faults its pages in again (a series
#: 0.73-0.94 s in-process against 0.55-0.68 s with 4 MiB, the same 132 MB peak; 32 MiB: 0.48-0.75 s but a
#: 160 MB peak -- measured, 160x384x384 DESS with mask, 2 Blosc threads).
#: Workers of an existing cluster (``--scheduler``) get what their own start-up gave them (docs/SCALING.md).
#: set to 1 for the workers of the local cluster (``kneeprep.warm`` then makes them ignore SIGINT)
LOCAL_WORKER_ENV = "KNEEPREP_LOCAL_WORKER"

WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": 4 * 2**20, "MALLOC_MMAP_THRESHOLD_": 16 * 2**20}


@contextlib.contextmanager
def dask_client(n_workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` if given, else to a new local cluster of processes."""
    from distributed import Client, LocalCluster

    # contextlib.closing, not ``with Client``: Client.__exit__ resets a context variable, which fails when
    # the client was made in executor()'s start-up thread and is closed from the caller's
    if scheduler:
        with contextlib.closing(Client(scheduler, timeout="30s")) as client:
            yield client
        return
    import dask

    n = n_workers or default_workers()
    # cores a worker may use for its own threads (Blosc chunk compression, kneeprep.formats.store.codec_threads),
    # and the mark that makes kneeprep.warm leave Ctrl-C to this process
    from kneeprep.formats.store import CODEC_THREADS_ENV

    environ = {**WORKER_MALLOC_ENV, CODEC_THREADS_ENV: max(1, default_workers() // n), LOCAL_WORKER_ENV: 1}
    with (
        _environ_restored([*environ, "PYTHONHASHSEED"]),  # the nanny sets them in this process to spawn
        dask.config.set(
            {
                "distributed.scheduler.allowed-failures": 1,
                # the local scheduler and the workers' nannies share one process (the driver's, where the
                # process cluster is not available): the event-loop tick (every 20 ms, to detect a blocked
                # loop), the system monitor (every 0.5 s), work stealing (every 0.1 s; a worker holds one task
                # at a time here, nothing to steal) and each nanny's memory monitor (psutil every 0.1 s) cost
                # that process 42 ms of CPU per second of run; with these, 9.6-9.9 ms (measured idle on 2
                # workers; docs/SCALING.md). A worker over its memory limit is still restarted, within a
                # second instead of 0.1 s.
                "distributed.admin.tick.interval": "1s",
                "distributed.admin.system-monitor.interval": "5s",
                "distributed.scheduler.work-stealing": False,
                "distributed.worker.memory.monitor-interval": "1s",
                # the statistical profiler samples the task thread's stack every 10 ms, under the GIL
                "distributed.worker.profile.enabled": False,
                # imports done at worker start, overlapping the caller's scan (kneeprep.warm); a user's own
                # preloads (DASK_DISTRIBUTED__WORKER__PRELOAD ...) are kept
                "distributed.worker.preload": [
                    *dask.config.get("distributed.worker.preload", []),
                    "kneeprep.warm",
                ],
                **{f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in environ.items()},
            }
        ),
    ):
        if parallel_procs.available():  # the scheduler and the nannies in a process of their own
            with (
                parallel_procs.process_cluster(n) as address,
                contextlib.closing(Client(address, timeout="30s")) as client,
            ):
                yield client
            return
        with (
            _quiet_http_port(),
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            contextlib.closing(Client(cluster)) as client,
        ):
            yield client


@contextlib.contextmanager
def _quiet_http_port() -> Iterator[None]:
    """Without a dashboard the local scheduler still serves its small HTTP routes, on 8787 or, when another
    cluster holds that port, a random one with a ``UserWarning`` that means nothing to a kneeprep user."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port 8787 is already in use", category=UserWarning)
        yield


@contextlib.contextmanager
def _environ_restored(names: Sequence[str]) -> Iterator[None]:
    """Put ``names`` in ``os.environ`` back as they were on leaving: Dask's nanny sets its
    ``pre-spawn-environ`` in its own process (this one, for a local cluster) before it spawns a worker, and
    never unsets it, so without this they would reach whatever this process starts later."""
    before = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
