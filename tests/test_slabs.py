"""Shared-memory slabs and worker-built batches: exact epochs, volume-major items, recycling, no leaks.

Most of this needs no torch: worker processes are plain ``multiprocessing`` processes sending batches over a
``multiprocessing`` queue (pickled the way a DataLoader's result queue pickles them)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from collections import Counter

import numpy as np
import pytest

from kneeprep.errors import StoreError
from kneeprep.loader import ShardDataset, slabs


def _batches(ds, w, k, b):
    pool = slabs.SlabPool()
    return [wire.receive() for wire in slabs.iter_batches(ds, w, k, b, pool)]


def _sample_ids(batch):
    if batch["volume_major"]:
        return [q["sample_id"] for item in batch["quintuples"] for q in item]
    return list(batch["sample_id"])


@pytest.mark.parametrize("volume_major", [False, True])
@pytest.mark.parametrize("world_size,num_workers,batch_size", [(1, 2, 4), (2, 3, 2), (3, 2, 1)])
def test_batches_cover_the_epoch_exactly_over_ranks_and_workers(
    shards, volume_major, world_size, num_workers, batch_size
):
    path, train, data = shards
    seen = Counter()
    for rank in range(world_size):
        ds = ShardDataset(
            path, seed=7, rank=rank, world_size=world_size, volume_major=volume_major, drop_last=True
        )
        n = 0
        for w in range(num_workers):
            for b in _batches(ds, w, num_workers, batch_size):
                assert 1 <= len(b["image_index"]) <= batch_size
                n += len(b["image_index"])
                assert len(b["volumes"]) == len(set(b["volume_id"]))  # each distinct volume once
                for i, vi in enumerate(b["image_index"].tolist()):  # the right volume, bit for bit
                    vid = b["volume_id"][i]
                    np.testing.assert_array_equal(b["volumes"][vi], data.volumes[vid][0])
                    assert not b["volumes"][vi].flags.writeable
                seen.update(_sample_ids(b))
        assert n == len(ds)
    assert set(seen.values()) == {1}
    if volume_major:  # whole volumes: every sample of the kept items, nothing twice
        assert set(seen) <= set(train)
        ds = ShardDataset(path, volume_major=True)
        assert len(ds) == 12 and sum(len(b["image_index"]) for b in _batches(ds, 0, 1, 5)) == 12
    else:
        assert len(seen) == (len(train) // world_size) * world_size


def test_volume_major_items_seed_epoch_resume(shards):
    path, train, data = shards
    ds = ShardDataset(path, seed=3, volume_major=True, max_questions=2)
    items = list(ds)
    assert len(items) == len(ds) == 24  # 12 volumes x 3 quintuples, cut into items of at most 2
    got = Counter(q["sample_id"] for it in items for q in it["quintuples"])
    assert sorted(got) == sorted(train) and set(got.values()) == {1}
    for it in items:
        assert 1 <= len(it["quintuples"]) <= 2 and {q["volume_id"] for q in it["quintuples"]} == {
            it["volume_id"]
        }
        np.testing.assert_array_equal(it["image"], data.volumes[it["volume_id"]][0])
    order = [tuple(q["sample_id"] for q in it["quintuples"]) for it in items]
    assert [
        tuple(q["sample_id"] for q in it["quintuples"])
        for it in ShardDataset(path, seed=3, volume_major=True, max_questions=2)
    ] == order
    ds.set_epoch(1)
    assert [tuple(q["sample_id"] for q in it["quintuples"]) for it in ds] != order
    ds.set_epoch(0)
    it = iter(ds)
    head = [next(it)["volume_id"] for _ in range(5)]
    fresh = ShardDataset(path, seed=3, volume_major=True, max_questions=2)
    fresh.load_state_dict(ds.state_dict())
    assert head + [x["volume_id"] for x in fresh] == [x["volume_id"] for x in items]
    with pytest.raises(ValueError, match="max_questions"):
        ShardDataset(path, max_questions=2)


def test_a_slab_is_not_reused_while_the_trainer_holds_its_batch(shards):
    path, _, data = shards
    ds = ShardDataset(path, shuffle=False)
    pool = slabs.SlabPool(max_slabs=1, wait_s=0.3)
    gen = slabs.iter_batches(ds, 0, 1, 3, pool)
    first = next(gen).receive()  # one volume (3 quintuples) in the only slab
    held = first["volumes"][0]
    expect = data.volumes[first["volume_id"][0]][0]
    with pytest.raises(RuntimeError, match="all 1 shared-memory slabs"):
        next(gen)  # the next volume needs the slab the trainer still holds
    np.testing.assert_array_equal(held, expect)  # and the held volume was not overwritten
    del first, held
    gc.collect()  # the RuntimeError's traceback (a reference cycle) holds the failed generator's frames
    gen = slabs.iter_batches(ds, 0, 1, 3, pool)
    got = []
    for wire in gen:
        b = wire.receive()
        got.append((b["volume_id"][0], b["volumes"][0].copy()))
        del b  # a loop that keeps the previous batch while asking for the next one needs two slabs
    assert len(got) == 12 and len(pool.slabs) == 1  # released batches free the slab: reused for all 12
    for vid, img in got:
        np.testing.assert_array_equal(img, data.volumes[vid][0])


def _worker(q, ds, w, k, b, finished):
    pool = slabs.SlabPool(max_slabs=3)
    for wire in slabs.iter_batches(ds, w, k, b, pool):
        q.put(wire)
    q.put(("done", w, pool.token, len(pool.slabs)))
    # a sender stays alive until its descriptors are received (as DataLoader workers do): DupFd hands them
    # over from this process
    finished.wait(60)


def _shm():
    """Shared-memory segments by name, without multiprocessing's own semaphores (``sem.*``: the test's queues
    and events, alive while it runs)."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return sorted(n for n in names if not n.startswith("sem."))


def _two_workers(ds, start_method, data, check=None):
    """Two worker processes send ``ds``'s batches (batch 2) over a queue, as a DataLoader's would; every batch
    received is checked against the stored volumes (and by ``check(batch)``). Returns (sample ids, volumes
    received, {worker: its ("done", worker, token, slabs) record})."""
    ctx = multiprocessing.get_context(start_method)
    q = ctx.Queue()
    finished = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(q, ds, w, 2, 2, finished)) for w in range(2)]
    for p in procs:
        p.start()
    got, done, received = [], {}, 0
    while len(done) < 2:
        item = q.get(timeout=60)
        if isinstance(item, tuple):
            done[item[1]] = item
            continue
        received += len(item["volumes"])
        for i, vi in enumerate(item["image_index"].tolist()):
            np.testing.assert_array_equal(item["volumes"][vi], data.volumes[item["volume_id"][i]][0])
        if check is not None:
            check(item)
        got += item["sample_id"]
        del item
    finished.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got, received, done


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_volumes_cross_processes_once_per_slab_and_exactly(blosc_shards, shards, start_method):
    _, train, data = shards
    before = _shm()
    ds = ShardDataset(blosc_shards, seed=1, buffer_size=3)  # a window of one volume's samples
    got, received, done = _two_workers(ds, start_method, data)
    assert sorted(got) == sorted(train)
    for _, _, token, n_slabs in done.values():
        assert len(slabs._MAPPINGS[token]) == n_slabs  # each slab's descriptor crossed once
    assert received > sum(d[3] for d in done.values())  # volumes sent more often than slabs were mapped
    assert _shm() == before


def _in_place(batch):
    for v, key in zip(batch["volumes"], batch["volume_keys"], strict=True):
        assert key[0] == "file" and not v.flags.writeable


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_uncompressed_volumes_cross_as_where_they_lie_in_the_file(raw_shards, shards, start_method):
    _, train, data = shards
    before = _shm()
    files = {str(f.resolve()) for f in raw_shards.rglob("*.parquet")}
    got, _, done = _two_workers(
        ShardDataset(raw_shards, seed=1, buffer_size=3), start_method, data, _in_place
    )
    assert sorted(got) == sorted(train)
    assert all(n_slabs == 0 for *_, n_slabs in done.values())  # no shared memory at all: the page cache
    mapped = [m for m in open("/proc/self/maps").read().splitlines() if m.split()[-1] in files]
    assert mapped and len({m.split()[-1] for m in mapped}) <= slabs.MAX_FILE_MAPS
    assert _shm() == before


def test_a_shard_file_replaced_under_the_loader_is_a_clear_error(raw_shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(raw_shards, copy)
    ds = ShardDataset(copy, shuffle=False)
    pool = slabs.SlabPool()
    wire = next(slabs.iter_batches(ds, 0, 1, 2, pool))
    path = wire.volumes[0][1]
    slabs.release_mappings()
    shutil.copy(path, path + ".new")
    os.replace(path + ".new", path)  # a new file (another inode) under the same name
    with pytest.raises(StoreError, match="replaced while the loader read it"):
        wire.receive()


def test_no_shared_memory_left_after_a_worker_is_killed(shards):
    path, _, data = shards
    before = _shm()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(q, ShardDataset(path, seed=2), 0, 1, 3, ctx.Event()))
    p.start()
    first = q.get(timeout=60)
    vid = first["volume_id"][0]
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=30)
    assert p.exitcode == -signal.SIGKILL
    np.testing.assert_array_equal(first["volumes"][0], data.volumes[vid][0])  # still mapped here
    assert _shm() == before
    del first
    slabs._rebuild(
        f"{os.getpid()}-new", [], None, {}, False, "numpy"
    )  # a new worker drops dead ones' mappings
    assert not any(t.startswith(f"{p.pid}-") for t in slabs._MAPPINGS)


def test_torch_dataloader_worker_killed_mid_epoch_leaves_no_shared_memory(shards):
    pytest.importorskip("torch")
    from kneeprep.loader.torchdata import make_loader

    path, _, _ = shards
    before = _shm()
    dl = make_loader(
        ShardDataset(path, seed=1),
        batch_size=2,
        num_workers=2,
        multiprocessing_context=multiprocessing.get_context("fork"),
        prefetch_factor=1,
    )
    it = iter(dl)
    next(it)
    os.kill(it._workers[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        for _ in it:
            pass
    del it, dl
    assert _shm() == before
