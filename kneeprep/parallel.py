"""Where tasks run: a Dask client (local processes by default, or an existing scheduler), or this process.

* ``workers=None`` or ``N >= 1``: a ``LocalCluster`` of ``N`` worker **processes** (default: the number of
  cores), one thread each -- pydicom parsing holds the GIL and GDCM is not thread-safe, and one task per
  process keeps memory per worker to a few volumes.
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
one task at a time and a dying worker takes no innocent queued task with it, on any cluster. The local cluster
uses ``allowed-failures = 1``; on an existing cluster that is the scheduler's setting.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)


class SerialExecutor:
    """Runs tasks in this process, one after another, in submission order (``workers=0``)."""

    #: tasks run only when their results are asked for: nothing is gained by submitting early
    runs_ahead = False

    def stream(self, fn: Callable, on_error: Callable[[Any, BaseException], Any] | None = None, **kwargs):
        return _SerialStream(fn, on_error, kwargs)

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

    def submit(self, item) -> None:
        self._queue.append(item)

    def cancel(self) -> None:
        self._queue.clear()

    def drain(self) -> list:
        return []  # a task's result is yielded as soon as it is computed

    def results(self) -> Iterator[Any]:
        while self._queue:
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

    def stream(self, fn: Callable, on_error: Callable[[Any, BaseException], Any] | None = None, **kwargs):
        """A :class:`TaskStream` running ``fn(item, **kwargs)`` for each item submitted to it."""
        return TaskStream(self, fn, on_error, kwargs)

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


class TaskStream:
    """Tasks submitted one at a time and their results in completion order.

    :meth:`submit` may be called before and while :meth:`results` is iterated: a caller submits work as it
    discovers it (and more as results come in); :meth:`results` ends when every task submitted so far has given
    its result. The stream keeps at most as many tasks on the cluster as it has worker threads (the rest wait
    here, in submission order), so a worker holds one task at a time and a dying worker takes no innocent
    queued task with it; a finished task's result is fetched and released at once, from a callback thread,
    so a worker lost later does not make the cluster recompute it. Error handling as
    :meth:`DaskExecutor.map_unordered`. Leaving :meth:`results` early (an error or Ctrl-C in the caller)
    cancels every task not yet finished and drops those not yet started."""

    #: seconds between two asks of the scheduler for the number of worker threads
    LIMIT_REFRESH_S = 1.0

    def __init__(self, executor: DaskExecutor, fn: Callable, on_error, kwargs: dict):
        import collections
        import queue
        import threading

        self._ex, self._fn, self._on_error, self._kwargs = executor, fn, on_error, kwargs
        self._lock = threading.RLock()
        self._items: list = []
        self._tries: list[int] = []
        self._waiting: collections.deque[int] = collections.deque()
        self._live: dict = {}  # future key -> (future, item index)
        self._done: queue.Queue = queue.Queue()  # (item index, "finished" | "error", result or exception)
        self._outstanding = 0  # submitted items whose result has not been yielded
        self._limit = (-1e9, 1)  # (when asked, worker threads)
        self._closed = False
        if not executor.ready:
            executor.when_ready(self._pump)

    def submit(self, item) -> None:
        with self._lock:
            self._items.append(item)
            self._tries.append(0)
            self._waiting.append(len(self._items) - 1)
            self._outstanding += 1
        self._pump()

    def _threads(self) -> int:
        import time

        asked, n = self._limit
        if time.monotonic() - asked > self.LIMIT_REFRESH_S:
            try:
                n = max(1, sum(self._ex.client.nthreads().values()))
            except (OSError, TimeoutError) as e:  # the scheduler did not answer: keep the last count
                log.debug("asking the scheduler for its worker threads failed: %s", e)
            self._limit = (time.monotonic(), n)
        return n

    def _pump(self) -> None:
        if not self._ex.ready:  # submitted while the cluster starts: sent when it is up
            return
        with self._lock:
            while self._waiting and not self._closed and len(self._live) < self._threads():
                i = self._waiting.popleft()
                future = self._ex.client.submit(self._fn, self._items[i], pure=False, **self._kwargs)
                self._live[future.key] = (future, i)
                future.add_done_callback(self._finished)

    def _finished(self, future) -> None:  # runs in distributed's callback thread
        with self._lock:
            entry = self._live.pop(future.key, None)
        if entry is None or self._closed:  # cancelled by us, or the caller has stopped listening
            future.release()
            return
        i = entry[1]
        try:
            if future.status == "finished":
                self._done.put((i, "finished", future.result()))
            else:
                try:
                    exc = future.exception()
                except BaseException as e:  # cancelled (scheduler gone): report, do not hang
                    exc = e
                self._done.put((i, "error", exc))
        except BaseException as e:  # the result could not be fetched
            self._done.put((i, "error", e))
        finally:
            future.release()
            self._pump()

    def results(self) -> Iterator[Any]:
        import queue

        try:
            if not self._outstanding:
                return  # nothing submitted: no need of the cluster, nor of importing distributed
            # wait for the starting cluster (it raises if it failed to start): distributed is fully imported
            # by then. Importing distributed.scheduler while the start-up thread still imports distributed
            # meets half-initialized modules ("cannot import name 'Scheduler' from partially initialized
            # module"), so no distributed import may come before this wait.
            self._ex.client  # noqa: B018
            self._pump()
            from distributed.scheduler import KilledWorker

            while self._outstanding:
                try:
                    i, status, value = self._done.get(timeout=0.2)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                if status == "finished":
                    self._outstanding -= 1
                    yield value
                    continue
                if isinstance(value, KilledWorker) and self._tries[i] < DaskExecutor.LOST_WORKER_RETRIES:
                    with self._lock:
                        self._tries[i] += 1
                        self._waiting.appendleft(i)
                    self._pump()
                    continue
                self._outstanding -= 1
                if self._on_error is None:
                    raise value
                yield self._on_error(self._items[i], value)
        finally:
            self.cancel()

    def drain(self) -> list:
        """The results of tasks that finished but were not yielded yet (after an interrupt), without waiting."""
        import queue

        out = []
        while True:
            try:
                _i, status, value = self._done.get_nowait()
            except queue.Empty:
                return out
            if status == "finished":
                out.append(value)

    def cancel(self) -> None:
        """Drop the tasks not yet started and stop those running (nothing is left on the cluster)."""
        with self._lock:
            self._closed = True
            self._waiting.clear()
            live = [f for f, _ in self._live.values()]
            self._live.clear()
        if live:
            self._ex.client.cancel(live)


def default_workers() -> int:
    """The cores this process may use (respects CPU affinity / cgroup cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


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
                # the local scheduler runs in this process: its event-loop tick (every 20 ms, to detect a
                # blocked loop), the system monitor (every 0.5 s) and work stealing (every 0.1 s; a worker
                # holds one task at a time here, nothing to steal) cost the driver 42 ms of CPU per second of
                # run, 12-13 ms with these (measured idle on 2 workers; docs/SCALING.md)
                "distributed.admin.tick.interval": "1s",
                "distributed.admin.system-monitor.interval": "5s",
                "distributed.scheduler.work-stealing": False,
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
