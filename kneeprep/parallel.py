"""Where tasks run: a Dask client (local processes by default, or an existing scheduler), or this process.

* ``workers=None`` or ``N >= 1``: a ``LocalCluster`` of ``N`` worker **processes** (default: the number of
  cores), one thread each -- pydicom parsing holds the GIL and GDCM is not thread-safe, and one task per
  process keeps memory per worker to a few volumes. On Linux the cluster's scheduler and nannies run in a
  process of their own, this one only its client (:mod:`kneeprep.parallel_procs`).
* ``scheduler="tcp://host:8786"``: connect to a running cluster (dask-jobqueue, Kubernetes ...); the workers
  must see the same paths.
* ``workers=0``: no Dask at all; tasks run one after another in this process (debugging, profiling).

Only small records cross the wire: tasks get paths and recipes, write their outputs themselves, and return a
few hundred bytes.

**Lost workers.** A worker process that dies (OOM killer, SIGKILL, a crash in native code) takes its running
task with it; the scheduler re-runs that task elsewhere and gives up on it after ``allowed-failures`` deaths
(``KilledWorker``). A :class:`TaskStream` (behind :meth:`DaskExecutor.map_unordered`) then resubmits the item
once on its own and, if it is lost again or fails in another way, yields ``on_error(item, exception)`` -- a
failure record -- instead of raising: one poisonous series never aborts a run, and the run always ends. A
stream keeps at most one task per worker thread on the cluster (the rest wait in the driver), so a worker holds
one task at a time and a dying worker takes no innocent queued task with it, on any cluster. Convert's stream
sends a backlog up to 4 series a task (``max_batch``: fewer tasks for the client and the scheduler); a worker
dying in such a task takes its batch-mates with it too, and each of them is resubmitted on its own. The local
cluster uses ``allowed-failures = 1``; on an existing cluster that is the scheduler's setting (a poisonous
series in a batch costs the batch's ``allowed-failures + 1`` deaths before it is retried alone). A task that
finished but whose result could not be fetched (its worker died before the gather) is not the items' fault:
each of them is run again once on its own, apart from the lost-worker retry.

This module holds the executors and :func:`executor`; the stream is :mod:`kneeprep.parallel_stream`, the local
cluster and its workers' settings :mod:`kneeprep.parallel_cluster`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kneeprep.parallel_cluster import LOCAL_WORKER_ENV, WORKER_MALLOC_ENV, dask_client, default_workers
from kneeprep.parallel_stream import TaskStream


class SerialExecutor:
    """Runs tasks in this process, one after another, in submission order (``workers=0``)."""

    #: tasks run only when their results are asked for: nothing is gained by submitting early
    runs_ahead = False

    def start_wait(self, since: float) -> float:
        """No cluster to wait for: 0 (see :meth:`DaskExecutor.start_wait`)."""
        return 0.0

    def stream(
        self,
        fn: Callable,
        on_error: Callable[[Any, BaseException], Any] | None = None,
        *,
        max_batch=1,
        **kwargs,
    ):
        return _SerialStream(fn, on_error, kwargs)  # one process: nothing to gain by batching

    def map_unordered(
        self,
        fn: Callable,
        items: Iterable,
        on_error: Callable[[Any, BaseException], Any] | None = None,
        **kwargs,
    ) -> Iterator[Any]:
        return _map(self.stream(fn, on_error, **kwargs), items)


def _map(stream, items: Iterable) -> Iterator[Any]:
    for item in items:
        stream.submit(item)
    return stream.results()


class _SerialStream:
    def __init__(self, fn, on_error, kwargs):
        import collections

        self._fn, self._on_error, self._kwargs = fn, on_error, kwargs
        self._queue = collections.deque()
        self._source = None

    def submit(self, item) -> None:
        self._queue.append(item)

    def feed(self, source: Callable[[], Any]) -> None:
        """Items pulled from ``source()`` (``None``: no more) once the submitted ones have run."""
        self._source = source

    def _next(self) -> bool:
        if not self._queue and self._source is not None:
            item = self._source()
            if item is None:
                self._source = None
            else:
                self._queue.append(item)
        return bool(self._queue)

    def cancel(self) -> None:
        self._queue.clear()
        self._source = None

    def drain(self) -> list:
        return []  # a task's result is yielded as soon as it is computed

    def results(self) -> Iterator[Any]:
        while self._next():
            item = self._queue.popleft()
            try:
                result = self._fn(item, **self._kwargs)
            except Exception as e:
                if self._on_error is None:
                    raise
                result = self._on_error(item, e)
            yield result


class DaskExecutor:
    """Submits one task per item to a ``distributed.Client`` and yields results as they complete.

    ``client`` is a ``distributed.Client`` or a ``concurrent.futures.Future`` of one (a cluster still starting
    in the background: tasks submitted meanwhile wait in their stream, and the first wait for a result waits
    for the cluster -- an error starting it is raised there)."""

    #: times an item whose worker died (``KilledWorker``) is resubmitted on its own before it counts as failed.
    LOST_WORKER_RETRIES = 1
    #: submitted tasks start at once (or when the cluster is up), while the caller goes on
    runs_ahead = True

    def __init__(self, client):
        self._client = client
        self._up_at: float | None = float("-inf")  # when the cluster was up: given ready, before any stage
        if isinstance(client, concurrent.futures.Future):
            self._up_at = None
            client.add_done_callback(lambda f: setattr(self, "_up_at", time.perf_counter()))

    def start_wait(self, since: float) -> float:
        """Seconds after ``since`` (a ``time.perf_counter()`` reading) until the cluster was up (so far, if it
        is still starting): the part of a stage's wall that began before its tasks could run."""
        up = self._up_at if self._up_at is not None else time.perf_counter()
        return max(0.0, up - since)

    @property
    def ready(self) -> bool:
        """Whether the client exists (or failed to start): :attr:`client` will not block."""
        return not isinstance(self._client, concurrent.futures.Future) or self._client.done()

    def when_ready(self, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` once the client has started (now, if it has; from the start-up thread otherwise)."""
        if isinstance(self._client, concurrent.futures.Future):
            # a failed start is raised by whoever needs the client, not in this callback
            self._client.add_done_callback(lambda f: None if f.exception() is not None else fn())
        else:
            fn()

    @property
    def client(self):
        if isinstance(self._client, concurrent.futures.Future):  # still starting: wait for it
            self._client = self._client.result()
        return self._client

    def stream(
        self,
        fn: Callable,
        on_error: Callable[[Any, BaseException], Any] | None = None,
        *,
        max_batch=1,
        **kwargs,
    ):
        """A :class:`TaskStream` running ``fn(item, **kwargs)`` for each item submitted to it (up to
        ``max_batch`` items a task when a backlog waits)."""
        return TaskStream(self, fn, on_error, kwargs, max_batch)

    def map_unordered(
        self,
        fn: Callable,
        items: Iterable,
        on_error: Callable[[Any, BaseException], Any] | None = None,
        **kwargs,
    ) -> Iterator[Any]:
        """Yield ``fn(item, **kwargs)`` for every item, in completion order.

        A task that raises, or whose worker died, yields ``on_error(item, exception)`` when ``on_error`` is
        given (after :data:`LOST_WORKER_RETRIES` resubmissions for a lost worker), else the exception is raised.
        """
        return _map(self.stream(fn, on_error, **kwargs), items)


@contextlib.contextmanager
def executor(
    workers: int | None = None, scheduler: str | None = None
) -> Iterator[SerialExecutor | DaskExecutor]:
    """The executor for a run; closes any cluster it started, also on Ctrl-C.

    The Dask client is created in a background thread as soon as the block is entered, so a caller that enters
    early (before scanning its inputs) overlaps cluster start-up and worker imports with its own work; the
    first ``map_unordered`` waits for it. An error connecting is raised there (or on leaving the block).
    """
    if scheduler and workers is not None and workers != 0:
        # --workers is about the local cluster; with a scheduler the cluster decides
        workers = None
    if not scheduler and workers == 0:
        # this process is the only worker: its chunk compression may use every core
        from kneeprep.formats.store import CODEC_THREADS_ENV as env

        previous = os.environ.get(env)
        os.environ.setdefault(env, str(default_workers()))
        try:
            yield SerialExecutor()
        finally:
            if previous is None:
                os.environ.pop(env, None)
        return
    from concurrent.futures import ThreadPoolExecutor

    stack = contextlib.ExitStack()
    with ThreadPoolExecutor(1, thread_name_prefix="kneeprep-cluster") as pool:
        starting = pool.submit(stack.enter_context, dask_client(workers, scheduler))
        try:
            yield DaskExecutor(starting)
        finally:
            # a cluster cannot be stopped half-started: wait for the start, then close whatever it opened
            with contextlib.suppress(BaseException):
                starting.result()
            stack.close()


__all__ = [  # the stream and the cluster's names are re-exported: callers import them from here
    "LOCAL_WORKER_ENV",
    "WORKER_MALLOC_ENV",
    "DaskExecutor",
    "SerialExecutor",
    "TaskStream",
    "dask_client",
    "default_workers",
    "executor",
]
