"""Outputs and inputs at a URL (``s3://bucket/prefix``, any fsspec protocol): the run lock and staging.

**Writing** (:func:`staged_output`: ``kneeprep rebuild --out s3://...``, ``kneeprep export ... s3://...``):

1. the run lock: ``<url>/.kneeprep-lock.json`` created by a *conditional* PUT (``If-None-Match: *``, s3fs's
   ``pipe_file(..., mode="create")``; S3 and moto answer 412 when it exists). It records host, pid, start time
   and a token. A second run gets a :class:`~kneeprep.errors.StoreError` naming the URL, the holder and what to
   do. A lock whose holder ran on this host and is no longer alive (kill -9) is stale and taken over; one from
   another host is cleared with ``--break-lock`` once you know that run is gone (or by deleting the object);
2. under the lock, what a killed run left (volumes without their marker, shard files no manifest lists) is
   deleted (:func:`kneeprep.formats.objstore.clean_remote`);
3. a local **staging folder** (``$KNEEPREP_STAGE_DIR``, else ``~/.cache/kneeprep/stage``, one sub-folder per
   URL) is made equal to the remote's complete state (:func:`~kneeprep.formats.objstore.pull`: only objects
   whose bytes differ are downloaded, so a staging folder kept between runs costs one listing);
4. the stage runs on the staging folder with the local code (rename, ``flock``, resume: unchanged); its
   tasks upload each volume and shard file as soon as they have written it (:mod:`kneeprep.publish`);
5. on success the remote is made equal to the staging folder (:func:`~kneeprep.formats.objstore.push`:
   what the tasks published is found equal), every volume and shards directory published by its completion
   record, written last.

A run that fails or is killed publishes nothing more (what its tasks published are complete volumes and shard
files no manifest lists yet); the next run starts again from step 1 and resumes from what is complete.

**Reading** (:func:`staged_input`: ``validate``, ``export``'s input, ``score``): the URL's complete state is
pulled into a staging folder, which the local code reads. ``ShardDataset`` reads URLs itself
(:mod:`kneeprep.loader.remote`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kneeprep import files
from kneeprep.errors import InputNotFoundError, StoreError
from kneeprep.formats import objstore
from kneeprep.formats.urls import as_local_or_url, url_filesystem
from kneeprep.publish import publishing

STAGE_ENV = "KNEEPREP_STAGE_DIR"
LOCK_OBJECT = ".kneeprep-lock.json"
#: the sibling of a volume store that travels with it (its report, boxes table, sources)
STORE_SIBLING = ".kneeprep"


def stage_root() -> Path:
    """``$KNEEPREP_STAGE_DIR``, else ``$XDG_CACHE_HOME/kneeprep/stage`` (``~/.cache/kneeprep/stage``)."""
    if os.environ.get(STAGE_ENV):
        return Path(os.environ[STAGE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kneeprep" / "stage"


def stage_path(url: str, role: str) -> Path:
    """The staging folder of ``url``: ``<stage root>/<role>-<hash of the URL>/<last part of the URL>``."""
    url = url.rstrip("/")
    h = hashlib.sha256(url.encode()).hexdigest()[:16]
    return stage_root() / f"{role}-{h}" / (url.rsplit("/", 1)[-1] or "root")


# -- the lock ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(fs, path: str) -> dict:
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def remote_lock(
    fs, root: str, url: str, what: str = "output", *, break_lock: bool = False, echo: Callable = print
) -> Iterator[dict]:
    """Hold ``<url>/.kneeprep-lock.json`` (created by a conditional PUT) for the block (module docstring)."""
    path = f"{root}/{LOCK_OBJECT}"
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    for attempt in range(2):
        try:
            fs.pipe_file(path, json.dumps(me).encode(), mode="create")
            break
        except FileExistsError:
            held = _read_lock(fs, path)
            stale = (
                held.get("host") == me["host"]
                and isinstance(held.get("pid"), int)
                and not _alive(held["pid"])
            )
            if attempt == 0 and (break_lock or stale):
                echo(
                    f"{url}: {'breaking' if break_lock else 'taking over the stale'} lock of pid "
                    f"{held.get('pid')} on {held.get('host')} (since {held.get('started')})"
                )
                fs.rm_file(path)
                continue
            who = (
                f"pid {held.get('pid')} on {held.get('host')}, since {held.get('started')}"
                if held
                else "unknown"
            )
            raise StoreError(
                f"{url}: another kneeprep run is writing to this {what} ({LOCK_OBJECT} held by {who}); "
                f"if that run is gone, re-run with --break-lock or delete {url}/{LOCK_OBJECT}"
            ) from None
        except OSError as e:
            raise StoreError(f"{url}: could not take the run lock {LOCK_OBJECT}: {e.strerror or e}") from e
    try:
        yield me
    finally:
        if _read_lock(fs, path).get("token") == me["token"]:
            with contextlib.suppress(OSError):
                fs.rm_file(path)


# -- staging ----------------------------------------------------------------------------------------------


def _is_store(fs, root: str) -> bool:
    try:
        doc = json.loads(fs.cat_file(f"{root}/{objstore.ZARR_JSON}"))
    except (OSError, ValueError):
        return False
    return doc.get("attributes", {}).get("kneeprep", {}).get("kind") == "volume_store"


@contextlib.contextmanager
def staged_output(
    url: str,
    *,
    what: str = "output",
    storage_options: dict[str, Any] | None = None,
    break_lock: bool = False,
    store: bool = False,
    echo: Callable = print,
    on_unit: Callable[[str], None] | None = None,
    inner: tuple[tuple[str, str], ...] = (),
) -> Iterator[Path]:
    """Lock ``url``, pull it into its staging folder, yield that folder, push it back when the block ends
    normally (module docstring). ``store=True``: ``url`` is a volume store, its ``.kneeprep`` sibling goes
    with it (the lock is in the sibling, so the store holds only zarr nodes). ``inner``: ``(relative
    prefix, what)`` of outputs inside ``url`` that a stage on its own also writes (``rebuild``: its store and
    its shards directory), whose locks are taken too, so that such a stage run at the same time is refused."""
    url = url.rstrip("/")
    fs, root = url_filesystem(url, storage_options)
    local = stage_path(url, "out")
    lock_root, lock_url = (root + STORE_SIBLING, url + STORE_SIBLING) if store else (root, url)
    with contextlib.ExitStack() as locks:
        for r, u, w in [(lock_root, lock_url, what)] + [(f"{root}/{p}", f"{url}/{p}", w) for p, w in inner]:
            locks.enter_context(remote_lock(fs, r, u, w, break_lock=break_lock, echo=echo))
        pairs = [(root, local)] + (
            [(root + STORE_SIBLING, local.with_name(local.name + STORE_SIBLING))] if store else []
        )
        for r, folder in pairs:
            junk = objstore.clean_remote(fs, r)
            if junk:
                echo(f"{url}: removed {len(junk)} object(s) a killed run left (nothing complete)")
            objstore.pull(fs, r, folder)
        with publishing(local, url, fs, storage_options):  # tasks publish what they write (kneeprep.publish)
            yield local
        for r, folder in pairs:
            objstore.push(folder, fs, r, on_unit=on_unit)


@contextlib.contextmanager
def staged_input(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    raw: bool = False,
    echo: Callable | None = None,
) -> Iterator[Path]:
    """Pull the complete state of ``url`` (a volume store: with its ``.kneeprep`` sibling) into its staging
    folder and yield the folder; an empty or missing URL is an ``InputNotFoundError`` naming it.

    ``raw=True``: ``url`` is an input tree (raw DICOM): every object is mirrored into ``<stage>/raw-<hash>``,
    each file with its object's modification time (:func:`kneeprep.formats.objstore.pull` ``mirror``), so a
    re-run -- on this machine or another -- finds unchanged series unchanged and downloads only what changed."""
    url = url.rstrip("/")
    fs, root = url_filesystem(url, storage_options)
    local = stage_path(url, "raw" if raw else "in")
    # one run at a time per staging copy (a second one would re-sync it under the first one's feet)
    with files.lock(local.parent, f"staging copy of {url} (another run reads it; or set ${STAGE_ENV})"):
        counts = objstore.pull(fs, root, local, mirror=raw)
        if not counts["objects"]:
            what = "no such prefix, or no objects" if raw else "no such prefix, or no published output"
            raise InputNotFoundError(f"{url}: nothing {'' if raw else 'complete '}here ({what})")
        if echo is not None:
            echo(f"{url}: {counts['objects']} objects in {local} ({counts['downloaded']} downloaded)")
        if not raw and _is_store(fs, root):
            objstore.pull(fs, root + STORE_SIBLING, local.with_name(local.name + STORE_SIBLING))
        yield local


def named_by_url(text: str, local: str | os.PathLike, url: str) -> str:
    """``text`` with the staging copy ``local``'s paths written as the objects of ``url`` they copy."""
    local = str(local)
    return text.replace(local + os.sep, url + "/").replace(local, url)


@contextlib.contextmanager
def local_or_staged_input(path: str | os.PathLike, **kw) -> Iterator[Path]:
    """``path`` itself when local (``file://`` URLs included), else :func:`staged_input`."""
    p = as_local_or_url(path)
    if isinstance(p, str):
        with staged_input(p, **kw) as local:
            yield local
    else:
        yield p


@contextlib.contextmanager
def local_or_staged_output(path: str | os.PathLike, **kw) -> Iterator[Path]:
    """``path`` itself when local (``file://`` URLs included), else :func:`staged_output` (``kw`` passed on)."""
    p = as_local_or_url(path)
    if isinstance(p, str):
        with staged_output(p, **kw) as local:
            yield local
    else:
        yield p
