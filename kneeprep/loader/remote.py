"""Reading the shards of a URL (``s3://bucket/prefix``, ``memory://...``) for :class:`ShardDataset`.

The training access pattern is whole shards in order: a worker's part of an epoch is a contiguous run of the
plan, which goes shard by shard (rows shuffled inside each shard's row groups and the buffer window). So each
shard a process needs is **fetched whole into the local cache** (:mod:`kneeprep.loader.cache`: bounded,
shared by the processes of a node, verified against the manifest) by ranged GETs of 8 MiB, then read
memory-mapped like a local file; while it is consumed a background thread **prefetches the next shard** of the
same iteration. A shard leaves use (and may be evicted) as soon as the iteration has read its last row group.

``cache_dir=False`` reads row groups straight from the object store instead (pyarrow on an fsspec file: the
footer, then only the column chunks of the row groups read, by byte range): no local copy, no prefetch,
checked by size only -- for a single pass over a subset, or where no local disk is available.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from kneeprep.errors import StoreError, ValidationError
from kneeprep.formats.urls import join, url_filesystem
from kneeprep.loader.cache import CHUNK, Lease, ShardCache, Source


@dataclass(frozen=True)
class Remote:
    """Where and how a :class:`ShardDataset` reads remote shards (picklable: no open filesystem)."""

    url: str
    storage_options: dict[str, Any] | None = None
    cache_dir: str | os.PathLike | None | bool = None
    cache_bytes: int | None = None
    prefetch: bool = True
    entries: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.cache_dir is True:
            raise ValueError("cache_dir is a folder, None (the default folder) or False (no cache)")
        if self.cache_dir is not False:
            bad = [r for r, e in self.entries.items() if not e.get("sha256") or e.get("bytes") is None]
            if bad:
                raise ValidationError(
                    f"{join(self.url, bad[0])}: the manifest gives no bytes/sha256 to check it"
                )
            ShardCache(self.cache_dir, self.cache_bytes)  # argument errors now, not in a worker

    def source(self, rel: str) -> Source:
        fs, root = url_filesystem(self.url, self.storage_options)  # fsspec reuses instances, per process
        e = self.entries[rel]
        return Source(fs, join(root, rel), join(self.url, rel), int(e["bytes"]), e["sha256"])

    def open_direct(self, rel: str) -> pq.ParquetFile:
        """The shard read by byte ranges straight from the object store (no cache)."""
        src = self.source(rel)
        try:
            fh = src.fs.open(src.path, "rb", block_size=CHUNK, cache_type="none")
        except FileNotFoundError:
            raise StoreError(f"{src.url}: listed in the manifest but not found") from None
        except Exception as e:  # botocore/aiohttp errors are not all OSErrors
            raise StoreError(f"{src.url}: could not read: {e}") from e
        if fh.size != src.size:
            fh.close()
            raise ValidationError(f"{src.url}: {fh.size} bytes, the manifest says {src.size}")
        return pq.ParquetFile(fh, pre_buffer=True)

    def reader(self, rels: list[str]) -> RemoteShards:
        """Shard files for one iteration that reads one row group per entry of ``rels``, in that order."""
        return RemoteShards(self, rels)


class RemoteShards:
    """The open shards of one iteration: :meth:`open` a shard, :meth:`unit_done` after each row group read;
    a shard is released when its last row group is done, and the next one is prefetched when one opens."""

    def __init__(self, remote: Remote, rels: list[str]):
        self.remote = remote
        self.cache = None if remote.cache_dir is False else ShardCache(remote.cache_dir, remote.cache_bytes)
        self._left = Counter(rels)
        self._order = list(dict.fromkeys(rels))
        self._next = {a: b for a, b in zip(self._order, self._order[1:], strict=False)}
        self._files: dict[str, pq.ParquetFile] = {}
        self._leases: dict[str, Lease] = {}
        self._pool = ThreadPoolExecutor(1, "kneeprep-prefetch") if self.cache and remote.prefetch else None

    def open(self, rel: str) -> pq.ParquetFile:
        if rel in self._files:
            return self._files[rel]
        if self.cache is None:
            pf = self.remote.open_direct(rel)
        else:
            lease = self.cache.acquire(self.remote.source(rel))
            self._leases[rel] = lease
            pf = pq.ParquetFile(lease.path, memory_map=True)
            nxt = self._next.get(rel)
            if self._pool is not None and nxt is not None and nxt not in self._files:
                self._pool.submit(self.cache.prefetch, self.remote.source(nxt))  # errors resurface on use
        self._files[rel] = pf
        return pf

    def unit_done(self, rel: str) -> None:
        self._left[rel] -= 1
        if self._left[rel] == 0:
            self._close(rel)

    def _close(self, rel: str) -> None:
        pf = self._files.pop(rel, None)
        if pf is not None:
            pf.close()
        lease = self._leases.pop(rel, None)
        if lease is not None:
            lease.release()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for rel in list(self._files):
            self._close(rel)
