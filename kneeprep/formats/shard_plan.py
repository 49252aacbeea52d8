"""Shard boundaries decided before any byte is written, and the files' names (``docs/SHARDS.md``, "Layout").

The shards stage plans every shard in the driver from what is known up front -- each volume's uncompressed
size, ``prod(shape) * itemsize`` from its attrs -- so that each shard is one independent task (read its
volumes, write its files) and the ``-of-N`` count of the Hugging Face file names is known before the first
task starts. Rules, per split, over quintuples in :func:`kneeprep.formats.quintuples.quintuple_order`:

* a **row group** holds whole volumes, adding volumes while their uncompressed bytes stay within
  ``min(row_group_bytes, target_bytes)`` (at least one volume);
* a **shard** is closed after the row group that brings its uncompressed image bytes to ``target_bytes``
  (so a compressed shard is smaller than ``target_bytes`` by its compression ratio).

The plan depends only on the quintuples and the volume sizes, never on where or in which order tasks run:
the same inputs give the same files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

from kneeprep.errors import ValidationError
from kneeprep.formats.quintuples import Quintuple, quintuple_order
from kneeprep.formats.splits import SPLITS

#: kneeprep split name -> Hugging Face split name (file names and the card's ``configs``; rows keep kneeprep's)
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
#: the quintuples config (rows; each volume's voxels on its first row in a shard): ``data/<hf split>-...``
DATA_DIR = "data"
#: the volumes config (one row per volume): ``_volumes/<hf split>-...`` -- the leading ``_`` keeps it out of
#: ``pyarrow.dataset.dataset(SHARDS)`` (which skips ``_`` and ``.`` names), so the root reads as quintuples only
VOLUMES_DIR = "_volumes"


def shard_name(split: str, index: int, count: int, folder: str = DATA_DIR) -> str:
    """``data/train-00000-of-00004.parquet`` (Hugging Face Hub naming, split mapped by :data:`HF_SPLITS`)."""
    return f"{folder}/{HF_SPLITS[split]}-{index:05d}-of-{count:05d}.parquet"


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its split, file names and row groups (each a list of (volume id, its quintuples))."""

    split: str
    path: str
    volumes_path: str
    groups: tuple[tuple[tuple[str, tuple[Quintuple, ...]], ...], ...]

    @property
    def volume_ids(self) -> list[str]:
        return [vid for g in self.groups for vid, _ in g]


def plan_shards(
    quintuples: Iterable[Quintuple],
    nbytes: Mapping[str, int],
    target_bytes: int,
    row_group_bytes: int,
) -> list[ShardPlan]:
    """Every shard of every split, in manifest order (split, then index). ``nbytes[volume_id]`` is each
    volume's uncompressed size (``VolumeAttrs.nbytes``)."""
    qs = sorted(quintuples, key=quintuple_order)
    rg_limit = min(row_group_bytes, target_bytes)
    plans: list[ShardPlan] = []
    for split, rows in groupby(qs, key=lambda q: q.split):
        if split not in SPLITS:
            raise ValidationError(f"quintuple split {split!r} is not one of {', '.join(SPLITS)}")
        shards: list[list[tuple]] = []
        shard: list[tuple] = []
        group: list[tuple] = []
        shard_bytes = group_bytes = 0
        for vid, vqs in groupby(rows, key=lambda q: q.volume_id):
            n = int(nbytes[vid])
            if group and group_bytes + n > rg_limit:
                shard.append(tuple(group))
                shard_bytes += group_bytes
                group, group_bytes = [], 0
                if shard_bytes >= target_bytes:
                    shards.append(shard)
                    shard, shard_bytes = [], 0
            group.append((vid, tuple(vqs)))
            group_bytes += n
        if group:
            shard.append(tuple(group))
        if shard:
            shards.append(shard)
        plans += [
            ShardPlan(split, shard_name(split, i, len(shards)), shard_name(split, i, len(shards), VOLUMES_DIR),
                      tuple(groups))
            for i, groups in enumerate(shards)
        ]  # fmt: skip
    return plans
