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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import click


class SerialExecutor:
    """Runs ``map_unordered`` calls in this process, in order (``workers=0``)."""

    def map_unordered(
        self, fn: Callable, items: Sequence, on_error: Callable[[Any, BaseException], Any] | None = None, **kwargs
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
    """Submits one task per item to a ``distributed.Client`` and yields results as they complete."""

    #: times an item whose worker died (``KilledWorker``) is resubmitted on its own before it counts as failed.
    LOST_WORKER_RETRIES = 1

    def __init__(self, client):
        self.client = client

    def map_unordered(
        self, fn: Callable, items: Sequence, on_error: Callable[[Any, BaseException], Any] | None = None, **kwargs
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
    """The executor for a run; closes any cluster it started, also on Ctrl-C."""
    if scheduler and workers is not None and workers != 0:
        # --workers is about the local cluster; with a scheduler the cluster decides
        workers = None
    if not scheduler and workers == 0:
        yield SerialExecutor()
        return
    with dask_client(workers, scheduler) as client:
        yield DaskExecutor(client)


@contextlib.contextmanager
def dask_client(n_workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` if given, else to a new local cluster of processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler, timeout="30s") as client:
            yield client
        return
    import dask

    n = n_workers or default_workers()
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}),
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
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
        file=click.get_text_stream("stderr"),
        item_show_func=(lambda r: item_name(r) if r is not None and item_name else None),
        show_pos=True,
    ) as bar:
        for r in results:
            bar.update(1, r)
            yield r
