"""kneeprep's outputs on an object store (``s3://``, any fsspec filesystem): publication without rename.

An object store has no ``rename(2)``: a volume of 20 objects or a shards directory cannot appear at once. So on
an object store **a unit counts as complete only when its completion record exists**, the record is written
last, and every reader lists by it:

- a **volume** (``<store>/<id>/...``, a top-level child group of a directory that holds the store's root
  ``zarr.json``): its group's own ``<store>/<id>/zarr.json`` is the marker. A zarr reader cannot open a group
  without it, and :func:`complete_state` (hence ``list_volumes`` on a pulled copy) lists only volumes that have
  it. A replaced volume loses its marker first, gets its objects, then the marker again;
- a **shards directory** (a folder holding ``manifest.json``): the manifest, written last, lists the complete
  shard files (``data/``, ``_volumes/``); files it does not list are never read and are deleted by the next run;
- every **other file** is one object (one PUT is atomic).

A writer builds the outputs in a local staging folder with the local code (rename + ``flock``, unchanged), then
:func:`push` makes the remote prefix equal to it: changed objects uploaded, markers last, stale objects
deleted. :func:`pull` makes a local folder equal to the remote's *complete* state (incomplete volumes and
unlisted shard files skipped), downloading only objects whose bytes differ; :func:`clean_remote` deletes what a
killed writer left (objects of volumes without a marker, shard files no manifest lists). Objects are compared by
MD5 against the ETag (single-part uploads), else through the staging folder's index of what was last synced.

Never mirrored: lock files, ``*.partial`` temporary files and the store's ``work/`` area.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kneeprep.errors import StoreError
from kneeprep.files import LOCK_FILE, PARTIAL, write_json

#: the staging folder's record of what was last synced (:class:`Index`)
INDEX_NAME = ".kneeprep-synced.json"  # suffix of the index beside a staging folder
NOTES_NAME = ".kneeprep-synced.d"  # suffix of the folder of what tasks published (kneeprep.publish)
MANIFEST = "manifest.json"
ZARR_JSON = "zarr.json"
SHARD_FOLDERS = ("data", "_volumes")


def skipped(rel: str) -> bool:
    """Never mirrored: lock files, temporary files, the store's work area, the staging index."""
    parts = rel.split("/")
    name = parts[-1]
    lock = name.startswith(LOCK_FILE) or (name.startswith(".kneeprep-") and name.endswith("-lock"))
    if lock or PARTIAL in rel or name == INDEX_NAME:
        return True
    return any(
        p.endswith(".kneeprep") and i + 1 < len(parts) and parts[i + 1] == "work" for i, p in enumerate(parts)
    )


@dataclass(frozen=True)
class Units:
    """How a set of relative paths divides into volumes (marker: the group's ``zarr.json``), shards
    directories (marker: ``manifest.json``) and plain files."""

    volumes: dict[str, list[str]]  # unit ("store/<id>") -> its paths
    shards: dict[str, list[str]]  # shards directory ("shards") -> its shard files (data/, _volumes/)
    plain: list[str]
    roots: frozenset[str] = frozenset()  # the stores' root zarr.json (uploaded before any volume)

    @staticmethod
    def of(rels: Iterable[str]) -> Units:
        rels = sorted(rels)
        present = set(rels)

        def parent(d: str) -> str:
            return posixpath.dirname(d)

        def has(d: str, name: str) -> bool:
            return (posixpath.join(d, name) if d else name) in present

        def ancestors(d: str) -> Iterable[str]:
            while d:
                d = parent(d)
                yield d

        # store roots: a directory holding zarr.json no ancestor of which holds one (the topmost zarr group;
        # push uploads it before any volume, so a partial upload still has it)
        roots = {parent(r) for r in rels if posixpath.basename(r) == ZARR_JSON}
        roots = {d for d in roots if d and not any(has(a, ZARR_JSON) for a in ancestors(d))} | (
            {""} if has("", ZARR_JSON) else set()
        )
        shard_dirs = {parent(r) for r in rels if posixpath.basename(r) == MANIFEST}
        volumes: dict[str, list[str]] = {}
        shards: dict[str, list[str]] = {}
        plain: list[str] = []
        for r in rels:
            unit = _volume_unit(r, roots)
            if unit is not None:
                volumes.setdefault(unit, []).append(r)
                continue
            d = _shard_dir(r, shard_dirs)
            if d is not None:
                shards.setdefault(d, []).append(r)
                continue
            plain.append(r)
        for d in shard_dirs:
            shards.setdefault(d, [])
        return Units(volumes, shards, plain, frozenset(marker(d) if d else ZARR_JSON for d in roots))


def _volume_unit(rel: str, roots: set[str]) -> str | None:
    for d in roots:
        inner = rel[len(d) + 1 :] if d else rel
        if d and not rel.startswith(d + "/"):
            continue
        parts = inner.split("/")
        if len(parts) >= 2 and parts[0] != "OME":
            return posixpath.join(d, parts[0]) if d else parts[0]
    return None


def _shard_dir(rel: str, shard_dirs: set[str]) -> str | None:
    for d in shard_dirs:
        inner = rel[len(d) + 1 :] if d else rel
        if (not d or rel.startswith(d + "/")) and inner.split("/")[0] in SHARD_FOLDERS:
            return d
    return None


def marker(unit: str) -> str:
    return posixpath.join(unit, ZARR_JSON)


def manifest_of(shard_dir: str) -> str:
    return posixpath.join(shard_dir, MANIFEST) if shard_dir else MANIFEST


# -- listing ----------------------------------------------------------------------------------------------


def list_remote(fs, root: str) -> dict[str, dict]:
    """Every object under ``root``: rel -> {"size", "etag"} (one listing; locks and partials skipped)."""
    fs.invalidate_cache()
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = path[len(root.rstrip("/")) + 1 :]
        if rel and not skipped(rel):
            out[rel] = object_info(info)
    return out


def object_info(info: dict) -> dict:
    """What kneeprep compares of an object, from an fsspec listing or ``info``: size, ETag, mtime."""
    return {
        "size": int(info.get("size") or 0),
        "etag": str(info.get("ETag") or "").strip('"'),
        "mtime": _mtime(info),
    }


def _mtime(info: dict) -> float | None:
    """An object's modification time (seconds since the epoch) from an fsspec listing, if it has one."""
    t = info.get("LastModified") or info.get("mtime") or info.get("created")
    if hasattr(t, "timestamp"):
        return t.timestamp()
    return float(t) if isinstance(t, int | float) else None


def list_local(folder: Path) -> dict[str, Path]:
    out = {}
    if not folder.is_dir():
        return out
    for dirpath, _, names in os.walk(folder):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(folder).as_posix()
            if not skipped(rel):
                out[rel] = p
    return out


def complete_state(fs, root: str, remote: dict[str, dict]) -> set[str]:
    """The objects a reader may trust: plain files, volumes with their marker, shard files their manifest
    lists (and the manifest)."""
    units = Units.of(remote)
    keep = set(units.plain)
    for unit, rels in units.volumes.items():
        if marker(unit) in remote:
            keep.update(rels)
    for d, rels in units.shards.items():
        m = manifest_of(d)
        if m not in remote:
            keep.discard(m)
            continue
        listed = {posixpath.join(d, p) if d else p for p in _read_manifest(fs, root, m)}
        keep.update(r for r in rels if r in listed)
    return keep


def _read_manifest(fs, root: str, rel: str) -> list[str]:
    """The shard files a manifest lists (each entry's ``path`` and ``volumes_path``)."""
    url = f"{root}/{rel}"
    try:
        doc = json.loads(fs.cat_file(url))
        return [e[k] for e in doc.get("shards", []) for k in ("path", "volumes_path") if e.get(k)]
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise StoreError(f"{url}: unreadable shard manifest: {e}") from e


def clean_remote(fs, root: str, remote: dict[str, dict] | None = None) -> list[str]:
    """Delete what a killed writer left: objects no complete unit holds. Call only under the run lock."""
    remote = list_remote(fs, root) if remote is None else remote
    junk = sorted(set(remote) - complete_state(fs, root, remote))
    _rm(fs, root, junk)
    return junk


# -- comparing --------------------------------------------------------------------------------------------


class Index:
    """The staging folder's record of the last sync: rel -> [size, mtime_ns, md5, etag]; kept beside the
    folder (``<folder>.kneeprep-synced.json``: a store holds only zarr nodes)."""

    def __init__(self, folder: Path, *, load: bool = True):
        self.path = folder.with_name(folder.name + INDEX_NAME)
        self.notes = folder.with_name(folder.name + NOTES_NAME)
        self.rows: dict[str, list] = {}
        if load:
            with contextlib.suppress(OSError, ValueError):
                self.rows = json.loads(self.path.read_text())
            for note in sorted(self.notes.glob("*.json")) if self.notes.is_dir() else ():
                with contextlib.suppress(OSError, ValueError):  # what tasks published (kneeprep.publish)
                    self.rows.update(json.loads(note.read_text()))

    def md5(self, rel: str, p: Path) -> str:
        st = p.stat()
        row = self.rows.get(rel)
        if row and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        h = hashlib.md5()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        self.rows[rel] = [st.st_size, st.st_mtime_ns, h.hexdigest(), None]
        return self.rows[rel][2]

    def same(self, rel: str, p: Path, obj: dict | None) -> bool:
        if obj is None or not p.is_file() or p.stat().st_size != obj["size"]:
            return False
        md5 = self.md5(rel, p)
        etag = obj["etag"]
        if etag and "-" not in etag:
            return etag == md5
        return bool(etag) and self.rows[rel][3] == etag  # multipart: as last synced

    def record(self, remote: dict[str, dict], local: dict[str, Path]) -> None:
        for rel, p in local.items():
            if rel in remote:
                self.md5(rel, p)
                self.rows[rel][3] = remote[rel]["etag"]
        self.rows = {r: v for r, v in self.rows.items() if r in local}
        write_json(self.path, self.rows)
        if self.notes.is_dir():
            shutil.rmtree(self.notes, ignore_errors=True)


# -- transfers --------------------------------------------------------------------------------------------


def _put(fs, root: str, pairs: list[tuple[Path, str]]) -> None:
    if pairs:
        fs.put([str(p) for p, _ in pairs], [f"{root}/{r}" for _, r in pairs])


def put_marker(fs, root: str, local: Path, rel: str) -> None:
    """Upload one completion record (a volume's ``zarr.json``, a manifest): the unit becomes complete."""
    fs.put_file(str(local), f"{root}/{rel}")


def _rm(fs, root: str, rels: Iterable[str]) -> None:
    rels = list(rels)
    if rels:
        fs.rm([f"{root}/{r}" for r in rels])


def publish_volume(fs, root: str, unit: str, local: dict[str, Path], remote: dict, changed, extra) -> bool:
    """Make one volume's objects equal to its local files: its marker deleted first (the volume leaves every
    listing before any of its objects changes), the ``changed`` files uploaded, the ``extra`` objects deleted,
    the marker uploaded last; returns whether the volume is published (False: it was removed)."""
    m = marker(unit)
    if m in remote:
        _rm(fs, root, [m])
    _put(fs, root, [(local[r], r) for r in changed if r != m])
    _rm(fs, root, [r for r in extra if r != m])
    if m in local:
        put_marker(fs, root, local[m], m)
        return True
    return False


def push(folder: Path, fs, root: str, *, on_unit: Callable[[str], None] | None = None) -> dict[str, int]:
    """Make the objects under ``root`` equal to the files of ``folder`` (skipped names aside), publishing
    each volume and shards directory by its marker, written last; returns counts."""
    try:
        return _push(folder, fs, root, on_unit)
    except OSError as e:
        raise StoreError(f"{root}: could not publish: {e.strerror or e}") from e


def _push(folder, fs, root, on_unit) -> dict[str, int]:
    local, remote = list_local(folder), list_remote(fs, root)
    index = Index(folder)
    lu, ru = Units.of(local), Units.of(remote)
    counts = {"volumes": 0, "volumes_removed": 0, "files": 0, "deleted": 0}

    def differing(rels: Iterable[str]) -> list[str]:
        return [r for r in rels if not index.same(r, local[r], remote.get(r))]

    _put(fs, root, [(local[r], r) for r in differing(sorted(lu.roots & set(local)))])

    for unit in sorted(set(lu.volumes) | set(ru.volumes)):
        mine, theirs = lu.volumes.get(unit, []), ru.volumes.get(unit, [])
        changed, extra = differing(mine), sorted(set(theirs) - set(mine))
        if not changed and not extra:
            continue
        if publish_volume(fs, root, unit, local, remote, changed, extra):
            counts["volumes"] += 1
        else:
            counts["volumes_removed"] += 1
        counts["files"] += len(changed)
        counts["deleted"] += len(extra)
        if on_unit is not None:
            on_unit(unit)
    for d in sorted(set(lu.shards) | set(ru.shards)):
        m = manifest_of(d)
        mine = lu.shards.get(d, []) + ([m] if m in local else [])
        changed = differing(mine)
        extra = sorted(set(ru.shards.get(d, [])) - set(mine))
        if not changed and not extra and (m in local) == (m in remote):
            continue
        if m in remote:
            _rm(fs, root, [m])
        _put(fs, root, [(local[r], r) for r in changed if r != m])
        if m in local:
            put_marker(fs, root, local[m], m)
        _rm(fs, root, extra + ([m] if m not in local and m in remote else []))
        counts["files"] += len(changed)
        counts["deleted"] += len(extra)
        if on_unit is not None:
            on_unit(d)
    # plain files: the top-level report last (a rebuild's report.json says the run ended)
    manifests = {manifest_of(d) for d in lu.shards}  # published above, last of their directory
    plain = sorted(
        (r for r in lu.plain if r not in lu.roots and r not in manifests),
        key=lambda r: (r == "report.json", r),
    )
    changed = differing(plain)
    _put(fs, root, [(local[r], r) for r in changed if r != "report.json"])
    if "report.json" in changed:
        put_marker(fs, root, local["report.json"], "report.json")
    # (a shards directory whose manifest was withdrawn lists as plain files remotely: not extra if local)
    extra = sorted(set(ru.plain) - set(local))
    _rm(fs, root, extra)
    counts["files"] += len(changed)
    counts["deleted"] += len(extra)
    index.record(list_remote(fs, root), local)
    return counts


def pull(fs, root: str, folder: Path, *, mirror: bool = False) -> dict[str, int]:
    """Make ``folder`` equal to the complete state of ``root`` (:func:`complete_state`): objects whose bytes
    differ downloaded, local files the remote does not hold as complete deleted; returns counts.

    ``mirror=True`` (an input tree, e.g. raw DICOM): every object is kept (no completion records), and each
    downloaded file gets its object's modification time, so that a fingerprint of names, sizes and mtimes
    (:func:`kneeprep.stages.resume.input_fingerprint`) is the same on every machine that pulls it."""
    try:
        return _pull(fs, root, folder, mirror)
    except OSError as e:
        raise StoreError(f"{root}: could not read: {e.strerror or e}") from e


def _pull(fs, root: str, folder: Path, mirror: bool = False) -> dict[str, int]:
    remote = list_remote(fs, root)
    keep = set(remote) if mirror else complete_state(fs, root, remote)
    local = list_local(folder)
    index = Index(folder)
    gone = sorted(set(local) - keep)
    for r in gone:
        local.pop(r).unlink()
    get = [r for r in sorted(keep) if not (r in local and index.same(r, local[r], remote[r]))]
    for r in get:
        (folder / r).parent.mkdir(parents=True, exist_ok=True)
    if get:
        fs.get([f"{root}/{r}" for r in get], [str(folder / r) for r in get])
    for r in get if mirror else ():
        if remote[r]["mtime"] is not None:
            os.utime(folder / r, (remote[r]["mtime"], remote[r]["mtime"]))
    _remove_empty_dirs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index.record(remote, list_local(folder))
    return {"downloaded": len(get), "deleted": len(gone), "objects": len(keep)}


def _remove_empty_dirs(folder: Path) -> None:
    if not folder.is_dir():
        return
    for dirpath, _, _ in os.walk(folder, topdown=False):
        if dirpath != str(folder) and not os.listdir(dirpath):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
