"""The driver imports nothing of distributed while the cluster may still be starting (issue 20, point 3).

A run that submits nothing used to import ``distributed.scheduler`` in ``TaskStream.results()`` while the
background start-up thread was importing ``distributed``: "cannot import name 'Scheduler' from partially
initialized module" in 7 of 12 runs. Reproduced deterministically: the cluster never finishes starting, and
every import the driver makes is recorded."""

from __future__ import annotations

import builtins
import concurrent.futures

from kneeprep.parallel import DaskExecutor


def test_results_without_submissions_neither_waits_for_the_cluster_nor_imports_distributed(monkeypatch):
    starting: concurrent.futures.Future = concurrent.futures.Future()  # a cluster that is still starting
    imported = []
    real = builtins.__import__

    def spy(name, *args, **kwargs):
        imported.append(name)
        return real(name, *args, **kwargs)

    ex = DaskExecutor(starting)
    stream = ex.stream(lambda x: x)
    monkeypatch.setattr(builtins, "__import__", spy)
    assert list(stream.results()) == []  # returns at once: a wait on `starting` would hang here
    monkeypatch.setattr(builtins, "__import__", real)
    assert not [n for n in imported if n.startswith("distributed")]
    assert not starting.done()
    starting.cancel()
