"""Bringing a volume store written by an older kneeprep to the current layout (:func:`upgrade_store`).

Before the store was an OME collection (``docs/FORMATS.md``, "Volume store as OME-Zarr"), kneeprep kept its
own files inside it (``report.json``, ``boxes.parquet``, ``.kneeprep-lock``, the work area ``.kneeprep-tmp``),
the root had no OME metadata and the volumes' transforms were a scale only. Readers open such a store as it is
(volumes are where they were; :func:`kneeprep.formats.store.find_report` finds the old report); the writing
stages (convert, boxes) call :func:`upgrade_store` under the store's lock before they write.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kneeprep.files import LOCK_FILE, write_json
from kneeprep.formats import ome
from kneeprep.formats import store as vstore
from kneeprep.geometry import Geometry


def upgrade_store(store: str | os.PathLike) -> list[str]:
    """Bring a store written by an older kneeprep to this layout; returns what was done (empty: nothing).

    Moves ``report.json`` and ``boxes.parquet`` from inside the store to :func:`kneeprep.formats.store.kneeprep_dir`, removes the old
    work area (``.kneeprep-tmp``: only leftovers of killed writes) and lock file, and when the root has no OME
    metadata writes it and rewrites every volume's ``ome`` attributes from its geometry (translation added).
    Call holding the store's lock (the convert and boxes stages do)."""
    root = vstore.check_store(store)
    done = []
    side = vstore.kneeprep_dir(root)
    for name in vstore.LEGACY_FILES:
        old = root / name
        if old.is_file():
            side.mkdir(exist_ok=True)
            if (side / name).exists():
                old.unlink()
            else:
                os.replace(old, side / name)
            done.append(f"moved {name} to {side}")
    if (root / vstore.LEGACY_WORK_DIR).is_dir():
        shutil.rmtree(root / vstore.LEGACY_WORK_DIR, ignore_errors=True)
        done.append(f"removed {vstore.LEGACY_WORK_DIR}")
    if (root / LOCK_FILE).is_file():
        (root / LOCK_FILE).unlink(missing_ok=True)
        done.append(f"removed {LOCK_FILE}")
    meta = vstore.read_metadata(root / "zarr.json")
    if "ome" not in meta.get("attributes", {}):
        for vid in vstore.list_volumes(root):
            _rewrite_ome(root, vid)
        meta["attributes"]["ome"] = ome.root_attrs()
        write_json(root / "zarr.json", meta, sort_keys=False)
        done.append("wrote the OME metadata of the root and every volume")
    vstore.sync_collection(root)
    return done


def _rewrite_ome(root: Path, volume_id: str) -> None:
    p = vstore.volume_path(root, volume_id)
    meta = vstore.read_metadata(p / "zarr.json")
    attrs = meta["attributes"]
    geometry = Geometry.from_json(attrs["kneeprep"]["geometry"])
    attrs["ome"] = ome.image_attrs(volume_id, geometry)
    write_json(p / "zarr.json", meta, sort_keys=False)
    layers = attrs["kneeprep"].get("labels") or {}
    for name in vstore.label_names(root, volume_id):
        lmeta = vstore.read_metadata(p / "labels" / name / "zarr.json")
        old = lmeta["attributes"].get("ome", {}).get("image-label", {}).get("properties", [])
        label_map = (layers.get(name) or {}).get("label_map") or {q["label-value"]: q["name"] for q in old}
        lmeta["attributes"]["ome"] = ome.label_attrs(
            name, geometry, {int(k): v for k, v in label_map.items()}
        )
        write_json(p / "labels" / name / "zarr.json", lmeta, sort_keys=False)
