"""Moving :class:`~kneeprep.loader.torchdata.VolumeBatch` volumes to a GPU: pinned host buffers reused, a side
stream one batch ahead, the last volumes kept on the device (the ``torch`` extra; no-ops without CUDA)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch


class PinnedPool:
    """Page-locked copies of recent volumes (LRU by slab generation, at most ``max_bytes``).

    ``get(key, volume)`` returns the pinned copy of a volume, copying only when that volume (``key``: the
    slab's generation) is not pinned yet, so the batches that share a volume pin it once. Buffers come from
    torch's caching host allocator: pinned once, reused after eviction, and never handed out again while an
    asynchronous device copy still reads them (torch records those copies' events).
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, volume: torch.Tensor) -> torch.Tensor:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
            out = torch.empty(volume.shape, dtype=volume.dtype, pin_memory=True)
            out.copy_(volume)
            self._entries[key] = out
            held = sum(t.numel() * t.element_size() for t in self._entries.values())
            while len(self._entries) > 1 and held > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                held -= old.numel() * old.element_size()
            return out


#: the training process's pinned pool (used by :meth:`VolumeBatch.pin_memory`)
PINNED = PinnedPool()


class DeviceCache:
    """The last ``max_volumes`` volumes moved to a device, by slab generation."""

    def __init__(self, max_volumes: int = 8):
        self.max_volumes = max_volumes
        self._d: OrderedDict[Any, torch.Tensor] = OrderedDict()

    def get(self, key: Any) -> torch.Tensor | None:
        t = self._d.get(key)
        if t is not None:
            self._d.move_to_end(key)
        return t

    def put(self, key: Any, t: torch.Tensor) -> None:
        self._d[key] = t
        while len(self._d) > self.max_volumes:
            self._d.popitem(last=False)


class DeviceFeeder:
    """Iterate a loader of :class:`VolumeBatch` onto a CUDA device, copies one batch ahead on a side stream.

    Volumes shared by consecutive batches stay on the device (:class:`DeviceCache`, ``cache_volumes``).
    Without CUDA (or for a CPU ``device``) it yields the loader's batches unchanged.
    """

    def __init__(self, loader, device: Any = "cuda", cache_volumes: int = 8):
        self.loader = loader
        self.device = torch.device(device)
        self.cache_volumes = cache_volumes

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        cache = DeviceCache(self.cache_volumes)

        def ahead(batch):
            with torch.cuda.stream(stream):
                moved = batch.to(self.device, non_blocking=True, cache=cache)
                event = torch.cuda.Event()
                event.record(stream)
            return moved, event

        it = iter(self.loader)
        try:
            nxt = ahead(next(it))
        except StopIteration:
            return
        for batch in it:
            cur, event = nxt
            nxt = ahead(batch)
            yield _ready(cur, event)
        yield _ready(*nxt)


def _ready(batch, event: Any):
    main = torch.cuda.current_stream()
    main.wait_event(event)
    if "volumes" in batch:
        for v in batch.volumes:
            v.record_stream(main)  # allocated on the side stream, used on this one
        batch.image_index.record_stream(main)
    return batch
