"""What ``kneeprep export`` has to do: the input (shards or a store) turned into one :class:`VolumeTask` per
volume, each with its *source key* (:mod:`kneeprep.stages.export`, "Resuming"), the splits, raw paths and
warnings (:func:`plan_shards`, :func:`plan_store`)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kneeprep.errors import InputNotFoundError, StoreError, ValidationError
from kneeprep.formats.shard_reader import read_manifest
from kneeprep.formats.store import find_report, label_names, list_volumes, read_volume_attrs

#: Version of what export writes; part of every source key, so a change of it rewrites every volume.
EXPORT_VERSION = 1


def detect_input(path: str | os.PathLike) -> str:
    """``"shards"`` for a directory with ``manifest.json``, ``"store"`` for a kneeprep volume store."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return "shards"
    meta = p / "zarr.json"
    if meta.is_file():
        try:
            kind = (
                json.loads(meta.read_text(encoding="utf-8"))
                .get("attributes", {})
                .get("kneeprep", {})
                .get("kind")
            )
        except (OSError, ValueError) as e:
            raise StoreError(f"{meta}: unreadable zarr metadata: {e}") from e
        if kind == "volume_store":
            return "store"
        raise ValidationError(
            f"{p}: a zarr group, but not a kneeprep volume store (kneeprep.kind = {kind!r})"
        )
    raise InputNotFoundError(
        f"{p}: neither a shards directory (no manifest.json) nor a volume store (no zarr.json)"
    )


@dataclass(frozen=True)
class VolumeTask:
    """One volume to export: where its voxels (and mask) come from and where they go. Small and picklable."""

    volume_id: str
    source_key: str
    out_dir: str
    #: shards input: the shard file (absolute) and the row group holding the volume's image
    shard: str | None = None
    row_group: int | None = None
    #: store input: the store the image comes from; shards input with --store: the store of the mask
    store: str | None = None
    #: the label layer to export as mask (None: no mask)
    label_layer: str | None = None


def _key(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in (EXPORT_VERSION, *parts):
        h.update(json.dumps(p, sort_keys=True, default=str).encode() + b"\0")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    tasks: list[VolumeTask]
    split_of: dict[str, str]  # volume id -> split (shards input only)
    raw_path: dict[str, str]  # volume id -> raw series folder, when known
    warnings: dict[str, list[str]]  # volume id -> warnings (e.g. no mask in the store)


def _store_info(store: Path) -> tuple[set[str], dict[str, str]]:
    """The complete volumes of a store and the raw series folder of each, from its last convert report."""
    vids = set(list_volumes(store))
    raw: dict[str, str] = {}
    rep = find_report(store)
    if rep is not None:
        try:
            items = json.loads(rep.read_text(encoding="utf-8")).get("items", [])
        except (OSError, ValueError):
            items = []  # the report only adds raw paths; without it `path` stays empty
        raw = {i["item"]: i["source"] for i in items if i.get("source") and i.get("status") != "failed"}
    return vids, raw


def _mask_layer(store: Path, vid: str, layer: str | None) -> tuple[str | None, str | None]:
    """(layer to export or None, warning or None)."""
    names = label_names(store, vid)
    if not names:
        return None, f"no label layer in {store / vid}: no mask"
    if layer is None:
        return names[0], None
    if layer not in names:
        return None, f"no label layer {layer!r} in {store / vid} (has {', '.join(names)}): no mask"
    return layer, None


def plan_shards(shards: Path, out: Path, store: Path | None, layer: str | None) -> Plan:

    m = read_manifest(shards)
    store_vids, raw = _store_info(store) if store else (set(), {})
    tasks, split_of, warnings = [], {}, {}
    for e in m["shards"]:
        path = (shards / e["path"]).resolve()
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["volume_id", "split"])
            for vid, split in dict.fromkeys(
                zip(t.column("volume_id").to_pylist(), t.column("split").to_pylist(), strict=True)
            ):
                if vid in split_of:
                    raise ValidationError(
                        f"{path}: volume {vid} also in another shard or split ({split_of[vid]})"
                    )
                split_of[vid] = split
                mask_layer, mask_attrs = None, None
                if store is not None:
                    if vid in store_vids:
                        mask_layer, warn = _mask_layer(store, vid, layer)
                        mask_attrs = read_volume_attrs(store, vid).to_json() if mask_layer else None
                    else:
                        warn = f"volume {vid} is not in the store {store}: no mask"
                    if warn:
                        warnings[vid] = [warn]
                key = _key("shards", e["sha256"], vid, mask_layer, mask_attrs)
                tasks.append(
                    VolumeTask(
                        vid, key, str(out), str(path), g, str(store) if mask_layer else None, mask_layer
                    )
                )
    return Plan(tasks, split_of, {v: raw[v] for v in split_of if v in raw}, warnings)


def plan_store(store: Path, out: Path, layer: str | None) -> Plan:
    vids, raw = _store_info(store)
    tasks, warnings = [], {}
    for vid in sorted(vids):
        mask_layer, warn = _mask_layer(store, vid, layer)
        if warn:
            warnings[vid] = [warn]
        tasks.append(
            VolumeTask(
                vid,
                _key("store", read_volume_attrs(store, vid).to_json(), mask_layer),
                str(out),
                store=str(store),
                label_layer=mask_layer,
            )
        )
    return Plan(tasks, {}, {v: raw[v] for v in vids if v in raw}, warnings)
