"""A :class:`kneeprep.parallel.TaskStream` with ``max_batch``: a backlog goes out several items a task, and every
item still gets its own result, its own error and, when its worker dies, its own retry (a local cluster)."""

from __future__ import annotations

import os

import pytest

from kneeprep import parallel_stream
from kneeprep.parallel import executor
from kneeprep.parallel_stream import run_batch


@pytest.fixture
def sizes(monkeypatch):
    """The number of items of each task the streams send (recorded in this process)."""
    seen: list[int] = []
    take = parallel_stream.TaskStream._take

    def recording(self, threads):
        items = take(self, threads)
        if items:
            seen.append(len(items))
        return items

    monkeypatch.setattr(parallel_stream.TaskStream, "_take", recording)
    return seen


def test_run_batch_gives_each_item_its_result_or_its_exception():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def fn(item, k):
        if item == 2:
            raise ValueError(f"bad item {item}")
        if item == 3:
            raise Unpicklable("local class")
        return item * k

    out = run_batch(fn, [1, 2, 3, 4], k=10)
    assert [ok for ok, _ in out] == [True, False, False, True]
    assert out[0][1] == 10 and out[3][1] == 40
    assert isinstance(out[1][1], ValueError) and "bad item 2" in str(out[1][1])
    assert isinstance(out[2][1], RuntimeError) and "Unpicklable: local class" in str(out[2][1])


def test_a_backlog_goes_out_in_batches_and_each_item_keeps_its_own_error_and_retry(sizes):
    """20 items on 2 workers, at most 4 a task: fewer tasks than items, the last ones small. An item that raises
    fails alone; the worker process that dies on another takes its batch-mates with it, and they are resubmitted
    on their own and finish; the poisonous item ends as ``on_error`` (after its own retry), and the run ends."""
    poison, raises = 9, 14

    def task(item, scale):
        if item == poison:
            os._exit(17)  # the worker process vanishes mid-batch, as under the OOM killer
        if item == raises:
            raise ValueError(f"item {item} is bad")
        return item * scale

    def lost(item, exc):
        return ("failed", item, type(exc).__name__)

    with executor(workers=2) as ex:
        stream = ex.stream(task, on_error=lost, max_batch=4, scale=3)
        for i in range(20):
            stream.submit(i)
        results = list(stream.results())
    assert len(results) == 20
    done = {r for r in results if isinstance(r, int)}
    assert done == {3 * i for i in range(20) if i not in (poison, raises)}, (results, sizes)
    failed = {r[1]: r[2] for r in results if isinstance(r, tuple)}
    assert failed == {poison: "KilledWorker", raises: "ValueError"}
    assert max(sizes) > 1 and len(sizes) < 20  # fewer tasks than items, the retries of a lost batch included
    assert 1 in sizes  # the last tasks, and the resubmissions, one item each


def test_a_stream_without_max_batch_sends_one_item_a_task(sizes):
    with executor(workers=1) as ex:
        stream = ex.stream(lambda item: item + 1)
        for i in range(8):
            stream.submit(i)
        assert sorted(stream.results()) == list(range(1, 9))
    assert sizes == [1] * 8


@pytest.fixture
def unfetchable(monkeypatch):
    """``Future.result`` in this process raises, as when the worker holding a finished result died before the
    gather, for the results named in ``fail`` (value -> how many times; -1: always); ``tasks`` counts the
    tasks each value came from (only finished tasks reach ``result``)."""
    import collections
    import threading

    from distributed import Future

    fail: dict = {}
    tasks: collections.Counter = collections.Counter()
    lock = threading.Lock()
    result = Future.result

    def flaky(self, *args, **kwargs):
        value = result(self, *args, **kwargs)
        with lock:
            tasks[value] += 1
            if fail.get(value, 0):
                fail[value] -= 1
                raise OSError(f"Couldn't gather the result {value} (its worker died)")
        return value

    monkeypatch.setattr(Future, "result", flaky)
    return fail, tasks


def test_a_finished_task_whose_result_cannot_be_fetched_is_run_again_on_its_own(unfetchable, sizes):
    """A result lost after its task finished is not the item's fault: the item is run again (alone, and even
    when its lost-worker retry is spent, as it is here for 5) and yields its result; a result that can never be
    fetched yields ``on_error`` after one such re-run, and the run ends."""
    fail, tasks = unfetchable
    fail.update({10: 1, 20: -1, 50: 1})  # items 1, 2 and 5 (result = 10 * item)

    def task(item, scale):
        return item * scale

    with executor(workers=2) as ex:
        stream = ex.stream(task, on_error=lambda item, exc: ("failed", item, str(exc)), scale=10)
        for i in range(8):
            stream.submit(i)
        stream._tries[5] = ex.LOST_WORKER_RETRIES  # as after a lost worker: no retry of that kind left
        results = list(stream.results())
    assert sorted(r for r in results if isinstance(r, int)) == [0, 10, 30, 40, 50, 60, 70]
    assert [r[:2] for r in results if isinstance(r, tuple)] == [("failed", 2)]
    assert "Couldn't gather the result 20" in results[[isinstance(r, tuple) for r in results].index(True)][2]
    assert tasks == {0: 1, 10: 2, 20: 2, 30: 1, 40: 1, 50: 2, 60: 1, 70: 1}
    assert sizes == [1] * 11
