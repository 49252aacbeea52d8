"""The Zarr v3 volume store: one group per volume, written atomically, an OME-Zarr 0.5 collection.

This module is the store's API: the root (:func:`init_store`, :func:`sync_collection`) and writing volumes
here; where things are and listing in :mod:`kneeprep.formats.store_paths`, reading volumes and their attrs
(:class:`~kneeprep.formats.volume_attrs.VolumeAttrs`) in :mod:`kneeprep.formats.store_read`; both re-exported.

Layout (``docs/DESIGN.md``, "Volume store"; the OME side in ``docs/FORMATS.md``, "Volume store as OME-Zarr")::

    volumes.zarr/                  root group, attrs {"ome": {bioformats2raw.layout 3}, "kneeprep": {"kind": ...}}
      OME/                         group, attrs {"ome": {"series": [<volume_id>, ...]}}
      <volume_id>/                 group, attrs {"ome": {multiscales}, "kneeprep": {...}}
        image                      array (z, y, x)
        labels/                    group, attrs {"ome": {"labels": [<name>, ...]}}
          <name>/                  group, attrs {"ome": {multiscales, "image-label"}}
            0                      array (z, y, x), same grid as image
    volumes.zarr.kneeprep/         kneeprep's own files, beside the store (:func:`kneeprep_dir`)
      report.json                  the last convert run's report (:func:`report_path`)
      boxes.parquet                every volume's boxes (:func:`boxes_table_path`)
      .kneeprep-lock               held (flock) by the run writing this store
      work/                        volumes being written (:func:`work_dir`)

Only zarr nodes are inside the store (zarr-python 3 warns about every other entry, dotted ones too); the
sibling folder is on the same filesystem, so volumes rename from its work area into the store. A store moved
without it is complete. Older stores: :mod:`kneeprep.formats.store_upgrade`; :func:`find_report` reads both.

**Atomicity.** :func:`write_volume` builds the whole group under ``<work>/<volume_id>.<uuid>.partial`` (a zarr
group of its own: v3 nodes do not record their path) and renames it to ``<volume_id>`` -- one ``rename(2)`` on
the same filesystem. Replacing a volume moves the old group aside first (``.old``) and deletes it after the new
one is in place, so a reader sees the old volume, the new one, or (for the instant between the two renames, or
after a crash there) none, never a mixture. A crashed or interrupted writer leaves only ``.partial``/``.old``
entries in the work area, which :func:`clean_work_area` removes at the start of the next run. Local
filesystems only; on an object store (no rename) a volume is published from a local staging copy with its
group's ``zarr.json`` written last (:mod:`kneeprep.formats.objstore`).

**Chunks and codec** (chosen by measurement, see ``docs/DESIGN.md`` "Chunks and codec"): whole in-plane slabs
of about 4 MiB along array axis 0 (16 slices of a 384x384 uint16 DESS), Blosc zstd level 3 with bit-shuffle
(~2.8x smaller on MR; 0.14 s of one core to write a 160x384x384 volume, 0.05 s to read it), written one slab
of chunks at a time (peak memory: one chunk, not 1.7 volumes). Each chunk is compressed on
``KNEEPREP_CODEC_THREADS`` Blosc threads when that variable is set (:func:`codec_threads`; local convert
workers get cores / workers): zarr encodes one chunk per call here, so without them a worker that has
cores to spare compresses on one.

**OME-Zarr** (:mod:`kneeprep.formats.ome`). The root is a bioformats2raw collection whose ``OME`` group lists
the volumes (:func:`sync_collection`, run by the convert driver at the end of a run, under the store lock:
volume tasks never touch it). Each volume group carries 0.5 ``multiscales`` with one level (path ``image``,
axes z/y/x in millimetres, ``scale`` = spacing, ``translation`` = where voxel (0, 0, 0) lies) and its label
layers ``image-label`` metadata with the label names, so napari-ome-zarr can open image and labels. OME 0.5
has no rotation; the exact geometry is ``kneeprep.geometry.affine_lps``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec

from kneeprep import FORMAT_VERSION
from kneeprep.errors import StoreError
from kneeprep.files import LOCK_FILE, write_json
from kneeprep.formats import ome
from kneeprep.formats.store_paths import (  # re-exported: importers use kneeprep.formats.store
    KNEEPREP_DIR_SUFFIX,
    LEGACY_FILES,
    LEGACY_WORK_DIR,
    REPORT_NAME,
    SOURCES_FILE,
    WORK_DIR_NAME,
    boxes_table_path,
    check_store,
    clean_work_area,
    find_report,
    is_volume_name,
    kneeprep_dir,
    list_volumes,
    read_metadata,
    report_path,
    volume_path,
    work_dir,
)
from kneeprep.formats.store_read import (  # re-exported, as above
    PHI_KEYWORDS,
    attrs_cache,
    derived_once,
    jsonable,
    label_names,
    open_image,
    read_attrs,
    read_labels,
    read_volume,
    read_volume_attrs,
    refuse_phi,
    update_attrs,
    update_volume_attrs,
)
from kneeprep.formats.volume_attrs import VolumeAttrs
from kneeprep.geometry import Geometry

ROOT_ATTRS = {"format_version": FORMAT_VERSION, "kind": "volume_store"}
#: bytes of uncompressed data per chunk we aim for (rounded to a power-of-two number of slices).
CHUNK_TARGET_BYTES = 1 << 22


#: environment variable: Blosc threads per process for chunk compression (unset: numcodecs' default, one
#: thread off the main thread, which is where zarr encodes).
CODEC_THREADS_ENV = "KNEEPREP_CODEC_THREADS"


def codec_threads() -> int:
    """Blosc threads :func:`write_volume` compresses with: ``KNEEPREP_CODEC_THREADS`` (1 when unset or bad)."""
    try:
        return max(1, int(os.environ.get(CODEC_THREADS_ENV, "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def _blosc_threads(n: int) -> Iterator[None]:
    """Let numcodecs' Blosc use ``n`` threads (from any thread) for the duration; restored afterwards.

    c-blosc then writes compressed blocks in completion order: the chunk bytes vary run to run, the values
    never do (nothing compares store chunks byte for byte; shards are built from decoded values)."""
    if n <= 1:
        yield
        return
    previous = blosc.use_threads, blosc.get_nthreads()
    blosc.use_threads = True
    blosc.set_nthreads(n)
    try:
        yield
    finally:
        blosc.use_threads = previous[0]
        blosc.set_nthreads(previous[1])


def _codec():
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def choose_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    """Whole ``(y, x)`` planes, a power-of-two number of them closest to :data:`CHUNK_TARGET_BYTES`.

    >>> choose_chunks((160, 384, 384), 2), choose_chunks((160, 384, 384), 4), choose_chunks((32, 256, 256), 1)
    ((16, 384, 384), (8, 384, 384), (32, 256, 256))
    """
    plane = max(1, shape[1] * shape[2] * itemsize)
    n = 2 ** max(0, round(math.log2(max(1.0, CHUNK_TARGET_BYTES / plane))))
    return (int(min(shape[0], n)), int(shape[1]), int(shape[2]))


# ----------------------------------------------------------------------------------------------------------
# the store itself


def init_store(path: str | os.PathLike) -> Path:
    """Create the store's root group (an empty OME collection) if needed; refuse a directory that is
    something else."""
    p = Path(path)
    meta = p / "zarr.json"
    if meta.is_file():
        kind = read_metadata(meta).get("attributes", {}).get("kneeprep", {}).get("kind")
        if kind != "volume_store":
            raise StoreError(f"{p}: a zarr group, but not a kneeprep volume store (kneeprep.kind = {kind!r})")
        return p
    leftovers = (LEGACY_WORK_DIR, LOCK_FILE)  # an older kneeprep's first run, killed before the root was made
    if p.exists() and (not p.is_dir() or any(e.name not in leftovers for e in os.scandir(p))):
        raise StoreError(
            f"{p}: exists and is not a kneeprep volume store (no zarr.json); refusing to write into it"
        )
    p.mkdir(parents=True, exist_ok=True)
    zarr.open_group(
        str(p), mode="w", zarr_format=3, attributes={"ome": ome.root_attrs(), "kneeprep": dict(ROOT_ATTRS)}
    )
    sync_collection(p)
    return p


def sync_collection(store: str | os.PathLike) -> list[str]:
    """Make the ``OME`` group's ``series`` the store's volumes (sorted); returns them.

    Written atomically (:func:`kneeprep.files.write_json`) and only when it changed. Call from one process
    holding the store's lock -- the convert driver at the end of a run --, never from volume tasks."""
    root = check_store(store)
    volumes = list_volumes(root)
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": ome.series_attrs(volumes)}}
    meta = root / ome.OME_GROUP / "zarr.json"
    try:
        current = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current != doc:
        write_json(meta, doc, sort_keys=False)
    return volumes


# ----------------------------------------------------------------------------------------------------------
# writing


def write_volume(
    store: str | os.PathLike,
    volume_id: str,
    image: np.ndarray,
    geometry: Geometry,
    attrs: VolumeAttrs | Mapping[str, Any],
    labels: Mapping[str, tuple[np.ndarray, Mapping[int, str]]] | None = None,
) -> Path:
    """Write one volume group atomically and return its path; an existing volume of that id is replaced.

    ``attrs`` are the ``kneeprep`` attributes (a record or JSON-able; ``geometry`` is filled in from ``geometry``);
    ``labels`` maps a layer name to ``(label array on the same grid, label map)``.
    """
    root = Path(store)
    if not (root / "zarr.json").is_file():
        raise StoreError(f"{root}: not an initialised volume store (call init_store first)")
    if not is_volume_name(volume_id):
        raise StoreError(f"{root}: bad volume id {volume_id!r}")
    if image.shape != geometry.shape:
        raise StoreError(
            f"{root / volume_id}: image shape {image.shape} differs from its geometry {geometry.shape}"
        )
    labels = dict(labels or {})
    for name, (arr, _) in labels.items():
        if arr.shape != image.shape:
            raise StoreError(
                f"{root / volume_id}: label layer {name!r} has shape {arr.shape}, image {image.shape}"
            )
    if isinstance(attrs, VolumeAttrs):
        attrs = attrs.to_json()
    meta = jsonable({**attrs, "geometry": geometry.to_json()})
    refuse_phi(meta, root / volume_id)
    work = work_dir(root)
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f"{volume_id}.{uuid.uuid4().hex[:12]}.partial"
    try:
        group = zarr.open_group(
            str(tmp),
            mode="w-",
            zarr_format=3,
            attributes={"ome": ome.image_attrs(volume_id, geometry), "kneeprep": meta},
        )
        _write_array(group, "image", image)
        if labels:
            lg = group.create_group("labels", attributes={"ome": ome.labels_attrs(labels)})
            for name, (arr, label_map) in labels.items():
                layer = lg.create_group(name, attributes={"ome": ome.label_attrs(name, geometry, label_map)})
                _write_array(layer, "0", arr)
        _install(tmp, root / volume_id)
    except StoreError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # ENOSPC, EDQUOT, EIO ... while writing the work copy: name the volume, leave nothing
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(
            f"{root / volume_id}: could not write the volume: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename else "")
            + "; the partial copy was removed, no volume was written"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / volume_id


def _write_array(group, name: str, data: np.ndarray) -> None:
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=choose_chunks(data.shape, data.dtype.itemsize),
        compressors=[_codec()],
        fill_value=0,
        dimension_names=("z", "y", "x"),
        # the all-zero chunks are left out here instead (below): zarr's own test of each chunk against the
        # fill value (np.array_equal, 12 ms per 4.7 MB chunk under a profiler) cost 0.01-0.05 s of CPU per
        # DESS volume more than this (side by side)
        config={"write_empty_chunks": True},
    )
    # One slab of chunks per call: zarr encodes every chunk of a call concurrently and holds a copy of each,
    # so a whole-volume assignment would add 1.7x the volume to peak memory; per slab it is one chunk, as fast.
    # A slab is exactly one chunk (whole planes, choose_chunks): an all-zero one is not written and reads as
    # the fill value -- the same files zarr's default writes.
    step = arr.chunks[0]
    with _blosc_threads(codec_threads()):
        for i in range(0, data.shape[0], step):
            slab = data[i : i + step]
            if slab.any():
                arr[i : i + step] = slab


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted afterwards."""
    old = None
    if final.exists():
        old = tmp.with_name(tmp.name.replace(".partial", ".old"))
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if old is not None:
            os.rename(old, final)
        raise StoreError(f"{final}: could not move the new volume into place: {e}") from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def delete_volume(store: str | os.PathLike, volume_id: str) -> None:
    """Remove a volume: moved into the work area first, so it disappears from listings at once."""
    p = volume_path(store, volume_id)
    gone = work_dir(store) / f"{volume_id}.{uuid.uuid4().hex[:12]}.old"
    gone.parent.mkdir(parents=True, exist_ok=True)
    os.rename(p, gone)
    shutil.rmtree(gone, ignore_errors=True)


__all__ = [
    "CHUNK_TARGET_BYTES", "CODEC_THREADS_ENV", "KNEEPREP_DIR_SUFFIX", "LEGACY_FILES", "LEGACY_WORK_DIR",
    "PHI_KEYWORDS", "REPORT_NAME", "ROOT_ATTRS", "SOURCES_FILE", "WORK_DIR_NAME", "VolumeAttrs",
    "attrs_cache", "boxes_table_path", "check_store", "choose_chunks", "clean_work_area", "codec_threads",
    "delete_volume", "derived_once", "find_report", "init_store", "is_volume_name", "jsonable",
    "kneeprep_dir", "label_names", "list_volumes", "open_image", "read_attrs", "read_labels", "read_metadata",
    "read_volume", "read_volume_attrs", "refuse_phi", "report_path", "sync_collection", "update_attrs",
    "update_volume_attrs", "volume_path", "work_dir", "write_volume",
]  # fmt: skip
