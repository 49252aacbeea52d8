"""Where tasks run: a Dask client (local processes by default, or an existing scheduler), or this process.

* ``workers=None`` or ``N >= 1``: a ``LocalCluster`` of ``N`` worker **processes** (default: the number of
  cores), one thread each -- pydicom parsing holds the GIL and GDCM is not thread-safe, and one task per
  process keeps memory per worker to a few volumes.
* ``scheduler="tcp://host:8786"``: connect to a running cluster (dask-jobqueue, Kubernetes ...); the workers
  must see the same paths.
* ``workers=0``: no Dask at all; tasks run one after another in this process (debugging, profiling).

Only small records cross the wire: tasks get paths and recipes, write their outputs themselves, and return a
few hundred bytes.
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

    def map_unordered(self, fn: Callable, items: Sequence, **kwargs) -> Iterator[Any]:
        for item in items:
            yield fn(item, **kwargs)


class DaskExecutor:
    """Submits one task per item to a ``distributed.Client`` and yields results as they complete."""

    def __init__(self, client):
        self.client = client

    def map_unordered(self, fn: Callable, items: Sequence, **kwargs) -> Iterator[Any]:
        from distributed import as_completed

        if not items:
            return
        futures = self.client.map(fn, list(items), pure=False, **kwargs)
        try:
            for future in as_completed(futures):
                yield future.result()
                future.release()
        finally:
            # on an error or Ctrl-C in the caller: stop what has not run yet
            self.client.cancel([f for f in futures if not f.done()])


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
    n = n_workers or default_workers()
    with (
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
