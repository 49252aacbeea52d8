"""Reading shards for training: :class:`ShardDataset` (numpy, no torch) and, with the ``torch`` extra, the
DataLoader side (:mod:`kneeprep.loader.torchdata`: ``make_loader``, ``TorchShardDataset``, ``DeviceFeeder``).

``from kneeprep.loader import ShardDataset, make_loader`` -- the torch names are imported on first use, so
``import kneeprep.loader`` never needs torch.
"""

from __future__ import annotations

from kneeprep.loader.dataset import ShardDataset

_TORCH_NAMES = ("DeviceFeeder", "TorchShardDataset", "VolumeBatch", "make_loader")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from kneeprep.loader import torchdata  # needs torch: imported only when asked for

        return getattr(torchdata, name)
    raise AttributeError(f"module 'kneeprep.loader' has no attribute {name!r}")


__all__ = ["ShardDataset", *_TORCH_NAMES]
