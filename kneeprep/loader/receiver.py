"""The training process's side of :mod:`kneeprep.loader.slabs`: batches rebuilt from their descriptors.

A slab descriptor is mapped once per worker slab (its file descriptor arrives with the first batch that uses
it); every volume array handed to the trainer has a :class:`_Lease` as its base, which counts the batch as
released when the last view of it dies. A file descriptor (an uncompressed shard's volume in place) maps the
shard file itself, the last :data:`MAX_FILE_MAPS` files kept. Mappings of exited workers are dropped when the
next worker registers; :func:`release_mappings` drops them all.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from kneeprep.errors import StoreError

HEADER = (
    64  #: bytes before the volume: int64 released-batches counter, then padding (keeps 64-byte alignment)
)

_MAPPINGS: dict[str, dict[int, mmap.mmap]] = {}
_FILE_MAPS: OrderedDict[tuple[int, int], mmap.mmap] = OrderedDict()
MAX_FILE_MAPS = 8  #: shard files the training process keeps mapped (virtual memory; the pages are page cache)
_RECEIVER_LOCK = threading.RLock()  # re-entrant: a lease collected by gc while it is held must not deadlock
_FINISHERS: dict[str, Callable[[dict[str, Any]], Any]] = {}


def register_finisher(name: str, fn: Callable[[dict[str, Any]], Any]) -> None:
    """``fn(batch_dict)`` builds what the training loop receives (``kneeprep.loader.torchdata`` registers "torch")."""
    _FINISHERS[name] = fn


class _Lease:
    """Base object of the arrays handed to the trainer: when the last view is gone, the slab's released
    counter goes up by one (the worker may then reuse the slab)."""

    __slots__ = ("__array_interface__", "_array", "_counter", "__weakref__")

    def __init__(self, array: np.ndarray, counter: np.ndarray, readonly: bool):
        self._array = array
        self._counter = counter
        face = dict(array.__array_interface__)
        face["data"] = (face["data"][0], readonly)  # the slab is shared by every batch of the volume
        self.__array_interface__ = face

    def __del__(self):
        try:
            with _RECEIVER_LOCK:
                self._counter[0] += 1
        except (TypeError, AttributeError):  # pragma: no cover - interpreter shutdown
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process of that pid
        return True
    return True


def _rebuild(token, slabs, image_index, fields, volume_major, finish):
    with _RECEIVER_LOCK:
        if token not in _MAPPINGS:  # a token is "<worker pid>-<random>"
            for other in [t for t in _MAPPINGS if not _alive(int(t.split("-")[0]))]:
                del _MAPPINGS[other]  # mappings of exited workers: their memory goes back to the system
            _MAPPINGS[token] = {}
        maps = _MAPPINGS[token]
        for v in slabs:
            if v[0] == "s" and v[6] is not None:
                raw = v[6].detach()
                try:
                    maps[v[1]] = mmap.mmap(raw, v[5])
                finally:
                    os.close(raw)
    volumes, keys = [], []
    for v in slabs:
        if v[0] == "f":
            _, path, fkey, offset, shape, dtype = v
            with _RECEIVER_LOCK:
                m = _file_map(path, tuple(fkey))
            arr = np.frombuffer(m, np.dtype(dtype), count=math.prod(shape), offset=offset).reshape(shape)
            # writable for torch (as slabs are): the mapping is private, copy-on-write, so the file never changes
            arr.flags.writeable = finish == "torch"
            volumes.append(arr)
            keys.append(("file", tuple(fkey), offset))
            continue
        _, sid, gen, shape, dtype, _, _ = v
        m = maps[sid]
        n = math.prod(shape) * np.dtype(dtype).itemsize
        arr = np.frombuffer(m, np.uint8, count=n, offset=HEADER).view(dtype).reshape(shape)
        counter = np.frombuffer(m, np.int64, count=1)
        # numpy users get read-only arrays; torch has no read-only tensors (and warns on them): writable there
        volumes.append(np.asarray(_Lease(arr, counter, readonly=finish != "torch")))
        keys.append((token, sid, gen))
    batch = dict(fields)
    if image_index is not None:
        batch["volumes"] = volumes
        batch["volume_keys"] = keys
        batch["image_index"] = np.asarray(image_index, dtype=np.int64)
    batch["volume_major"] = volume_major
    return _FINISHERS[finish](batch) if finish in _FINISHERS else batch


def _file_map(path: str, key: tuple[int, int]) -> mmap.mmap:
    """This process's mapping of a shard file (the last :data:`MAX_FILE_MAPS` are kept; arrays still alive keep
    theirs). Called under ``_RECEIVER_LOCK``."""
    m = _FILE_MAPS.get(key)
    if m is not None:
        _FILE_MAPS.move_to_end(key)
        return m
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(
            f"{path}: a loader worker read a volume from this shard file, which is gone: {e}"
        ) from e
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key:
            raise StoreError(
                f"{path}: the shard file was replaced while the loader read it (another `kneeprep shards` run "
                "into the same directory?); restart the loader"
            )
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # private: writes by the trainer never reach the file
    finally:
        os.close(fd)
    _FILE_MAPS[key] = m
    while len(_FILE_MAPS) > MAX_FILE_MAPS:
        _FILE_MAPS.popitem(last=False)
    return m


def release_mappings() -> None:
    """Drop this process's mappings of every worker's slabs and of shard files (arrays still alive keep
    theirs)."""
    with _RECEIVER_LOCK:
        _MAPPINGS.clear()
        _FILE_MAPS.clear()
