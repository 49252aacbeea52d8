"""``ShardDataset``: iterate the quintuples of a split for training -- shuffled, partitioned exactly across
ranks and workers, resumable, fork-safe, decoding each volume once per row group read.

How an epoch is ordered (everything is index arithmetic on the manifest; no file is opened to plan):

1. **Epoch plan.** With ``shuffle``, the split's shards are permuted, then the row groups inside each shard,
   then the rows inside each row group, all from ``numpy.random.default_rng([seed, epoch])``. Without
   ``shuffle``, manifest order. The plan lists every sample of the split exactly once.
2. **Ranks.** The plan is cut into ``world_size`` contiguous slices of equal length ``len(dataset)``:
   ``drop_last=False`` (default) pads by wrapping around to the start of the plan, so every sample is seen at
   least once and ``ceil(N / world_size) * world_size - N`` samples twice; ``drop_last=True`` drops the last
   ``N % world_size`` samples of the plan (different ones each epoch when shuffling), so every sample is seen at
   most once. Contiguous slices keep each rank on its own row groups (each volume decoded by one rank, except at
   slice boundaries).
3. **Buffer.** With ``shuffle``, the rank's slice is shuffled inside consecutive windows of ``buffer_size``
   samples (``default_rng([seed, epoch, rank])``): a bounded buffer, so memory holds the volumes of about one
   window plus two.
4. **Workers.** Under a torch ``DataLoader`` with ``K`` workers and batch size ``B``, the rank's sequence is cut
   into ``K`` contiguous blocks of whole batches; worker ``w`` yields block ``w``, and the DataLoader returns
   batches round-robin over workers (:meth:`ShardDataset.loader_order`), so the order a training loop sees is
   fixed by (seed, epoch, rank, K, B) -- and differs from the single-process order when ``K > 1``. The union over
   ranks x workers is exactly the epoch plan (plus the padding of rule 2).

**Resume.** ``state_dict()`` is ``{"epoch", "consumed", ...}``; ``load_state_dict`` makes the next iteration
skip the first ``consumed`` samples of the same order (for a DataLoader, pass ``consumed = batches * B``;
without workers the dataset counts itself). Skipped row groups are never read.

**Volume-major** (``volume_major=True``): the unit of the plan is an *item* -- one volume with all its
quintuples, or up to ``max_questions`` of them (a volume with more is cut into several items; with ``shuffle``
its rows are permuted per epoch before the cut, from ``default_rng([seed, epoch, row group])``). Every rule
above applies to items instead of samples: ``len()``, partitioning, windows, workers and ``consumed`` count
items. An item is a dict: ``image``, ``volume_id``, ``patient_id``, ``split``, the ``image_*`` geometry and
``quintuples`` (the sample dicts below, without ``image``). Construction then also reads each row group's
``volume_id`` column once (to know where volumes start); nothing else changes.

**URLs** (``s3://bucket/prefix``, ``memory://...``; ``file://`` is local): the manifest is read through fsspec
(``storage_options``, or the standard AWS environment); each shard is fetched whole into a bounded local cache
shared by the node's processes (``cache_dir``, ``cache_bytes``), the next one prefetched in the background
(``prefetch``), or, with ``cache_dir=False``, its row groups are read by byte range. Order, partitioning and
resume are the same index arithmetic as for a local path (:mod:`kneeprep.loader.remote`,
:mod:`kneeprep.loader.cache`).

**Samples** are dicts: ``image`` (numpy ``(z, y, x)``, read-only, shared by the samples of one volume -- copy
before writing to it), ``sample_id``, ``volume_id``, ``patient_id``, ``split``, ``question_id``,
``question_type``, ``question_region``, ``question``, ``box`` (``None`` or a dict with ``region``, ``voxels``,
``list_form``, ``normalized``, ``size_mm``, ``center_lps``), ``box_empty``, ``box_reason``, ``reasoning``
(list of str), ``severity`` (list of dicts finding/region/component/grade), ``answer_json`` and the
``image_*`` geometry columns; ``columns`` narrows the row columns read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from kneeprep.errors import InputNotFoundError, ValidationError
from kneeprep.formats.raw_pages import MappedFile
from kneeprep.formats.shard_reader import VolumeAllocator, VolumeViewer, read_manifest, read_row_group
from kneeprep.formats.shard_schema import SCHEMA
from kneeprep.formats.urls import as_local_or_url
from kneeprep.loader.remote import Remote

_BOX_FIELDS = ("region", "voxels", "list_form", "normalized", "size_mm", "center_lps")


class ShardDataset:
    """Samples of one split of a shards directory (see the module docs for order, partitioning and resume).

    Construction reads ``manifest.json`` only; Parquet files are opened lazily inside each iteration, in the
    process that iterates (safe to construct before forking DataLoader workers). ``path`` is a folder or a URL
    (module docs, "URLs"; ``storage_options``, ``cache_dir``, ``cache_bytes`` and ``prefetch`` apply to URLs).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_size: int = 256,
        columns: Sequence[str] | None = None,
        drop_last: bool = False,
        volume_major: bool = False,
        max_questions: int | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None | bool = None,
        cache_bytes: int | None = None,
        prefetch: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if max_questions is not None and (not volume_major or max_questions < 1):
            raise ValueError(f"max_questions needs volume_major=True and a value >= 1, got {max_questions}")
        unknown = [c for c in columns or () if c not in SCHEMA.names]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; shard columns are {SCHEMA.names}")
        self.path: Path | str = as_local_or_url(path)
        manifest = read_manifest(self.path, storage_options)
        entries = sorted((e for e in manifest["shards"] if e["split"] == split), key=lambda e: e["path"])
        if not entries:
            raise InputNotFoundError(f"{self.path}: no shards of split {split!r}")
        #: a URL's reading setup (kneeprep.loader.remote); None for local shards
        self._remote = None
        if isinstance(self.path, str):
            self._remote = Remote(
                self.path, storage_options, cache_dir, cache_bytes, prefetch, {e["path"]: e for e in entries}
            )
        self.split, self.shuffle, self.seed = split, shuffle, seed
        self.rank, self.world_size, self.buffer_size = rank, world_size, buffer_size
        self.columns = None if columns is None else list(columns)
        self.drop_last = drop_last
        self.volume_major, self.max_questions = volume_major, max_questions
        #: (shard path, row group index, rows -- or items when volume-major) per row group, in manifest order
        self.units: list[tuple[str, int, int]] = [
            (e["path"], g, n) for e in entries for g, n in enumerate(e["row_group_rows"])
        ]
        #: volume-major: per row group, the row count of each volume in row order
        self._volume_rows: list[list[int]] = []
        if volume_major:
            self._volume_rows = self._read_volume_rows()
            k = max_questions
            self.units = [
                (p, g, sum(-(-n // k) if k else 1 for n in vr))
                for (p, g, _), vr in zip(self.units, self._volume_rows, strict=True)
            ]
        self._shard_units = [[i for i, u in enumerate(self.units) if u[0] == e["path"]] for e in entries]
        self.num_samples = sum(u[2] for u in self.units)
        self.epoch = 0
        self._resume = 0
        self._consumed = 0

    def _read_volume_rows(self) -> list[list[int]]:
        out: list[list[int]] = []
        files: dict[str, pq.ParquetFile] = {}
        try:
            for rel, g, n in self.units:
                if rel not in files:
                    files[rel] = self._open_for_plan(rel)
                vids = files[rel].read_row_group(g, columns=["volume_id"]).column("volume_id").to_pylist()
                if len(vids) != n:
                    raise ValidationError(
                        f"{self._where(rel)}: row group {g} has {len(vids)} rows, manifest {n}"
                    )
                counts: list[int] = []
                for i, v in enumerate(vids):
                    if i and v == vids[i - 1]:
                        counts[-1] += 1
                    else:
                        counts.append(1)
                if len(counts) != len(set(vids)):
                    raise ValidationError(
                        f"{self._where(rel)}: row group {g} does not keep each volume's rows together"
                    )
                out.append(counts)
        finally:
            for f in files.values():
                f.close()
        return out

    def _where(self, rel: str) -> str:
        return f"{self.path}/{rel}" if isinstance(self.path, str) else str(self.path / rel)

    def _open_for_plan(self, rel: str) -> pq.ParquetFile:
        """A shard opened at construction (volume-major): a URL's by byte ranges, never into the cache."""
        if self._remote is not None:
            return self._remote.open_direct(rel)
        return pq.ParquetFile(self.path / rel, memory_map=True)

    def item_rows(self, unit: int, epoch: int | None = None) -> list[np.ndarray]:
        """Volume-major: the rows of each item of row group ``unit`` in ``epoch`` (item order = plan index)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, unit]) if self.shuffle else None
        k = self.max_questions
        items: list[np.ndarray] = []
        start = 0
        for n in self._volume_rows[unit]:
            rows = start + (rng.permutation(n) if rng is not None else np.arange(n))
            items += [rows[i : i + k] for i in range(0, n, k)] if k else [rows]
            start += n
        return items

    # -- size and state ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples (items when volume-major) per rank per epoch (the same on every rank)."""
        n, w = self.num_samples, self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (call before each epoch, on every rank, like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)
        self._resume = self._consumed = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where the current epoch stands. ``consumed`` overrides the in-process count (DataLoader use)."""
        return {
            "epoch": self.epoch,
            "consumed": self._consumed if consumed is None else int(consumed),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the epoch of ``state``: the next iteration skips its first ``consumed`` samples."""
        for k in ("seed", "world_size", "num_samples"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"state {k}={state[k]!r} does not match this dataset's {getattr(self, k)!r}")
        self.epoch = int(state["epoch"])
        self._resume = self._consumed = int(state["consumed"])

    # -- the order -----------------------------------------------------------------------------------------

    def epoch_plan(self, epoch: int | None = None) -> np.ndarray:
        """Every sample of the split once, as an ``(N, 2)`` array of (unit index, row in unit), in epoch order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        shard_order = (
            rng.permutation(len(self._shard_units)) if self.shuffle else range(len(self._shard_units))
        )
        parts = []
        for s in shard_order:
            units = self._shard_units[s]
            for k in rng.permutation(len(units)) if self.shuffle else range(len(units)):
                u = units[k]
                n = self.units[u][2]
                rows = rng.permutation(n) if self.shuffle else np.arange(n)
                parts.append(np.stack([np.full(n, u), rows], axis=1))
        return np.concatenate(parts).astype(np.int64)

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's samples for the epoch, in the order a single process yields them: ``(len(self), 2)``."""
        epoch = self.epoch if epoch is None else epoch
        plan = self.epoch_plan(epoch)
        n = len(self)
        total = n * self.world_size
        if total > len(plan):
            plan = np.concatenate([plan, np.resize(plan, (total - len(plan), 2))])  # wrap around
        mine = plan[self.rank * n : (self.rank + 1) * n]
        if self.shuffle and self.buffer_size > 1:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            mine = mine.copy()
            for start in range(0, n, self.buffer_size):
                window = mine[start : start + self.buffer_size]
                mine[start : start + self.buffer_size] = window[rng.permutation(len(window))]
        return mine

    @staticmethod
    def worker_bounds(n: int, num_workers: int, batch_size: int = 1) -> list[tuple[int, int]]:
        """Worker ``w``'s contiguous ``[start, stop)`` of the rank sequence: whole batches, split evenly."""
        nb = math.ceil(n / batch_size)
        cuts = [min(n, batch_size * (w * nb // num_workers)) for w in range(num_workers + 1)]
        return [(cuts[w], cuts[w + 1]) for w in range(num_workers)]

    @classmethod
    def loader_order(cls, n: int, num_workers: int, batch_size: int = 1) -> np.ndarray:
        """Positions in the rank sequence in the order a DataLoader (``num_workers``, ``batch_size``,
        ``in_order=True``) hands them out: batches round-robin over workers that still have one."""
        blocks = [
            [list(range(s, e))[i : i + batch_size] for i in range(0, e - s, batch_size)]
            for s, e in cls.worker_bounds(n, num_workers, batch_size)
        ]
        out: list[int] = []
        for i in range(max((len(b) for b in blocks), default=0)):
            for b in blocks:
                if i < len(b):
                    out += b[i]
        return np.asarray(out, dtype=np.int64)

    # -- iteration -----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, self._resume = self._resume, 0
        order = self.rank_order()
        self._consumed = start
        for sample in self._materialize(order[start:]):
            self._consumed += 1
            yield sample

    def iter_worker(
        self,
        worker: int,
        num_workers: int,
        batch_size: int = 1,
        alloc: VolumeAllocator | None = None,
        view: VolumeViewer | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Worker ``worker``'s samples under a DataLoader with ``num_workers`` and ``batch_size``.

        The DataLoader's output order is :meth:`loader_order` applied to :meth:`rank_order`. What is left of
        it after a resumed state's ``consumed`` samples is cut into batches, and worker ``w`` yields batches
        ``w, w + K, w + 2K, ...`` -- exactly what the DataLoader's round-robin asks of it, so the output
        continues the same order. From the start of an epoch these are the worker's contiguous block.
        ``alloc`` gives the arrays volumes are decoded into, ``view`` the arrays of raw volumes that lie in a
        mapped shard file (:func:`kneeprep.formats.shard_reader.read_row_group`).
        """
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker must be in 0..{num_workers - 1}, got {worker}")
        order = self.rank_order()
        rest = self.loader_order(len(order), num_workers, batch_size)[self._resume :]
        step = num_workers * batch_size
        mine = [rest[i : i + batch_size] for i in range(worker * batch_size, len(rest), step)]
        yield from self._materialize(order[np.concatenate(mine)] if mine else order[:0], alloc, view)

    def _materialize(
        self, seq: np.ndarray, alloc: VolumeAllocator | None = None, view: VolumeViewer | None = None
    ) -> Iterator[dict[str, Any]]:
        """Samples (or volume-major items) for a sequence of (unit, row or item), reading each needed row group
        once while it is in use."""
        if len(seq) == 0:
            return
        remaining = np.bincount(seq[:, 0], minlength=len(self.units))
        files: dict[str, pq.ParquetFile] = {}
        maps: dict[str, MappedFile] = {}  # local files: images of uncompressed chunks are used in place
        remote = None
        if self._remote is not None:  # cached, released after its last row group, the next one prefetched
            first_use = dict.fromkeys(seq[:, 0].tolist())
            remote = self._remote.reader([self.units[u][0] for u in first_use])
        cache: dict[int, tuple[list[dict], dict[str, np.ndarray], list[np.ndarray]]] = {}
        try:
            for u, r in seq.tolist():
                if u not in cache:
                    rel, g, _ = self.units[u]
                    if remote is not None:
                        files[rel] = remote.open(rel)
                    elif rel not in files:
                        files[rel] = pq.ParquetFile(self.path / rel, memory_map=True)
                        maps[rel] = MappedFile(self.path / rel)
                    rows, volumes = read_row_group(
                        files[rel], g, columns=self.columns, alloc=alloc, mapped=maps.get(rel), view=view
                    )
                    cache[u] = (rows, volumes, self.item_rows(u) if self.volume_major else [])
                rows, volumes, items = cache[u]
                if self.volume_major:
                    yield _item([rows[i] for i in items[r].tolist()], volumes)
                else:
                    yield _sample(rows[r], volumes)
                remaining[u] -= 1
                if remaining[u] == 0:
                    del cache[u], rows, volumes, items  # the volumes may be recycled (shared-memory slabs)
                    if remote is not None:
                        remote.unit_done(self.units[u][0])
        finally:
            if remote is not None:
                remote.close()
            else:
                for f in files.values():
                    f.close()
            for m in maps.values():
                m.close()


_VOLUME_KEYS = (
    "volume_id",
    "patient_id",
    "split",
    "image_shape",
    "image_dtype",
    "image_spacing",
    "image_affine_lps",
)


def _item(rows: list[dict[str, Any]], volumes: dict[str, np.ndarray]) -> dict[str, Any]:
    qs = [_sample(r, {}) for r in rows]
    item = {k: rows[0][k] for k in _VOLUME_KEYS if k in rows[0]}
    if volumes:
        item["image"] = volumes[rows[0]["volume_id"]]
    item["quintuples"] = qs
    return item


def _sample(row: dict[str, Any], volumes: dict[str, np.ndarray]) -> dict[str, Any]:
    s = {k: v for k, v in row.items() if not k.startswith("box_") or k in ("box_empty", "box_reason")}
    if "box_voxels" in row:
        s["box"] = None if row["box_voxels"] is None else {f: row.get(f"box_{f}") for f in _BOX_FIELDS}
    if volumes:
        s["image"] = volumes[row["volume_id"]]
    return s
