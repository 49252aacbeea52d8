"""A stage's wall counts the wait for a cluster still starting apart (the rebuild report's ``cluster_start``)."""

from __future__ import annotations

import concurrent.futures
import time

from kneeprep.parallel import DaskExecutor, SerialExecutor


def test_the_wait_for_a_starting_cluster_is_measured_once_and_only_from_the_stage_on():
    starting: concurrent.futures.Future = concurrent.futures.Future()
    ex = DaskExecutor(starting)
    t0 = time.perf_counter()
    time.sleep(0.05)
    assert ex.start_wait(t0) >= 0.05  # still starting: the wait so far
    starting.set_result(object())
    up = ex.start_wait(t0)
    assert up >= 0.05
    time.sleep(0.05)
    assert ex.start_wait(t0) == up  # fixed once the cluster is up
    assert ex.start_wait(time.perf_counter()) == 0.0  # a stage begun after the start waited for nothing
    assert DaskExecutor(object()).start_wait(t0) == 0.0  # a client given ready
    assert SerialExecutor().start_wait(t0) == 0.0
