"""What a convert re-run keeps, redoes or removes: input fingerprints, content hashes, the "unchanged?"
decision (made in the task, not the driver), and the removal of volumes whose series vanished.

Decisions, per volume (docs/DESIGN.md, "Resume"):

* **unchanged** -- the stored ``provenance.convert_hash`` equals the recipe's and the stored
  ``source.fingerprint`` (file names, sizes, mtimes, series UID, the mask file's name, size and mtime: ``stat``
  only) equals the inputs'. With ``verify`` the input bytes are hashed too (:func:`content_hash`, no pixel
  decode) and must equal the stored ``source.content_hash``: catches in-place edits whose mtime was restored.
* **unchanged, fingerprint refreshed** -- the fingerprint differs but the content hash (computed while the task
  reads the series) does not: files touched or copied.
* otherwise the volume is (re)written.
* **removed** -- a volume converted from the same raw root (``<store>/sources.json``) whose series is no longer in
  the scan, or is now refused by QC or no longer selected: what a clean run would not have (:func:`vanished`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from kneeprep.errors import InputNotFoundError, KneeprepError
from kneeprep.files import sha256_file, write_json
from kneeprep.formats import store as vstore
from kneeprep.formats.report import ItemResult
from kneeprep.formats.volume_attrs import Source, VolumeAttrs

#: skipped kinds whose series a clean run would not convert: a stored volume of theirs is removed
NOT_CONVERTED = ("qc", "not_selected")


def source_of(info) -> str:
    """The series folder as an absolute path (the report's ``source``; export's ``path`` column): a path
    relative to where convert ran would mean nothing to a later command run elsewhere."""
    return os.path.abspath(info.files[0].parent) if info.files else ""


def _stat_entry(path: str | os.PathLike) -> list:
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def input_fingerprint(info, mask_path: str | os.PathLike | None) -> str:
    """Cheap identity of a series' inputs from ``stat`` alone (no pixel reads)."""
    try:
        entries = [_stat_entry(f) for f in info.files]
        mask = _stat_entry(mask_path) if mask_path else None
    except OSError as e:
        raise InputNotFoundError(f"{e.filename}: input disappeared since the scan ({e.strerror})") from None
    blob = json.dumps({"uid": info.series_uid, "files": entries, "mask": mask}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def series_key(info) -> str:
    """Identity of a scanned series from the scan's record alone (UID and file names; no ``stat``): what the
    driver remembers of an early start that the finished scan overruled. (``basename``: a ``Path`` made of each
    of a full-size series' 160 files was 0.4 ms of the driver's time per volume.)"""
    blob = json.dumps({"uid": info.series_uid, "files": [os.path.basename(f) for f in info.files]})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def content_hash(files, mask_path: str | os.PathLike | None = None) -> str:
    """sha256 over the series' file names and bytes (in slice order), then the mask file's. (The convert task
    computes the same while it reads the series: :func:`kneeprep.dicom.read_series` ``hasher``.)"""
    h = hashlib.sha256()
    for p in files:
        _hash_file(h, Path(p))
    return hash_mask(h, mask_path)


def _hash_file(h, p: Path) -> None:
    h.update(p.name.encode() + b"\0")
    try:
        sha256_file(p, h)
    except OSError as e:
        raise InputNotFoundError(f"{p}: cannot read input ({e.strerror})") from None


def hash_mask(h, mask_path) -> str:
    """Add the mask file (if any) to a content hash of the series' files; return the hash."""
    if mask_path:
        _hash_file(h, Path(mask_path))
    return h.hexdigest()[:16]


def stored_attrs(store: Path, volume_id: str) -> VolumeAttrs | None:
    """The stored volume's attrs; ``None`` when there is none, a bare record (the id only) when its metadata
    is unreadable or invalid (treated as changed: the volume is rewritten)."""
    try:
        return vstore.read_volume_attrs(store, volume_id)
    except InputNotFoundError:
        return None
    except KneeprepError:
        return VolumeAttrs(volume_id)


def same_recipe(previous: VolumeAttrs | None, convert_hash: str) -> bool:
    return previous is not None and previous.convert_hash == convert_hash


def refresh_source(store: Path, volume_id: str, previous: VolumeAttrs, fingerprint: str) -> None:
    """Record the current fingerprint of an unchanged volume (only when it differs)."""
    src = previous.source or Source()
    if src.fingerprint != fingerprint:
        vstore.update_volume_attrs(store, volume_id, source=dataclasses.replace(src, fingerprint=fingerprint))


def read_sources(store: Path) -> dict[str, str]:
    """``<store>/sources.json``: volume id -> the absolute raw tree it was last converted or checked from."""
    try:
        d = json.loads((vstore.kneeprep_dir(store) / vstore.SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}


def vanished(store: Path, raw_root: str, items: list[ItemResult]) -> list[ItemResult]:
    """Remove the volumes a clean run of this raw root would not have; return their ``removed`` records; then
    record in ``<store>/sources.json`` which tree each volume this run converted or kept came from.

    A stored volume is removed when ``sources.json`` says it came from ``raw_root`` (volumes of other trees,
    and volumes no finished run recorded, are left alone) and this run has no record of its series other than
    a QC refusal or not being selected: the series is gone from the tree (all its files or the folder
    deleted), now fails QC (e.g. a slice file deleted), or the recipe no longer selects it. A series that
    *failed* this run keeps its old volume (the run exits 1 for it anyway). Kept out of the volume attrs so
    that a volume does not depend on where its raw tree lives. Reads no volume attrs."""
    sources = read_sources(store)
    why = {r.item: r for r in items}
    keep = {r.item for r in items if not (r.status == "skipped" and r.kind in NOT_CONVERTED)}
    present = set(vstore.list_volumes(store))
    removed = []
    for vid in sorted(present - keep):
        if sources.get(vid) != raw_root:
            continue
        vstore.delete_volume(store, vid)
        present.discard(vid)
        r = why.get(vid)
        if r is not None:
            removed.append(
                ItemResult(vid, "removed", r.kind, f"{r.message}; its volume of an earlier run was removed",
                           0.0, r.source)
            )  # fmt: skip
        else:
            removed.append(
                ItemResult(vid, "removed", "vanished",
                           f"series no longer under {raw_root}; its volume of an earlier run was removed")
            )  # fmt: skip
    mine = {
        r.item for r in items if r.status == "written" or (r.status == "skipped" and r.kind == "unchanged")
    }
    new = {v: t for v, t in sources.items() if v in present} | {v: raw_root for v in mine if v in present}
    if new != sources:
        write_json(vstore.kneeprep_dir(store) / vstore.SOURCES_FILE, dict(sorted(new.items())))
    return removed
