"""Shared-memory slabs: how a decoded volume crosses from a loader worker to the training process once.

A loader worker decodes each volume straight into a *slab* -- an anonymous shared-memory file
(``memfd_create``; an unlinked temporary file where the OS has none) mapped in the worker -- and sends the
training process a small *descriptor* per batch: which slabs, which generation, shape, dtype, and for each
sample the index of its volume. The first batch that uses a slab also carries its file descriptor (passed
over a Unix socket by :class:`multiprocessing.reduction.DupFd`, the mechanism torch uses for its own shared
tensors); the training process maps it once and keeps the mapping while that worker lives. A volume used by
20 batches is decoded once, copied nowhere, and mapped once.

**Recycling.** Each slab starts with a 64-byte header whose first int64 counts the batches the training
process has *released*: every volume array handed to the trainer is a zero-copy view whose base is a small
lease object, and when the last view of it is garbage collected the lease adds one to the counter. The worker
counts the batches it *sent* per slab; a slab is free for the next volume when the worker no longer holds its
volume and ``released == sent``. So a slab is never overwritten while any array of the trainer still points
into it, however long the trainer keeps a batch.

**Memory** is bounded by the pool: a worker keeps the slabs of the volumes it still needs (those with samples
left in its shuffle window -- the same volumes a worker held before slabs existed) plus at most ``max_slabs``
others (default 16: free, or in batches on their way to or held by the trainer), each sized to the largest
volume it held (47 MB for a 160x384x384 uint16 DESS volume). The pool grows to its peak once and is reused
from then on (no allocation or page faulting per volume). A worker that needs a slab while ``max_slabs`` are
in the trainer's hands waits up to ``wait_s`` seconds for one to be released, then raises a ``RuntimeError``
that says so (a training loop that keeps many batches alive needs a larger ``max_slabs``). The training
process maps the same pages: no second copy.

**No leaks.** Slabs have no name in ``/dev/shm`` or on disk: their memory belongs to the open descriptors and
mappings and returns to the system when the last process holding one exits -- after a normal exit, Ctrl-C or
SIGKILL of any process alike. The training process drops the mappings of workers that have exited when the
next worker registers (:func:`release_mappings` drops them all).

**Uncompressed shards need no slab.** Where a shard's image chunk is stored uncompressed (the ``none`` layout),
the volume's bytes lie verbatim in the shard file (:mod:`kneeprep.formats.raw_pages` finds them): the worker
sends only *where* -- the file's path, its (device, inode) and the offset -- and the training process maps
the file itself (private, copy-on-write: the file never changes) and takes the volume from the page cache.
No copy anywhere, no shared memory, nothing to recycle; the training process keeps its last
:data:`MAX_FILE_MAPS` shard files mapped (virtual memory; the pages are the kernel's page cache, reclaimable,
shared with the workers). A file replaced under the same name while it is read (another ``kneeprep shards``
run into the same folder) is a clear ``StoreError``, not wrong data.

This module is the workers' side; :mod:`kneeprep.loader.receiver` the training process's (its names are
re-exported here). Neither needs torch: :mod:`kneeprep.loader.torchdata` turns the received arrays into tensors.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.reduction import DupFd
from typing import Any

import numpy as np

from kneeprep.loader.receiver import (  # noqa: F401 - the receiving side's names, re-exported
    _FILE_MAPS,
    _MAPPINGS,
    _RECEIVER_LOCK,
    HEADER,
    MAX_FILE_MAPS,
    _rebuild,
    register_finisher,
    release_mappings,
)

DEFAULT_MAX_SLABS = 16
DEFAULT_WAIT_S = 60.0


def _shared_fd(nbytes: int) -> int:
    """A file descriptor of ``nbytes`` of anonymous shared memory (no name anywhere to leak)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("kneeprep-slab", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS and others: an unlinked temporary file
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    try:
        os.ftruncate(fd, nbytes)
    except OSError:
        os.close(fd)
        raise
    return fd


class SlabArray(np.ndarray):
    """A volume decoded into a slab (worker side): a plain array that knows its slab."""

    slab_id: int
    generation: int


class FileArray(np.ndarray):
    """A raw volume that lies in a memory-mapped shard file (worker side): sent as *where* it lies."""

    file_path: str
    file_key: tuple[int, int]
    file_offset: int


class _Slab:
    def __init__(self, slab_id: int, capacity: int):
        self.id = slab_id
        self.capacity = capacity
        self.fd = _shared_fd(HEADER + capacity)
        self.map = mmap.mmap(self.fd, HEADER + capacity)
        self.released = np.frombuffer(self.map, np.int64, count=1)
        self.sent = 0
        self.generation = 0
        self.holder: weakref.ref | None = None  # the worker's volume array in this slab

    def free(self) -> bool:
        return (self.holder is None or self.holder() is None) and int(self.released[0]) == self.sent

    def close(self) -> None:
        self.released = None  # type: ignore[assignment]
        try:
            self.map.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            pass
        os.close(self.fd)


class SlabPool:
    """The worker side: slabs to decode volumes into, and the batches that describe them.

    One pool per worker process (:func:`worker_pool`). ``alloc`` is a
    :data:`kneeprep.formats.shard_reader.VolumeAllocator`; :meth:`batch` turns samples whose images came from ``alloc``
    into a :class:`WireBatch`.
    """

    def __init__(self, max_slabs: int = DEFAULT_MAX_SLABS, wait_s: float = DEFAULT_WAIT_S):
        if max_slabs < 1:
            raise ValueError(f"max_slabs must be >= 1, got {max_slabs}")
        self.max_slabs, self.wait_s = max_slabs, wait_s
        self.pid = os.getpid()
        self.token = f"{self.pid}-{secrets.token_hex(6)}"
        self.slabs: dict[int, _Slab] = {}
        self._next_id = 0
        self._announced: set[int] = set()
        self._lock = threading.Lock()

    # -- slabs ---------------------------------------------------------------------------------------------

    def alloc(self, volume_id: str, shape: tuple, dtype: np.dtype) -> SlabArray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        slab = self._take(nbytes)
        slab.generation += 1
        base = np.frombuffer(slab.map, np.uint8, count=nbytes, offset=HEADER)
        arr = base.view(dtype).reshape(shape).view(SlabArray)
        arr.slab_id, arr.generation = slab.id, slab.generation
        slab.holder = weakref.ref(arr)
        return arr

    def _take(self, nbytes: int) -> _Slab:
        deadline = None
        while True:
            with self._lock:
                free = [s for s in self.slabs.values() if s.free()]
                fits = [s for s in free if s.capacity >= nbytes]
                if fits:
                    return min(fits, key=lambda s: s.capacity)
                # volumes the worker itself still holds (its shuffle window) never count against the bound:
                # waiting for them would wait for ourselves; max_slabs bounds the rest (free, or in batches)
                mine = sum(1 for s in self.slabs.values() if s.holder is not None and s.holder() is not None)
                if len(self.slabs) - mine < self.max_slabs:
                    return self._new(nbytes)
                if free:  # all free ones too small: replace one with a bigger slab
                    old = free[0]
                    del self.slabs[old.id]
                    self._announced.discard(old.id)
                    old.close()
                    return self._new(nbytes)
            if deadline is None:
                deadline = time.monotonic() + self.wait_s
            elif time.monotonic() > deadline:
                raise RuntimeError(
                    f"kneeprep loader worker {self.pid}: all {self.max_slabs} shared-memory slabs still hold "
                    f"volumes of batches alive in the training process after {self.wait_s:.0f} s; release "
                    "batches sooner or pass a larger max_slabs"
                )
            time.sleep(0.0005)

    def view(self, volume_id: str, mapped, offset: int, shape: tuple, dtype: np.dtype) -> FileArray:
        """A raw volume in a mapped shard file (:data:`kneeprep.formats.shard_reader.VolumeViewer`): no slab,
        no copy; the training process maps the same file and takes the same bytes from its page cache."""
        count = math.prod(shape)
        arr = np.frombuffer(mapped.map, np.dtype(dtype), count=count, offset=offset).reshape(shape)
        arr = arr.view(FileArray)
        arr.file_path, arr.file_key, arr.file_offset = mapped.path, mapped.key, offset
        return arr

    def _new(self, nbytes: int) -> _Slab:
        slab = _Slab(self._next_id, nbytes)
        self._next_id += 1
        self.slabs[slab.id] = slab
        return slab

    # -- batches -------------------------------------------------------------------------------------------

    def batch(
        self, records: list[dict[str, Any]], volume_major: bool = False, finish: str = "numpy"
    ) -> WireBatch:
        """A batch of samples (or volume-major items) whose ``image`` arrays are slab arrays of this pool.

        Each distinct volume is listed once; ``image_index[i]`` is record ``i``'s volume. The slabs count
        this batch as sent before it leaves, so none is reused until the trainer releases the batch.
        """
        vols: list[
            tuple
        ] = []  # ("s", slab id, generation, shape, dtype) or ("f", path, key, offset, shape, dtype)
        where: dict[tuple, int] = {}
        index: list[int] = []
        fields: dict[str, list] = {k: [] for k in records[0] if k != "image"} if records else {}
        for r in records:
            for k in fields:
                fields[k].append(r.get(k))
            img = r.get("image")
            if img is None:
                continue
            if isinstance(img, FileArray):
                key: tuple = ("f", img.file_key, img.file_offset)
                entry: tuple = ("f", img.file_path, img.file_key, img.file_offset, img.shape, img.dtype.str)
            elif isinstance(img, SlabArray):
                key = ("s", img.slab_id, img.generation)
                entry = ("s", img.slab_id, img.generation, img.shape, img.dtype.str)
            else:
                raise TypeError("batch() needs images from this pool's alloc or view")
            if key not in where:
                where[key] = len(vols)
                vols.append(entry)
            index.append(where[key])
        with self._lock:
            for v in vols:
                if v[0] == "s":
                    self.slabs[v[1]].sent += 1
        return WireBatch(self, vols, index if vols else None, fields, volume_major, finish)


@dataclass
class WireBatch:
    """What a worker sends: descriptors of slabs and the batch's other fields. Pickled (by the DataLoader's
    result queue), it carries the file descriptor of each slab the receiver has not seen yet; unpickled, it
    becomes the batch (:func:`receive`)."""

    pool: SlabPool
    volumes: list[
        tuple
    ]  # ("s", slab id, generation, shape, dtype) or ("f", path, (dev, inode), offset, shape, dtype)
    image_index: list[int] | None
    fields: dict[str, list]
    volume_major: bool = False
    finish: str = "numpy"  # "numpy" or "torch": what the receiver builds

    def __reduce__(self):
        pool = self.pool
        slabs = []
        with pool._lock:
            for v in self.volumes:
                if v[0] == "f":
                    slabs.append(v)
                    continue
                _, sid, gen, shape, dtype = v
                s = pool.slabs[sid]
                fd = None
                if sid not in pool._announced:
                    fd = DupFd(s.fd)
                    pool._announced.add(sid)
                slabs.append(("s", sid, gen, tuple(shape), dtype, HEADER + s.capacity, fd))
        return _rebuild, (
            pool.token,
            slabs,
            self.image_index,
            self.fields,
            self.volume_major,
            self.finish,
        )

    def receive(self) -> Any:
        """The batch in this process (no pickling: a DataLoader without workers)."""
        pool = self.pool
        with _RECEIVER_LOCK:
            maps = _MAPPINGS.setdefault(pool.token, {})
            for v in self.volumes:
                if v[0] == "s":
                    maps[v[1]] = pool.slabs[v[1]].map
        slabs = [v if v[0] == "f" else (*v[:3], tuple(v[3]), v[4], 0, None) for v in self.volumes]
        return _rebuild(pool.token, slabs, self.image_index, self.fields, self.volume_major, self.finish)


def iter_batches(
    dataset,
    worker: int,
    num_workers: int,
    batch_size: int,
    pool: SlabPool,
    finish: str = "numpy",
    per_message: int = 1,
) -> Iterator[WireBatch] | Iterator[list[WireBatch]]:
    """Worker ``worker``'s batches of a :class:`kneeprep.loader.dataset.ShardDataset`, decoded into ``pool``: the
    batches a DataLoader of ``batch_size`` would form from the worker's samples (items when volume-major).

    ``per_message`` > 1: lists of that many consecutive batches (the last one shorter), cut as a DataLoader of
    ``batch_size * per_message`` would hand the worker its samples -- one message per list amortizes the
    DataLoader's per-message cost; flattened in order they continue the DataLoader's output order for that
    batch size (:class:`kneeprep.loader.torchdata.TorchShardDataset`)."""
    records: list[dict] = []
    message: list[WireBatch] = []
    unit = batch_size * per_message
    for r in dataset.iter_worker(worker, num_workers, unit, alloc=pool.alloc, view=pool.view):
        records.append(r)
        del r  # no reference of this frame may keep a sent volume's slab busy
        if len(records) == batch_size:
            message.append(pool.batch(records, dataset.volume_major, finish))
            records.clear()  # the worker's own references go: the slabs are then held by the batch alone
            if len(message) == per_message:
                yield message if per_message > 1 else message[0]
                message = []
    if records:
        message.append(pool.batch(records, dataset.volume_major, finish))
    if message:
        yield message if per_message > 1 else message[0]


_pools: dict[int, SlabPool] = {}


def worker_pool(max_slabs: int = DEFAULT_MAX_SLABS, wait_s: float = DEFAULT_WAIT_S) -> SlabPool:
    """This process's pool (made on first use; a forked child makes its own, never the parent's)."""
    pool = _pools.get(os.getpid())
    if pool is None:
        _pools.clear()  # inherited through fork: the parent's, not ours
        pool = _pools[os.getpid()] = SlabPool(max_slabs, wait_s)
    else:
        pool.max_slabs, pool.wait_s = max(pool.max_slabs, max_slabs), wait_s
    return pool
