"""Publication from the tasks: what a task wrote into the staging folder goes to the object store at once.

A run into a URL (:func:`kneeprep.remote.staged_output`) builds its outputs in a local staging folder and, at
the end, the driver makes the URL equal to it (:func:`kneeprep.formats.objstore.push`). Uploading every volume
from the driver at the end would put the run's largest transfer on one process, after all the work. So while
the run lasts, the **task** that wrote a unit uploads it, right after writing it, from the worker it ran on:

- a convert task whose volume was ``written``, and a boxes task that ``recomputed`` a volume's boxes,
  publish that volume (:func:`kneeprep.formats.objstore.publish_volume`: marker deleted first, changed
  objects, marker last);
- a shards task uploads its two shard files (one PUT each) -- the driver has withdrawn the old manifest
  before the first shard task starts, so no reader takes a new shard file for one of the old set, and the new
  manifest is published by the driver's final push, last.

Each task leaves a note of what it uploaded (size, mtime, MD5, ETag per file) beside the staging folder
(``<folder>.kneeprep-synced.d/``); the final push reads the notes and finds those objects equal without
hashing them again, so it uploads only what no task published: the store's listing, the reports, the boxes
table, the manifest, volumes whose source record was merely refreshed. A task whose upload fails records a
warning; its unit is published by the final push.

The driver registers the staging folder (:func:`publishing`, done by ``staged_output``) and the stages ask
:func:`publisher_for` whether the folder they write is one, passing the picklable :class:`Publisher` to their
tasks. Not for ``memory://``: that filesystem lives in one process, so there the driver publishes everything.
The workers must see the staging folder (local workers do; with ``--scheduler``, a shared filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kneeprep.errors import KneeprepError
from kneeprep.files import write_json
from kneeprep.formats import objstore
from kneeprep.formats.urls import url_filesystem

_REGISTRY: dict[str, Publisher] = {}  # staging folder (absolute) -> its publisher, in the driver
_FS: dict[str, tuple[Any, str]] = {}  # per process: the filesystem of a publisher (s3fs is costly to make)


@dataclass(frozen=True)
class Publisher:
    """Where the staging folder ``folder`` is published: ``url`` (picklable; sent to the tasks)."""

    folder: str
    url: str
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def _fs(self) -> tuple[Any, str]:
        key = json.dumps([self.url, self.storage_options], sort_keys=True, default=str)
        if key not in _FS:
            _FS[key] = url_filesystem(self.url, self.storage_options)
        return _FS[key]

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the staging folder, with ``/``."""
        return Path(os.path.abspath(path)).relative_to(self.folder).as_posix()

    def volume(self, store: str | os.PathLike, vid: str) -> None:
        """Publish the volume ``vid`` of the store at ``store`` (inside the staging folder)."""
        fs, root = self._fs()
        unit = self.rel(Path(store) / vid)
        folder = Path(self.folder)
        local = {f"{unit}/{r}": p for r, p in objstore.list_local(folder / unit).items()}
        remote = {f"{unit}/{r}": o for r, o in objstore.list_remote(fs, f"{root}/{unit}").items()}
        index = objstore.Index(folder, load=False)
        changed = [r for r in sorted(local) if not index.same(r, local[r], remote.get(r))]
        extra = sorted(set(remote) - set(local))
        if not changed and not extra:
            return
        self._guard(lambda: objstore.publish_volume(fs, root, unit, local, remote, changed, extra))
        after = {f"{unit}/{r}": o for r, o in objstore.list_remote(fs, f"{root}/{unit}").items()}
        self._note(unit, local, after)

    def files(self, base: str | os.PathLike, rels: Iterable[str]) -> None:
        """Upload single files (one PUT each is atomic), ``rels`` relative to ``base``."""
        fs, root = self._fs()
        local = {self.rel(Path(base) / r): Path(base) / r for r in rels}
        self._guard(lambda: fs.put([str(p) for p in local.values()], [f"{root}/{r}" for r in local]))
        after = {r: objstore.object_info(fs.info(f"{root}/{r}")) for r in local}
        self._note("\n".join(sorted(local)), local, after)

    def withdraw(self, path: str | os.PathLike) -> None:
        """Delete the object of ``path`` (a completion record, e.g. a shards manifest) if it exists."""
        fs, root = self._fs()
        url = f"{root}/{self.rel(path)}"

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(url)

        self._guard(rm)

    def root(self, store: str | os.PathLike) -> None:
        """Upload a store's root ``zarr.json`` unless the object store has it already (before any volume: a
        listing recognizes volumes by it)."""
        fs, root = self._fs()
        rel = self.rel(Path(store) / objstore.ZARR_JSON)
        try:
            obj = objstore.object_info(fs.info(f"{root}/{rel}"))
        except FileNotFoundError:
            obj = None
        if not objstore.Index(Path(self.folder), load=False).same(rel, Path(store) / objstore.ZARR_JSON, obj):
            self.files(store, [objstore.ZARR_JSON])

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            raise KneeprepError(f"{self.url}: could not publish: {e.strerror or e}") from e

    def _note(self, name: str, local: dict[str, Path], remote: dict[str, dict]) -> None:
        """Record what was uploaded for the final push: ``[size, mtime_ns, md5, etag]`` per file, the MD5 being
        the ETag of a single-part upload (of the bytes just sent: nothing hashed again)."""
        rows = {}
        for r, p in local.items():
            obj = remote.get(r)
            st = p.stat()
            if obj is not None and obj["size"] == st.st_size and obj["etag"]:
                etag = obj["etag"]
                rows[r] = [st.st_size, st.st_mtime_ns, "" if "-" in etag else etag, etag]
        notes = Path(self.folder).with_name(Path(self.folder).name + objstore.NOTES_NAME)
        notes.mkdir(parents=True, exist_ok=True)
        write_json(notes / f"{hashlib.sha1(name.encode()).hexdigest()}.json", rows)


def publisher_for(path: str | os.PathLike) -> Publisher | None:
    """The publisher of the registered staging folder that holds ``path``, else None (a local output)."""
    p = os.path.abspath(path)
    for folder, pub in _REGISTRY.items():
        if p == folder or p.startswith(folder + os.sep):
            return pub
    return None


def publish_or_warn(fn, *args) -> tuple[str, ...]:
    """Run a publication; a failure of any kind is a warning (the final push publishes the unit, or fails
    with a clear error), never a failed task."""
    try:
        fn(*args)
    except KneeprepError as e:
        return (f"{e}; the end of the run publishes it",)
    except Exception as e:  # a storage library's own error type (botocore, aiohttp): still only a warning
        return (f"could not publish: {type(e).__name__}: {e}; the end of the run publishes it",)
    return ()


@contextlib.contextmanager
def publishing(folder: Path, url: str, fs, storage_options: dict[str, Any] | None) -> Iterator[None]:
    """Register ``folder`` as the staging folder of ``url`` for the block (not for ``memory://``)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if "memory" in protocols:
        yield
        return
    key = os.path.abspath(folder)
    _REGISTRY[key] = Publisher(key, url, storage_options)
    try:
        yield
    finally:
        _REGISTRY.pop(key, None)
