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
(``KilledWorker``). :meth:`DaskExecutor.map_unordered` then resubmits the item once on its own (it may only
have been a bystander on the dying worker) and, if it is lost again or fails in another way, yields
``on_error(item, exception)`` -- a failure record -- instead of raising: one poisonous series never aborts a
run, and the run always ends. The local cluster uses ``allowed-failures = 1`` and ``worker-saturation = 1.0``
(a worker holds one task at a time, so a dying worker takes no innocent queued task with it); on an existing
cluster these are the scheduler's settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import click


class SerialExecutor:
    """Runs ``map_unordered`` calls in this process, in order (``workers=0``)."""

    def map_unordered(
        self,
        fn: Callable,
        items: Sequence,
        on_error: Callable[[Any, BaseException], Any] | None = None,
        **kwargs,
    ) -> Iterator[Any]:
        for item in items:
            try:
                result = fn(item, **kwargs)
            except Exception as e:
                if on_error is None:
                    raise
                result = on_error(item, e)
            yield result


class DaskExecutor:
    """Submits one task per item to a ``distributed.Client`` and yields results as they complete.

    ``client`` is a ``distributed.Client`` or a zero-argument callable returning one (a cluster still starting
    in the background: the first ``map_unordered`` waits for it)."""

    #: times an item whose worker died (``KilledWorker``) is resubmitted on its own before it counts as failed.
    LOST_WORKER_RETRIES = 1

    def __init__(self, client):
        self._client = client

    @property
    def client(self):
        if not hasattr(self._client, "submit"):  # still starting: wait for it
            self._client = self._client()
        return self._client

    def map_unordered(
        self,
        fn: Callable,
        items: Sequence,
        on_error: Callable[[Any, BaseException], Any] | None = None,
        **kwargs,
    ) -> Iterator[Any]:
        """Yield ``fn(item, **kwargs)`` for every item, in completion order.

        A task that raises, or whose worker died, yields ``on_error(item, exception)`` when ``on_error`` is
        given (after :data:`LOST_WORKER_RETRIES` resubmissions for a lost worker), else the exception is raised.
        """
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        items = list(items)
        if not items:
            return
        futures = self.client.map(fn, items, pure=False, **kwargs)
        item_of = {f.key: i for i, f in enumerate(futures)}
        tries = dict.fromkeys(range(len(items)), 0)
        live = set(futures)
        pending = as_completed(futures)
        try:
            for future in pending:
                live.discard(future)
                i = item_of.pop(future.key)
                if future.status == "finished":
                    result = future.result()
                    future.release()
                    yield result
                    continue
                try:
                    exc = future.exception()
                except BaseException as e:  # cancelled (scheduler gone): report, do not hang
                    exc = e
                future.release()
                if isinstance(exc, KilledWorker) and tries[i] < self.LOST_WORKER_RETRIES:
                    tries[i] += 1
                    (retry,) = self.client.map(fn, [items[i]], pure=False, **kwargs)
                    item_of[retry.key] = i
                    live.add(retry)
                    pending.add(retry)
                    continue
                if on_error is None:
                    raise exc
                yield on_error(items[i], exc)
        finally:
            # on an error or Ctrl-C in the caller: stop what has not run yet
            self.client.cancel([f for f in live if not f.done()])


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
        from .store import CODEC_THREADS_ENV as env

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
            yield DaskExecutor(starting.result)
        finally:
            # a cluster cannot be stopped half-started: wait for the start, then close whatever it opened
            with contextlib.suppress(BaseException):
                starting.result()
            stack.close()


#: glibc malloc settings for local worker processes. Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` (return freed
#: memory to the OS early), which also freezes glibc's mmap threshold at 128 KiB: every multi-MiB buffer of
#: a volume's read, mask and chunk encoding is then a fresh ``mmap`` whose pages fault in one by one, and a
#: series converts about 2x slower than in a plain process (``write_volume`` 0.50-0.56 s against 0.21-0.30 s
#: in-process, measured). Raising the mmap threshold to 16 MiB keeps those buffers on the heap (reused
#: without faults) while whole volumes (45 MB) are still mapped and returned to the OS when freed.
#: Workers of an existing cluster (``--scheduler``) get what their own start-up gave them (docs/SCALING.md).
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": 65536, "MALLOC_MMAP_THRESHOLD_": 16 * 2**20}


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
    # cores a worker may use for its own threads (Blosc chunk compression, kneeprep.store.codec_threads)
    from .store import CODEC_THREADS_ENV

    environ = {**WORKER_MALLOC_ENV, CODEC_THREADS_ENV: max(1, default_workers() // n)}
    with (
        dask.config.set(
            {
                "distributed.scheduler.allowed-failures": 1,
                "distributed.scheduler.worker-saturation": 1.0,
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


def progress_iter(
    results: Iterable[Any], total: int, label: str, enabled: bool = True, item_name=None
) -> Iterator[Any]:
    """Wrap an iterator of completed results in a click progress bar on stderr (nothing when disabled)."""
    if not enabled or total == 0:
        yield from results
        return
    with click.progressbar(
        length=total,
        label=label,
        file=sys.stderr,
        item_show_func=(lambda r: item_name(r) if r is not None and item_name else None),
        show_pos=True,
    ) as bar:
        for r in results:
            bar.update(1, r)
            yield r
