"""ShardDataset over s3:// (moto's S3 server on 127.0.0.1, tests/s3server.py): the same samples as the local
copy, a bounded cache shared by processes that fetches each shard once, corrupted and torn copies never used."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from kneeprep.errors import StoreError
from kneeprep.formats.shard_reader import read_manifest
from kneeprep.loader import ShardDataset
from kneeprep.loader.cache import PARTIAL, ShardCache

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


def ids(it):
    return [s["sample_id"] for s in it]


def fingerprint(samples):
    """Every field of every sample, the image as its bytes: equal lists mean equal samples in equal order."""
    out = []
    for s in samples:
        d = {k: v for k, v in s.items() if k not in ("image", "quintuples")}
        if "image" in s:
            d["image"] = (s["image"].dtype.str, s["image"].shape, s["image"].tobytes())
        if "quintuples" in s:
            d["quintuples"] = [sorted(q.items(), key=str) for q in s["quintuples"]]
        out.append(sorted(d.items(), key=str))
    return out


def merged(ds, num_workers, batch_size):
    streams = [ids(ds.iter_worker(w, num_workers, batch_size)) for w in range(num_workers)]
    batches = [[s[i : i + batch_size] for i in range(0, len(s), batch_size)] for s in streams]
    return [x for i in range(max(map(len, batches))) for b in batches if i < len(b) for x in b[i]]


@pytest.fixture
def s3_shards(shards, s3_bucket):
    """The loader test shards uploaded to a fresh bucket: (url, local path, bucket, manifest, train ids, data)."""
    path, train, data = shards
    url = s3_bucket.url("run/shards")
    s3_bucket.fs.put(f"{path}/", url, recursive=True)
    m = read_manifest(path)
    assert s3_bucket.fs.exists(f"{url}/{m['shards'][0]['path']}")
    return url, path, s3_bucket, m, train, data


def shard_keys(m, split="train"):
    return {f"run/shards/{e['path']}": e["bytes"] for e in m["shards"] if e["split"] == split}


def cache_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def cache_bytes(d: Path) -> int:
    """The bytes the cache holds now; a file the prefetch thread evicts between the listing and its stat is no
    longer held (it made this test fail once with FileNotFoundError)."""
    total = 0
    for p in cache_files(d):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_same_samples_order_partition_and_resume_as_local(s3_shards, tmp_path):
    url, path, b, m, train, _ = s3_shards
    opts = dict(storage_options=b.storage_options, cache_dir=tmp_path / "cache")
    assert read_manifest(url, b.storage_options) == m
    for kw in [
        dict(seed=3),
        dict(seed=3, world_size=3, rank=2, drop_last=True),
        dict(shuffle=False),
        dict(seed=1, volume_major=True, max_questions=2),
    ]:
        local, remote = ShardDataset(path, **kw), ShardDataset(url, **opts, **kw)
        assert len(local) == len(remote) and local.units == remote.units
        assert fingerprint(remote) == fingerprint(local), kw  # every field, image bits, order
        remote.set_epoch(2), local.set_epoch(2)
        assert fingerprint(remote) == fingerprint(local)
    # workers' partitions and a resumed DataLoader-style state
    local, remote = ShardDataset(path, seed=9), ShardDataset(url, **opts, seed=9)
    assert merged(remote, 3, 2) == merged(local, 3, 2)
    for ds in (local, remote):
        ds.load_state_dict(ds.state_dict(consumed=10))
    assert merged(remote, 3, 2) == merged(local, 3, 2)
    remote.set_epoch(0)  # the whole epoch again (the resume point above was used once)
    it = iter(remote)
    head = [next(it)["sample_id"] for _ in range(7)]
    it.close()
    fresh = ShardDataset(url, **opts, seed=9)
    fresh.load_state_dict(remote.state_dict())
    assert head + ids(fresh) == ids(ShardDataset(path, seed=9))
    # row groups by byte range, no cache
    direct = ShardDataset(url, storage_options=b.storage_options, cache_dir=False, seed=4)
    assert fingerprint(direct) == fingerprint(ShardDataset(path, seed=4))


def test_credentials_and_endpoint_from_the_aws_environment(s3_shards, tmp_path, monkeypatch):
    url, path, b, m, train, _ = s3_shards
    for k, v in b.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = ShardDataset(url, seed=0, columns=["sample_id"])
    assert sorted(ids(ds)) == sorted(train)
    cached = [p.name for p in cache_files(tmp_path / "xdg" / "kneeprep" / "shards") if p.suffix == ".parquet"]
    assert sorted(cached) == sorted(f"{e['sha256']}.parquet" for e in m["shards"] if e["split"] == "train")


def test_a_missing_url_or_an_oversized_shard_is_a_clear_error(s3_shards, tmp_path):
    url, path, b, m, _, _ = s3_shards
    with pytest.raises(FileNotFoundError, match=f"{b.url('nothing')}/manifest.json: no manifest"):
        ShardDataset(b.url("nothing"), storage_options=b.storage_options)
    small = ShardDataset(url, storage_options=b.storage_options, cache_dir=tmp_path, cache_bytes=1000)
    with pytest.raises(StoreError, match=r"s3://.*\.parquet: \d+ bytes, more than the shard cache holds"):
        next(iter(small))


def test_cache_stays_under_its_bound_and_evicts_least_recently_used(s3_shards, tmp_path):
    url, path, b, m, train, _ = s3_shards
    sizes = shard_keys(m)
    limit = int(2.5 * max(sizes.values()))
    assert sum(sizes.values()) > limit  # the split does not fit: eviction must happen
    cache = tmp_path / "cache"
    ds = ShardDataset(
        url, storage_options=b.storage_options, cache_dir=cache, cache_bytes=limit, buffer_size=4
    )
    local = ShardDataset(path, buffer_size=4)
    for epoch in range(2):
        ds.set_epoch(epoch), local.set_epoch(epoch)
        got = []
        for s in ds:
            got.append(s)
            assert cache_bytes(cache) <= limit
        assert fingerprint(got) == fingerprint(local)
    fetched = b.fetched_bytes("run/shards/")
    assert set(sizes) <= set(fetched)
    assert sum(fetched[k] for k in sizes) > sum(sizes.values())  # evicted shards came back in epoch 2
    assert len([p for p in cache_files(cache) if p.suffix == ".parquet"]) < len(sizes)


def _read_all(url, opts, cache, queue, tag):
    ds = ShardDataset(url, storage_options=opts, cache_dir=cache, shuffle=False)
    queue.put((tag, [(s["sample_id"], s["image"].tobytes()) for s in ds]))


def test_two_processes_sharing_a_cache_fetch_each_shard_once(s3_shards, tmp_path):
    url, path, b, m, train, _ = s3_shards
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_all, args=(url, b.storage_options, cache, queue, i)) for i in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    want = [(s["sample_id"], s["image"].tobytes()) for s in ShardDataset(path, shuffle=False)]
    assert got[0] == got[1] == want
    sizes = shard_keys(m)
    assert {k: v for k, v in b.fetched_bytes("run/shards/").items() if k in sizes} == sizes  # once, whole


def test_a_corrupted_or_truncated_cached_file_is_refetched(s3_shards, tmp_path):
    url, path, b, m, train, _ = s3_shards
    cache = tmp_path / "cache"
    opts = dict(storage_options=b.storage_options, cache_dir=cache, seed=2)
    want = fingerprint(ShardDataset(path, seed=2))
    assert fingerprint(ShardDataset(url, **opts)) == want
    train_entries = [e for e in m["shards"] if e["split"] == "train"]
    bad, short = (cache / f"{e['sha256']}.parquet" for e in train_entries[:2])
    with open(bad, "r+b") as fh:  # same size, one byte flipped in the middle
        fh.seek(bad.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(short, short.stat().st_size // 2)
    before = b.fetched_bytes("run/shards/")
    assert fingerprint(ShardDataset(url, **opts)) == want
    after = b.fetched_bytes("run/shards/")
    refetched = {k: after[k] - before.get(k, 0) for k in shard_keys(m) if after[k] != before.get(k, 0)}
    assert refetched == {f"run/shards/{e['path']}": e["bytes"] for e in train_entries[:2]}


class _SlowFS:
    """An fsspec filesystem whose files read slowly: a download can be killed half way."""

    def __init__(self, fs):
        self.fs = fs

    def open(self, path, mode="rb", **kw):
        f = self.fs.open(path, mode, **kw)
        real = f.read

        def read(n=-1):
            time.sleep(0.05)
            return real(n)

        f.read = read
        return f


def _slow_download(url, opts, cache):
    import kneeprep.loader.cache as cache_mod
    import kneeprep.loader.remote as remote_mod
    from kneeprep.formats.urls import url_filesystem

    cache_mod.CHUNK = 1024  # many slow reads per shard
    remote_mod.url_filesystem = lambda u, o: (lambda fs, root: (_SlowFS(fs), root))(*url_filesystem(u, o))
    for _ in ShardDataset(url, storage_options=opts, cache_dir=cache, shuffle=False, prefetch=False):
        pass


def test_a_download_killed_half_way_is_never_used(s3_shards, tmp_path):
    url, path, b, m, train, _ = s3_shards
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_slow_download, args=(url, b.storage_options, cache))
    p.start()
    deadline = time.monotonic() + 60
    partial = None
    while time.monotonic() < deadline and p.is_alive():
        partials = [q for q in cache.glob(f".*{PARTIAL}*")] if cache.exists() else []
        if partials:
            partial = partials[0]
            break
        time.sleep(0.01)
    assert partial is not None, "the slow download never started"
    time.sleep(0.3)  # some chunks written, far from all
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=30)
    sha = partial.name.split(".")[1]
    assert partial.exists() and not (cache / f"{sha}.parquet").exists()  # torn: only under a temporary name
    # the next reader neither waits on the dead process's lock nor reads its bytes; its scan clears them
    want = fingerprint(ShardDataset(path, shuffle=False))
    assert (
        fingerprint(ShardDataset(url, storage_options=b.storage_options, cache_dir=cache, shuffle=False))
        == want
    )
    assert not [q for q in cache.iterdir() if PARTIAL in q.name]


def test_memory_urls(shards, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    path, train, _ = shards
    mem = fsspec.filesystem("memory")
    mem.put(f"{path}/", "/kneeprep-test/shards", recursive=True)
    try:
        ds = ShardDataset("memory://kneeprep-test/shards", seed=1, cache_dir=tmp_path)
        assert fingerprint(ds) == fingerprint(ShardDataset(path, seed=1))
        assert fingerprint(ShardDataset(f"file://{path}", seed=1)) == fingerprint(ds)
    finally:
        mem.rm("/kneeprep-test", recursive=True)


def test_cache_arguments():
    with pytest.raises(ValueError, match="cache_bytes"):
        ShardCache("/tmp", cache_bytes=0)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_torch_dataloader_two_workers_over_s3(s3_shards, tmp_path, start_method):
    torch = pytest.importorskip("torch")
    from kneeprep.loader.torchdata import make_loader

    url, path, b, m, train, data = s3_shards
    ds = ShardDataset(
        url,
        seed=4,
        columns=["sample_id", "volume_id", "image"],
        storage_options=b.storage_options,
        cache_dir=tmp_path / "cache",
    )
    dl = make_loader(
        ds, batch_size=4, num_workers=2, multiprocessing_context=multiprocessing.get_context(start_method)
    )
    got = []
    for batch in dl:
        got += batch["sample_id"]
        full = batch.image_stack()
        for i, vid in enumerate(batch["volume_id"]):
            np.testing.assert_array_equal(full[i].numpy(), data.volumes[vid][0])
        assert full.dtype == torch.uint16
    assert got == merged(ShardDataset(path, seed=4, columns=["sample_id"]), 2, 4 * 4)  # 4 batches per message
    sizes = shard_keys(m)
    assert {k: v for k, v in b.fetched_bytes("run/shards/").items() if k in sizes} == sizes  # shared cache


def test_a_file_in_use_is_never_evicted_and_prefetch_does_not_wait(s3_shards, tmp_path):
    from kneeprep.loader.remote import Remote

    url, path, b, m, _, _ = s3_shards
    train = [e for e in m["shards"] if e["split"] == "train"]
    remote = Remote(url, b.storage_options, tmp_path, None, True, {e["path"]: e for e in train})
    a, c = remote.source(train[0]["path"]), remote.source(train[1]["path"])
    cache = ShardCache(tmp_path, cache_bytes=max(a.size, c.size) + 100, wait_s=0.5)
    lease = cache.acquire(a)
    assert lease.path.stat().st_size == a.size
    assert cache.prefetch(c) is False  # no room while `a` is in use: skipped, nothing left behind
    assert not [p for p in tmp_path.iterdir() if PARTIAL in p.name] and lease.path.exists()
    with pytest.raises(StoreError, match=r"no room for s3://.*: \d+ bytes are shards in use"):
        cache.acquire(c)
    assert lease.path.exists() and not cache.path_for(c.sha256).exists()
    lease.release()
    assert cache.prefetch(c) is True and cache.evicted == 1  # now `a` could go
    assert not cache.path_for(a.sha256).exists() and cache.size() <= cache.cache_bytes
