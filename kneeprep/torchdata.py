"""PyTorch glue for :class:`kneeprep.loader.ShardDataset` (needs the ``torch`` extra).

    from kneeprep.loader import ShardDataset
    from kneeprep.torchdata import TorchShardDataset, collate

    ds = ShardDataset("shards", split="train", seed=0, rank=rank, world_size=world_size)
    tds = TorchShardDataset(ds, batch_size=4)
    dl = torch.utils.data.DataLoader(tds, batch_size=4, num_workers=2, collate_fn=collate, pin_memory=True)
    for epoch in range(epochs):
        tds.set_epoch(epoch)
        for step, batch in enumerate(dl): ...
        # to resume mid-epoch later: state = tds.state_dict(consumed=(step + 1) * 4); tds.load_state_dict(state)

``TorchShardDataset`` splits the rank's samples among ``DataLoader`` workers by
``torch.utils.data.get_worker_info()`` in whole batches of ``batch_size`` -- pass the DataLoader's batch size
so resuming knows which worker yielded what (``docs/SHARDS.md``, "Loading").
"""

from __future__ import annotations

import os
from typing import Any

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "kneeprep.torchdata needs PyTorch, an optional extra: pip install 'kneeprep[torch]'"
    ) from e

import numpy as np

from .loader import ShardDataset


class TorchShardDataset(IterableDataset):
    """A ``torch.utils.data.IterableDataset`` over a :class:`ShardDataset`, split by DataLoader worker."""

    def __init__(self, dataset: ShardDataset, batch_size: int = 1):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return self.dataset.iter_worker(0, 1, self.batch_size)
        _share_blosc_threads(info.num_workers)
        return self.dataset.iter_worker(info.id, info.num_workers, self.batch_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self, consumed: int) -> dict[str, Any]:
        """State after ``consumed`` samples of this epoch reached the training loop (whole batches)."""
        return self.dataset.state_dict(consumed=consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


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
    """Batch sample dicts: ``image`` becomes one ``(B, z, y, x)`` tensor when all shapes agree (else a list of
    tensors); other keys become lists. ``pin_memory`` pins the image tensor when CUDA is available (usually
    prefer the DataLoader's own ``pin_memory=True``, which pins in the main process)."""
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
