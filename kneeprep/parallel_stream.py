"""The :class:`TaskStream` behind :class:`kneeprep.parallel.DaskExecutor`: tasks submitted one at a time (also
while results come in), at most one per worker thread on the cluster, results in completion order, and an item
whose worker died resubmitted once on its own before it yields ``on_error(item, exception)``
(:mod:`kneeprep.parallel`, "Lost workers"). With ``max_batch > 1`` a backlog goes out several items a task
(:func:`run_batch`), so the client and the scheduler handle fewer tasks per item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the executor imports this module
    from kneeprep.parallel import DaskExecutor

log = logging.getLogger(__name__)


class TaskStream:
    """Tasks submitted one at a time and their results in completion order.

    :meth:`submit` may be called before and while :meth:`results` is iterated: a caller submits work as it
    discovers it (and more as results come in); :meth:`results` ends when every task submitted so far has given
    its result. The stream keeps at most as many tasks on the cluster as it has worker threads (the rest wait
    here, in submission order), so a worker holds one task at a time and a dying worker takes no innocent
    queued task with it. With ``max_batch > 1``, while more items wait than two tasks per worker thread need,
    a task takes up to ``max_batch`` of them (:func:`run_batch`; each item still yields its own result or
    error): a dying worker then takes its batch-mates with it, and each is resubmitted on its own, as a lost
    item always is. A finished task's result is fetched and released at once, from a callback thread,
    so a worker lost later does not make the cluster recompute it. Error handling as
    :meth:`DaskExecutor.map_unordered`. Leaving :meth:`results` early (an error or Ctrl-C in the caller)
    cancels every task not yet finished and drops those not yet started."""

    #: seconds between two asks of the scheduler for the number of worker threads
    LIMIT_REFRESH_S = 1.0

    def __init__(self, executor: DaskExecutor, fn: Callable, on_error, kwargs: dict, max_batch: int = 1):
        import collections
        import queue
        import threading

        self._ex, self._fn, self._on_error, self._kwargs = executor, fn, on_error, kwargs
        self._max_batch = max(1, int(max_batch))
        self._lock = threading.RLock()
        self._items: list = []
        self._tries: list[int] = []  # per item: resubmissions after a lost worker
        self._refetched: set[int] = set()  # items run again because a finished result could not be fetched
        self._waiting: collections.deque[int] = collections.deque()
        self._live: dict = {}  # future key -> (future, the indices of its items)
        self._done: queue.Queue = queue.Queue()  # (item index, "finished" | "error" | "unfetched", value)
        self._outstanding = 0  # submitted items whose result has not been yielded
        self._limit = (-1e9, 1)  # (when asked, worker threads)
        self._closed = False
        self._source: Callable[[], Any] | None = None  # feed(): items pulled when a slot is free
        if not executor.ready:
            executor.when_ready(self._pump)

    def submit(self, item) -> None:
        with self._lock:
            self._items.append(item)
            self._tries.append(0)
            self._waiting.append(len(self._items) - 1)
            self._outstanding += 1
        self._pump()

    def feed(self, source: Callable[[], Any]) -> None:
        """Pull items from ``source()`` whenever a worker thread is free and no submitted item waits
        (``None``: no more). The caller can size each item from the results it has seen so far; an item is
        pulled only when it can start, so it is sized as late as possible."""
        with self._lock:
            self._source = source
        self._pump()

    def _pull(self) -> bool:  # under the lock: one more item from the source into the waiting queue
        item = self._source() if self._source is not None else None
        if item is None:
            self._source = None
            return False
        self._items.append(item)
        self._tries.append(0)
        self._waiting.append(len(self._items) - 1)
        self._outstanding += 1
        return True

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

    def _first_run(self, i: int) -> bool:
        return not self._tries[i] and i not in self._refetched

    def _take(self, threads: int) -> list[int]:
        """Under the lock: the items of the next task. One, unless a backlog waits: then up to ``max_batch``,
        so that what waits still makes at least two tasks per worker thread (the last tasks stay small); an
        item resubmitted after a lost worker (or a lost result) always goes alone."""
        if not self._waiting and not self._pull():
            return []
        items = [self._waiting.popleft()]
        if self._max_batch > 1 and self._first_run(items[0]):
            size = min(self._max_batch, (len(self._waiting) + 1) // (2 * threads))
            while len(items) < size and self._waiting and self._first_run(self._waiting[0]):
                items.append(self._waiting.popleft())
        return items

    def _pump(self) -> None:
        if not self._ex.ready:  # submitted while the cluster starts: sent when it is up
            return
        with self._lock:
            while not self._closed and len(self._live) < (threads := self._threads()):
                items = self._take(threads)
                if not items:
                    break
                if len(items) == 1:
                    future = self._ex.client.submit(
                        self._fn, self._items[items[0]], pure=False, **self._kwargs
                    )
                else:
                    import uuid

                    future = self._ex.client.submit(
                        run_batch, self._fn, [self._items[i] for i in items], pure=False,
                        key=f"{getattr(self._fn, '__name__', 'task')}-x{len(items)}-{uuid.uuid4().hex}",
                        **self._kwargs,
                    )  # fmt: skip
                self._live[future.key] = (future, items)
                future.add_done_callback(self._finished)

    def _finished(self, future) -> None:  # runs in distributed's callback thread
        with self._lock:
            entry = self._live.pop(future.key, None)
        if entry is None or self._closed:  # cancelled by us, or the caller has stopped listening
            future.release()
            return
        items = entry[1]
        self._pump()  # the slot is free: before the result is queued, so an item pulled counts as outstanding
        try:
            if future.status == "finished":
                try:
                    value = future.result()
                except BaseException as e:
                    # the task finished but its result could not be fetched (its worker died before the
                    # gather, "Couldn't gather ... keys"): the items are not at fault, so each is run again
                    # on its own (results), apart from the lost-worker retries
                    for i in items:
                        self._done.put((i, "unfetched", e))
                    return
                if len(items) == 1:
                    self._done.put((items[0], "finished", value))
                else:  # run_batch: (ok, result or exception) per item
                    for i, (ok, v) in zip(items, value, strict=True):
                        self._done.put((i, "finished" if ok else "error", v))
            else:
                try:
                    exc = future.exception()
                except BaseException as e:  # cancelled (scheduler gone): report, do not hang
                    exc = e
                for i in items:  # a lost worker's batch: each item is resubmitted on its own (results)
                    self._done.put((i, "error", exc))
        except BaseException as e:  # a batch's result not as run_batch gives it
            for i in items:
                self._done.put((i, "error", e))
        finally:
            future.release()

    def results(self) -> Iterator[Any]:
        import queue

        try:
            if not self._outstanding and self._source is None:
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
                    with self._lock:
                        self._outstanding -= 1
                    yield value
                    continue
                refetch = status == "unfetched" and i not in self._refetched
                lost = isinstance(value, KilledWorker) and self._tries[i] < self._ex.LOST_WORKER_RETRIES
                if refetch or lost:
                    with self._lock:
                        if refetch:
                            self._refetched.add(i)
                        else:
                            self._tries[i] += 1
                        self._waiting.appendleft(i)
                        # a worker is gone: ask the scheduler again now, not up to LIMIT_REFRESH_S later, so
                        # the retry does not queue behind another task on the one worker left
                        self._limit = (float("-inf"), self._limit[1])
                    self._pump()
                    continue
                with self._lock:
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
            self._source = None  # nothing more is pulled from a feed
            self._waiting.clear()
            live = [f for f, _ in self._live.values()]
            self._live.clear()
        if live:
            self._ex.client.cancel(live)


def run_batch(fn: Callable, items: list, **kwargs) -> list[tuple[bool, Any]]:
    """The task of several items (:class:`TaskStream` with ``max_batch > 1``): ``fn(item, **kwargs)`` for each,
    in order, as ``(True, result)`` or ``(False, exception)``, so an item that raises fails alone, as it would
    in a task of its own (an exception that cannot be pickled is sent as a ``RuntimeError`` naming it)."""
    import pickle

    out: list[tuple[bool, Any]] = []
    for item in items:
        try:
            out.append((True, fn(item, **kwargs)))
        except Exception as e:
            try:
                pickle.dumps(e)
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            out.append((False, e))
    return out
