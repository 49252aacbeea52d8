"""Hugging Face ``datasets`` and generic tools on the shards: each quintuple's decoded volume, lazily.

The shards directory is a Hub dataset (``docs/SHARDS.md``, "Layout"): ``datasets.load_dataset(SHARDS)`` gives
the ``quintuples`` config (train / validation / test; no volume on most rows) and
``load_dataset(SHARDS, "volumes")`` one row per volume. This module joins the two without copying a volume
per row::

    import datasets, kneeprep.hf
    ds = datasets.load_dataset("SHARDS", split="train")
    vols = kneeprep.hf.Volumes("SHARDS", split="train")       # reads volume ids only; volumes on demand
    ds = ds.with_transform(kneeprep.hf.with_volumes(vols))   # ds[i]["volume"]: (z, y, x) numpy, read-only
    kneeprep.hf.decode_volume(volumes_row)                    # a row of the "volumes" config, from any tool

``Volumes`` reads the volumes table with pyarrow (paths from ``manifest.json``), one row group per volume, and
keeps the last ``cache_size`` decoded volumes (a split's questions about one volume are decoded once while they
are near each other). Needs pyarrow and numpy (numcodecs for Blosc volumes), not ``datasets`` itself.

**Why ``image_nbytes``**: ``datasets``' numpy formatting turns binary values into ``np.bytes_``, which drops
trailing NUL bytes -- a raw volume whose last voxels are 0 comes back short. :func:`decode_volume` pads the
value back to ``image_nbytes`` with NUL bytes (exactly what was dropped) before decoding.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from kneeprep.errors import InputNotFoundError, ValidationError
from kneeprep.formats.shard_reader import is_legacy, read_manifest
from kneeprep.formats.shard_schema import decode_image


def decode_volume(row: dict[str, Any]) -> np.ndarray:
    """The ``(z, y, x)`` array of a volumes-config row (a dict with ``image``, ``image_nbytes``,
    ``image_dtype``, ``image_shape``, ``image_codec``), whatever the tool made of the bytes (``bytes``,
    ``np.bytes_`` with trailing NULs stripped, a numpy array of uint8)."""
    image = row["image"]
    data = (
        image.tobytes()
        if isinstance(image, np.ndarray) and not isinstance(image, np.bytes_)
        else bytes(image)
    )
    n = int(row["image_nbytes"])
    if len(data) < n:  # trailing NULs stripped (np.bytes_): put them back
        data = data + b"\0" * (n - len(data))
    shape = [int(v) for v in np.asarray(row["image_shape"]).tolist()]
    return decode_image(data, str(row["image_dtype"]), shape, str(row["image_codec"]))


class Volumes:
    """Decoded volumes of a shards directory by volume id (``split=None``: every split), read on demand."""

    def __init__(self, shards_dir: str | os.PathLike, split: str | None = None, cache_size: int = 8):
        self.path = Path(shards_dir)
        m = read_manifest(self.path)
        if is_legacy(m):
            raise ValidationError(
                f"{self.path / 'manifest.json'}: shards of schema version {m.get('schema_version')} "
                "(<split>/part-NNNNN.parquet) have no volumes table; re-run `kneeprep shards` to rewrite them"
            )
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        #: volume id -> (volumes file, row group)
        self.index: dict[str, tuple[str, int]] = {}
        for e in m["shards"]:
            if split is not None and e["split"] != split:
                continue
            vids = pq.read_table(self.path / e["volumes_path"], columns=["volume_id"]).column("volume_id")
            for g, vid in enumerate(vids.to_pylist()):
                self.index[vid] = (e["volumes_path"], g)
        if split is not None and not self.index:
            raise InputNotFoundError(f"{self.path}: no volumes of split {split!r}")

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, vid: str) -> bool:
        return vid in self.index

    def __getitem__(self, vid: str) -> np.ndarray:
        if vid in self._cache:
            self._cache.move_to_end(vid)
            return self._cache[vid]
        try:
            rel, g = self.index[vid]
        except KeyError:
            raise KeyError(f"volume {vid!r} is not in {self.path}") from None
        cols = ["image", "image_nbytes", "image_dtype", "image_shape", "image_codec"]
        row = pq.ParquetFile(self.path / rel).read_row_group(g, columns=cols).to_pylist()[0]
        a = decode_volume(row)
        self._cache[vid] = a
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return a


def with_volumes(volumes: Volumes, key: str = "volume") -> Callable[[dict[str, list]], dict[str, list]]:
    """A ``datasets`` transform (``Dataset.with_transform`` / ``set_transform``) adding each row's decoded
    volume under ``key``, looked up by ``volume_id`` in ``volumes`` (the ``image`` column, null on most
    quintuple rows, is dropped)."""

    def transform(batch: dict[str, list]) -> dict[str, list]:
        out = {k: v for k, v in batch.items() if k != "image"}
        out[key] = [volumes[v] for v in batch["volume_id"]]
        return out

    return transform
