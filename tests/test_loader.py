"""ShardDataset: exact partitioning across ranks and workers, deterministic order, resume, a forked DataLoader."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

from kneeprep.loader import ShardDataset


def ids(it):
    return [s["sample_id"] for s in it]


def merged(ds, num_workers, batch_size):
    """What a DataLoader with in-order round-robin over workers would hand out, from per-worker streams."""
    streams = [ids(ds.iter_worker(w, num_workers, batch_size)) for w in range(num_workers)]
    batches = [[s[i : i + batch_size] for i in range(0, len(s), batch_size)] for s in streams]
    out = []
    for i in range(max(len(b) for b in batches)):
        for b in batches:
            if i < len(b):
                out += b[i]
    return out


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(
    "world_size,num_workers,batch_size", [(1, 1, 1), (2, 2, 1), (3, 2, 4), (5, 3, 2), (4, 1, 3)]
)
def test_exact_partitioning(shards, drop_last, world_size, num_workers, batch_size):
    path, train, _ = shards
    n = len(train)
    per_rank = []
    seen = Counter()
    for rank in range(world_size):
        ds = ShardDataset(
            path, seed=3, rank=rank, world_size=world_size, columns=["sample_id"], drop_last=drop_last
        )
        got = [sid for w in range(num_workers) for sid in ids(ds.iter_worker(w, num_workers, batch_size))]
        assert len(got) == len(ds)
        per_rank.append(len(got))
        seen.update(got)
    assert len(set(per_rank)) == 1  # equal counts per rank
    if drop_last:
        assert (
            per_rank[0] == n // world_size
            and set(seen.values()) <= {1}
            and len(seen) == per_rank[0] * world_size
        )
    else:
        assert per_rank[0] == -(-n // world_size)
        assert set(seen) == set(train) and sum(seen.values()) - n == per_rank[0] * world_size - n
        assert max(seen.values()) <= 2


def test_same_seed_same_order_other_epoch_or_seed_differs(shards):
    path, train, _ = shards
    a = ShardDataset(path, seed=1, columns=["sample_id"])
    first = ids(a)
    assert sorted(first) == sorted(train) and first != train
    assert ids(ShardDataset(path, seed=1, columns=["sample_id"])) == first
    a.set_epoch(1)
    second = ids(a)
    assert sorted(second) == sorted(first) and second != first
    assert ids(ShardDataset(path, seed=2, columns=["sample_id"])) != first
    assert ids(ShardDataset(path, shuffle=False, columns=["sample_id"])) == train  # manifest order


def test_buffer_is_bounded(shards):
    path, _, _ = shards
    ds = ShardDataset(path, seed=0, buffer_size=4, columns=["sample_id"])
    plan = ds.epoch_plan()
    order = ds.rank_order()
    for start in range(0, len(order), 4):  # each window is a permutation of the same window of the plan
        assert sorted(map(tuple, order[start : start + 4])) == sorted(map(tuple, plan[start : start + 4]))


def test_resume_in_process_continues_same_order(shards):
    path, _, _ = shards
    ds = ShardDataset(path, seed=5, world_size=2, rank=1)
    ds.set_epoch(3)
    full = ids(ds)
    it = iter(ds)
    head = [next(it)["sample_id"] for _ in range(7)]
    state = pickle.loads(pickle.dumps(ds.state_dict()))
    assert state["epoch"] == 3 and state["consumed"] == 7
    fresh = ShardDataset(path, seed=5, world_size=2, rank=1)
    fresh.load_state_dict(state)
    assert head + ids(fresh) == full
    assert ids(fresh) == full  # the resume point is used once; the next pass is the whole epoch again
    with pytest.raises(ValueError, match="seed"):
        ShardDataset(path, seed=6).load_state_dict(state)


@pytest.mark.parametrize("num_workers,batch_size,consumed", [(2, 2, 4), (3, 2, 10), (2, 4, 0), (2, 3, 15)])
def test_resume_with_workers_continues_same_order(shards, num_workers, batch_size, consumed):
    path, _, _ = shards
    ds = ShardDataset(path, seed=9, columns=["sample_id"])
    full = merged(ds, num_workers, batch_size)
    order = ds.rank_order()
    expect_pos = ShardDataset.loader_order(len(order), num_workers, batch_size)
    sid = {tuple(k): s for k, s in zip(order.tolist(), ids(ds._materialize(order)), strict=True)}
    assert full == [sid[tuple(order[p])] for p in expect_pos]
    ds.load_state_dict(ds.state_dict(consumed=consumed))
    assert merged(ds, num_workers, batch_size) == full[consumed:]


def test_samples_share_one_decoded_volume_per_row_group(shards):
    path, _, data = shards
    ds = ShardDataset(path, seed=0)
    samples = list(ds)
    by_volume = {}
    for s in samples:
        by_volume.setdefault(s["volume_id"], set()).add(id(s["image"]))
        np.testing.assert_array_equal(s["image"], data.volumes[s["volume_id"]][0])
        assert not s["image"].flags.writeable
        assert s["box"] is None or s["box"]["voxels"][3] <= s["image"].shape[0]
        assert {"sample_id", "question", "reasoning", "severity", "box"} <= set(s)
    # one row group per volume here: one decoded array per volume for all its samples
    assert all(len(v) == 1 for v in by_volume.values())


def test_construction_opens_no_files_and_pickles(shards, monkeypatch):
    import pyarrow.parquet as pq

    path, _, _ = shards
    opened = []
    real = pq.ParquetFile.__init__
    monkeypatch.setattr(
        pq.ParquetFile, "__init__", lambda self, *a, **k: (opened.append(a[0]), real(self, *a, **k))[1]
    )
    ds = ShardDataset(path)
    assert opened == []
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == len(ds) == 36
    next(iter(clone))
    assert len(opened) == 1


def test_bad_arguments(shards):
    path, _, _ = shards
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown columns"):
        ShardDataset(path, columns=["nope"])
    with pytest.raises(FileNotFoundError, match="no shards of split"):
        ShardDataset(path, split="nosuch")


def test_forked_worker_processes_without_torch(shards, blosc_shards):
    """Fork safety without torch: a dataset already iterated in the parent (open files, Blosc state) is
    inherited by two forked processes, each reads its worker slice, and together they give the epoch."""
    import multiprocessing

    _, train, data = shards
    ds = ShardDataset(blosc_shards, seed=5, columns=["sample_id", "volume_id", "image"])
    # iterate in the parent first: open files and Blosc state exist before the fork
    parent = {s["sample_id"]: int(s["image"].astype(np.int64).sum()) for s in ds}
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def work(w):
        queue.put(
            (w, [(s["sample_id"], int(s["image"].astype(np.int64).sum())) for s in ds.iter_worker(w, 2, 3)])
        )

    procs = [ctx.Process(target=work, args=(w,)) for w in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [sid for sid, _ in got[0] + got[1]] == ids(ds.iter_worker(0, 2, 3)) + ids(ds.iter_worker(1, 2, 3))
    assert sorted(sid for sid, _ in got[0] + got[1]) == sorted(train)
    assert dict(got[0] + got[1]) == parent  # same decoded volumes in the children as in the parent


def test_blosc_shards_through_a_forked_dataloader(shards, blosc_shards):
    """Blosc volumes (compressed in this process, so Blosc's state predates the fork) decode in the workers."""
    torch = pytest.importorskip("torch")
    import multiprocessing

    from kneeprep.loader.torchdata import make_loader

    _, train, data = shards
    ds = ShardDataset(blosc_shards, seed=2, columns=["sample_id", "volume_id", "image"])
    images = {}
    for s in ds:
        images.setdefault(s["volume_id"], set()).add(id(s["image"]))
        np.testing.assert_array_equal(s["image"], data.volumes[s["volume_id"]][0])
        assert not s["image"].flags.writeable and "image_codec" not in s
    assert all(len(v) == 1 for v in images.values())  # decoded once per volume
    dl = make_loader(
        ds, batch_size=1, num_workers=2, multiprocessing_context=multiprocessing.get_context("fork")
    )
    got = {}
    for b in dl:
        got[b["sample_id"][0]] = int(b["images"][b["image_index"]][0].to(torch.int64).sum())
    assert sorted(got) == sorted(train)
    assert all(v == int(data.volumes[k.rsplit("_", 1)[0]][0].astype(np.int64).sum()) for k, v in got.items())


# through slabs, one batch per message or four; in place from the file
@pytest.mark.parametrize("layout,per", [("lz4", 1), ("lz4", 4), ("none", 4)])
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_torch_dataloader_two_workers_batches_and_resume(
    shards, raw_shards, start_method, layout, per, recwarn
):
    torch = pytest.importorskip("torch")
    import multiprocessing

    from kneeprep.loader.torchdata import make_loader

    path, train, data = shards
    path = raw_shards if layout == "none" else path
    ds = ShardDataset(path, seed=4, columns=["sample_id", "volume_id", "image", "box_voxels"])
    dl = make_loader(
        ds, batch_size=4, num_workers=2, multiprocessing_context=multiprocessing.get_context(start_method),
        batches_per_message=per,
    )  # fmt: skip
    tds = dl.dataset
    got, sizes = [], []
    for batch in dl:
        got += batch["sample_id"]
        sizes.append(len(batch))
        assert batch["images"].dtype == torch.uint16 and batch["image_index"].dtype == torch.int64
        assert len(batch["volumes"]) == len(set(batch["volume_id"]))  # each distinct volume once
        full = batch.image_stack()
        assert full.shape == (len(batch), 6, 20, 24)
        for i, vid in enumerate(batch["volume_id"]):  # bit for bit the stored volume
            np.testing.assert_array_equal(full[i].numpy(), data.volumes[vid][0])
    assert sorted(got) == sorted(train) and len(got) == len(ds) and len(dl) == 9 == len(sizes)
    assert sizes[:-1] == [4] * 8  # batches of 4 whatever the message size; only the last one shorter
    # the order of a sample-level DataLoader handing out 4 * per samples at a time, cut into batches of 4
    assert got == merged(ShardDataset(path, seed=4, columns=["sample_id"]), 2, 4 * per)
    # resume mid-epoch under the same DataLoader setup continues the same order
    tds.load_state_dict(tds.state_dict(consumed=8))
    rest = [sid for batch in dl for sid in batch["sample_id"]]
    assert rest == got[8:]
    # set_epoch reaches the persistent workers: another order, the whole epoch again
    tds.set_epoch(1)
    epoch1 = [sid for batch in dl for sid in batch["sample_id"]]
    assert sorted(epoch1) == sorted(train) and epoch1 != got
    other = ShardDataset(path, seed=4, columns=["sample_id"])
    other.set_epoch(1)
    assert epoch1 == merged(other, 2, 4 * per)
    assert not [w for w in recwarn if "writable" in str(w.message)]  # torch warns on read-only arrays


def test_without_cuda_the_gpu_path_degrades_to_cpu_tensors_without_warnings(shards):
    torch = pytest.importorskip("torch")
    import warnings

    from kneeprep.loader.torchdata import DeviceFeeder, make_loader

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only fallback; the machine has CUDA")
    path, train, data = shards
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        dl = make_loader(ShardDataset(path, seed=0), batch_size=4, num_workers=0)
        assert dl.pin_memory is False
        got = []
        for b in DeviceFeeder(dl, "cuda"):
            assert b["images"].device.type == "cpu"
            moved = b.pin_memory().to("cpu")  # both are no-ops without CUDA
            np.testing.assert_array_equal(moved.image_stack()[0].numpy(), data.volumes[b["volume_id"][0]][0])
            got += b["sample_id"]
    assert sorted(got) == sorted(train)
