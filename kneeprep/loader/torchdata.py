"""PyTorch glue for :class:`kneeprep.loader.dataset.ShardDataset` (needs the ``torch`` extra).

    from kneeprep.loader import ShardDataset
    from kneeprep.loader.torchdata import DeviceFeeder, make_loader

    ds = ShardDataset("shards", split="train", seed=0, rank=rank, world_size=world_size)
    dl = make_loader(ds, batch_size=4, num_workers=2)          # a torch DataLoader of VolumeBatch
    for epoch in range(epochs):
        dl.dataset.set_epoch(epoch)
        for step, batch in enumerate(DeviceFeeder(dl, "cuda")):  # plain iteration over dl works too
            x = batch["images"][batch["image_index"]]         # (B, z, y, x) on the device
            ...
        # to resume mid-epoch later: state = dl.dataset.state_dict(consumed=(step + 1) * 4)

**Batches are built in the workers** (:class:`TorchShardDataset` yields whole batches; the DataLoader runs with
``batch_size=None``) and each **distinct volume crosses to the training process once**: workers decode into
shared-memory slabs and send descriptors (:mod:`kneeprep.loader.slabs`), the training process wraps the slab as a
tensor without copying. A :class:`VolumeBatch` holds

* ``volumes``: the U distinct volumes of the batch, each a ``(z, y, x)`` tensor (zero-copy views of the slabs);
* ``images``: the same as one ``(U, z, y, x)`` tensor -- a view when U == 1 (always, volume-major with batch
  size 1), otherwise stacked on first access (one copy; :meth:`VolumeBatch.to` stacks on the device instead);
* ``image_index``: ``(B,)`` int64, sample ``i``'s volume is ``images[image_index[i]]``; expand with
  ``images[image_index]`` (after ``.to(device)``) where code wants the ``(B, z, y, x)`` layout
  (:meth:`VolumeBatch.image_stack`);
* every other sample field as a list of B values (``sample_id``, ``question``, ``box``, ...); volume-major
  batches (``ShardDataset(volume_major=True)``) hold B items: ``quintuples`` is a list of B lists of sample
  dicts, and ``image_index`` maps items to volumes.

The volume tensors share memory with the slabs: **do not modify them in place** (normalize out of place, or on
the device). A slab is reused only after every tensor that views it is gone.

**GPU feeding.** With CUDA, the DataLoader's ``pin_memory=True`` calls :meth:`VolumeBatch.pin_memory`: each
volume is copied into a page-locked buffer from a pool that is pinned once and reused, keyed by the slab's
generation so a volume already pinned is not copied again. :class:`DeviceFeeder` moves each batch to the device
on a separate CUDA stream one batch ahead of the training loop, and keeps the last few volumes on the device,
so a volume used by consecutive batches crosses the PCIe bus once. Without CUDA both are no-ops (CPU tensors,
no warning).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

try:
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "kneeprep.loader.torchdata needs PyTorch, an optional extra: pip install 'kneeprep[torch]'"
    ) from e

import numpy as np

from kneeprep.loader import slabs
from kneeprep.loader.dataset import ShardDataset
from kneeprep.loader.device import PINNED, DeviceCache, DeviceFeeder, PinnedPool  # noqa: F401 - re-exported


class TorchShardDataset(IterableDataset):
    """A ``torch.utils.data.IterableDataset`` of :class:`VolumeBatch` over a :class:`ShardDataset`.

    Each DataLoader worker yields its whole batches of ``batch_size`` samples (items when volume-major) in the
    order :meth:`ShardDataset.iter_worker` defines, so the training loop sees the same batches as with a
    sample-level DataLoader of the same ``batch_size``. Use it with ``DataLoader(batch_size=None)``
    (:func:`make_loader` does). ``max_slabs`` / ``wait_s``: each worker's shared-memory pool
    (:mod:`kneeprep.loader.slabs`). ``batches_per_message`` > 1: a worker sends lists of that many
    consecutive batches (the DataLoader's cost is per message: 2 workers with 4 per message received about
    twice the batches per second, bench/RESULTS.md); the order is then that of a sample-level DataLoader of
    ``batch_size * batches_per_message`` cut into batches, and the DataLoader must flatten the lists
    (:func:`make_loader`'s does).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batch_size: int = 1,
        *,
        max_slabs: int = slabs.DEFAULT_MAX_SLABS,
        wait_s: float = slabs.DEFAULT_WAIT_S,
        batches_per_message: int = 1,
    ):
        super().__init__()
        if batch_size < 1 or batches_per_message < 1:
            raise ValueError(
                f"batch_size and batches_per_message must be >= 1, got {batch_size}, {batches_per_message}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.batches_per_message = batches_per_message
        self.max_slabs, self.wait_s = max_slabs, wait_s
        # (epoch, samples to skip) in shared memory: persistent workers keep their copy of the dataset, so
        # set_epoch / load_state_dict in the training process must reach them through memory they share
        self._shared = torch.tensor([dataset.epoch, dataset._resume], dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[VolumeBatch | slabs.WireBatch]:
        info = get_worker_info()
        w, k = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            _share_blosc_threads(k)
        epoch, resume = (int(x) for x in self._shared.tolist())
        self.dataset.epoch, self.dataset._resume = epoch, resume
        pool = slabs.worker_pool(self.max_slabs, self.wait_s)
        per = self.batches_per_message
        for msg in slabs.iter_batches(self.dataset, w, k, self.batch_size, pool, "torch", per):
            if info is not None:
                yield msg
            elif per > 1:  # no workers: nothing to amortize, the batches one by one
                yield from (wire.receive() for wire in msg)
            else:
                yield msg.receive()

    def __len__(self) -> int:
        """Batches per rank per epoch (what ``len(DataLoader)`` reports)."""
        return -(-len(self.dataset) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; call before each epoch (it reaches persistent workers too) -- this also ends a
        resume: the epoch starts at its beginning."""
        self.dataset.set_epoch(epoch)
        self._shared[0], self._shared[1] = self.dataset.epoch, 0

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """State after ``consumed`` samples (items) of this epoch reached the training loop (whole batches)."""
        return self.dataset.state_dict(consumed=consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue ``state``'s epoch: every iteration skips its first ``consumed`` samples until the next
        :meth:`set_epoch` (persistent workers included)."""
        self.dataset.load_state_dict(state)
        self._shared[0], self._shared[1] = self.dataset.epoch, self.dataset._resume


def make_loader(
    dataset: ShardDataset,
    batch_size: int = 4,
    num_workers: int = 2,
    *,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 2,
    multiprocessing_context=None,
    max_slabs: int = slabs.DEFAULT_MAX_SLABS,
    batches_per_message: int | None = None,
    **kwargs,
) -> DataLoader:
    """A ``DataLoader`` of :class:`VolumeBatch` (``dl.dataset`` is the :class:`TorchShardDataset`).

    ``pin_memory`` defaults to whether CUDA is available (so CPU-only machines get no warning);
    ``persistent_workers`` to ``num_workers > 0``. With workers, each sends ``batches_per_message`` batches
    per message (:class:`TorchShardDataset`; iterating the loader yields them one by one; the order is that
    of a sample-level DataLoader of ``batch_size * batches_per_message`` cut into batches of ``batch_size``);
    default 4 sample-major, 1 volume-major (a volume-major batch already holds ``batch_size`` volumes with all
    their samples, and more volumes per message would hold more slabs in flight).
    Other keyword arguments go to ``DataLoader``.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    persistent = num_workers > 0 if persistent_workers is None else persistent_workers
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    if batches_per_message is None:
        batches_per_message = 1 if dataset.volume_major else 4
    per = batches_per_message if num_workers > 0 else 1
    return _FlatLoader(
        TorchShardDataset(dataset, batch_size, max_slabs=max_slabs, batches_per_message=per),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=persistent,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        **extra,
        **kwargs,
    )


class _FlatLoader(DataLoader):
    """A DataLoader whose workers send lists of batches (``batches_per_message``): yields the batches."""

    def __iter__(self) -> _Flat:
        return _Flat(super().__iter__())


class _Flat:
    """The DataLoader's iterator, one batch at a time (its other attributes pass through)."""

    def __init__(self, it):
        self._it, self._pending = it, collections.deque()

    def __iter__(self) -> _Flat:
        return self

    def __next__(self) -> VolumeBatch:
        if self._pending:
            return self._pending.popleft()
        msg = next(self._it)
        if isinstance(msg, list):
            self._pending.extend(msg[1:])
            return msg[0]
        return msg

    def __len__(self) -> int:
        return len(self._it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._it, name)


class VolumeBatch:
    """One batch as the training loop receives it (see the module docs). Indexable like a dict."""

    def __init__(self, data: dict[str, Any]):
        self._data = data
        self._images: Any = None

    # -- dict-like ---------------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key == "images":
            return self.images
        return self._data[key]

    def __contains__(self, key: str) -> bool:
        return key in self._data or (key == "images" and "volumes" in self._data)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        extra = ["images"] if "volumes" in self._data else []
        return [k for k in self._data if k not in ("volume_keys", "volume_major")] + extra

    def __len__(self) -> int:
        """B: the samples (items) in the batch."""
        if "image_index" in self._data:
            return len(self._data["image_index"])
        return len(next(iter(v for k, v in self._data.items() if isinstance(v, list) and k != "volumes"), []))

    def __repr__(self) -> str:
        vols = self._data.get("volumes", [])
        shapes = sorted({tuple(v.shape) for v in vols})
        return f"VolumeBatch(B={len(self)}, U={len(vols)}, volume shapes {shapes}, keys {self.keys()})"

    # -- images ------------------------------------------------------------------------------------------

    @property
    def volumes(self) -> list[torch.Tensor]:
        return self._data["volumes"]

    @property
    def image_index(self) -> torch.Tensor:
        return self._data["image_index"]

    @property
    def images(self) -> torch.Tensor | list[torch.Tensor]:
        """``(U, z, y, x)``: a view when U == 1, else stacked once (a list when shapes differ)."""
        if self._images is None:
            vols = self._data["volumes"]
            if len(vols) == 1:
                self._images = vols[0].unsqueeze(0)
            elif len({(tuple(v.shape), v.dtype) for v in vols}) == 1:
                self._images = torch.stack(vols)
            else:
                self._images = list(vols)
        return self._images

    def image_stack(self) -> torch.Tensor:
        """``(B, z, y, x)``: each sample's volume (``images[image_index]``; a copy of every repeat)."""
        images = self.images
        if isinstance(images, list):
            raise ValueError("the batch's volumes differ in shape: index batch.volumes per sample instead")
        return images[self.image_index]

    # -- moving ------------------------------------------------------------------------------------------

    def _with(self, volumes: list[torch.Tensor], image_index: torch.Tensor) -> VolumeBatch:
        data = dict(self._data)
        data["volumes"], data["image_index"] = volumes, image_index
        return VolumeBatch(data)

    def pin_memory(self, device: Any = None) -> VolumeBatch:
        """Volumes in page-locked memory from a reused pool (:data:`PINNED`); a no-op without CUDA."""
        if "volumes" not in self._data or not torch.cuda.is_available():
            return self
        keys = self._data["volume_keys"]
        vols = [PINNED.get(k, v) for k, v in zip(keys, self._data["volumes"], strict=True)]
        return self._with(vols, self._data["image_index"].pin_memory())

    def to(self, device: Any, non_blocking: bool = False, cache: DeviceCache | None = None) -> VolumeBatch:
        """The batch with its volumes and ``image_index`` on ``device``; ``images`` is then stacked there.
        ``cache`` keeps recent volumes on the device so a volume shared by consecutive batches moves once."""
        if "volumes" not in self._data:
            return self
        device = torch.device(device)
        keys = self._data["volume_keys"]
        vols = []
        for key, v in zip(keys, self._data["volumes"], strict=True):
            d = cache.get(key) if cache is not None else None
            if d is None:
                d = v.to(device, non_blocking=non_blocking)
                if cache is not None:
                    cache.put(key, d)
            vols.append(d)
        return self._with(vols, self._data["image_index"].to(device, non_blocking=non_blocking))


def _finish(batch: dict[str, Any]) -> VolumeBatch:
    if "volumes" in batch:
        batch["volumes"] = [torch.from_numpy(v) for v in batch["volumes"]]
        batch["image_index"] = torch.from_numpy(batch["image_index"])
    return VolumeBatch(batch)


slabs.register_finisher("torch", _finish)


def _share_blosc_threads(num_workers: int) -> None:
    """In a worker process: Blosc decodes (compact shards) on cores / workers threads, so K workers do not run
    K x cores threads (torch likewise sets 1 intra-op thread per worker)."""
    try:
        from numcodecs import blosc
    except ImportError:  # pragma: no cover - numcodecs comes with zarr
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    blosc.set_nthreads(max(1, cores // num_workers))


def collate(samples: list[dict[str, Any]], pin_memory: bool = False) -> dict[str, Any]:
    """Batch sample dicts of a plain ``ShardDataset`` iteration (the per-sample path: every sample carries
    its own volume; :class:`TorchShardDataset` does not need this). ``image`` becomes one ``(B, z, y, x)``
    tensor when all shapes agree (else a list of tensors); other keys become lists."""
    out: dict[str, Any] = {k: [s[k] for s in samples] for k in samples[0] if k != "image"}
    if "image" in samples[0]:
        images = [s["image"] for s in samples]
        if len({(a.shape, a.dtype) for a in images}) == 1:
            batch = torch.from_numpy(np.stack(images))
        else:
            batch = [torch.from_numpy(np.array(a)) for a in images]
        if pin_memory and torch.cuda.is_available():
            batch = batch.pin_memory() if isinstance(batch, torch.Tensor) else [b.pin_memory() for b in batch]
        out["image"] = batch
    return out
