"""The scan as tasks: the driver splits the tree into parts, workers read the headers, the driver reconciles.

:func:`scan_tree` is the scan every caller uses, in this process (``executor=None`` or a serial executor) or
on a Dask cluster. The plan, the records and the result are the same either way:

1. **Plan** (driver, directories only): the tree is listed breadth-first, directories only, until at least
   :data:`MIN_PARTS` directories are unlisted (or the tree ends). Each listed directory that holds files is a
   *flat* part (its own files), each unlisted one a *tree* part (everything below it); in ``os.walk`` order.
   The OAI layout ``<visit>/<release>/<patient>/...`` gives about one part per patient folder.
2. **Tasks** (workers): runs of consecutive parts of about :data:`BATCH_FILES` files, each cut when a worker
   thread is free (:class:`Batcher`: a part the plan did not list counts as the mean size of those read so
   far, and a task takes at most as many such parts as have been read). A task lists its parts, reads every
   file's header, groups them into series (:func:`kneeprep.dicom.scan.describe`) and returns compact records: each series (a
   :class:`~kneeprep.dicom.SeriesInfo`, its file paths included) with its group key, each folder's group keys,
   the unreadable files and two counts. No per-file header crosses the wire.
3. **Reconcile** (driver): a series whose files sit in folders of several parts (a SeriesInstanceUID spread over
   patient folders, rare) is described again from all of those folders in one more task: the folders that
   share groups, closed transitively, so the record is what a scan of the whole tree in one process says
   (what ``describe`` says of a group depends only on the folders holding it). Then volume ids are made
   unique over the whole tree (:func:`kneeprep.dicom.scan.unique_ids`).

The driver keeps the series records (their file paths: about 100-150 bytes per file) and one small record per
folder; never a file's header.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kneeprep.dicom.qc import QC
from kneeprep.dicom.scan import ScanResult, SeriesInfo, describe, group_key, read_folder, unique_ids
from kneeprep.errors import InputNotFoundError

#: the plan lists directories until at least this many are left for the workers to walk
MIN_PARTS = 64
#: ... or this many levels below the root have been listed
MAX_PLAN_DEPTH = 8
#: folders listed by the plan are read by one task until it holds this many files (a task costs the driver
#: a few milliseconds of scheduling; a DESS series is 160 files)
BATCH_FILES = 1024
#: at most this many tree parts (folders the plan did not list) in one task
MAX_TREE_PARTS = 64


@dataclass(frozen=True)
class Part:
    """One task's share of the tree: a folder's own files (``tree=False``) or everything below it."""

    index: int
    path: str
    tree: bool
    #: files in the folder (known for a folder's own files, ``-1`` for a tree)
    n_files: int = -1


@dataclass(frozen=True)
class Batch:
    """One scan task: consecutive parts (:class:`Batcher`)."""

    index: int
    parts: tuple[Part, ...]


@dataclass
class PartResult:
    """What a scan task returns (see the module docstring)."""

    index: int
    #: ((group key, first path of the group, order), series) as :func:`kneeprep.dicom.scan.describe` gives them
    series: list[tuple[tuple[str, str, int], SeriesInfo]]
    #: every folder read that holds files, in walk order, with the group keys of its readable files
    folders: list[tuple[str, tuple[str, ...]]]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    non_dicom_skipped: int = 0
    n_files: int = 0


def _entries(d: str) -> tuple[list[str], list[str]]:
    """``(files, subdirectories)`` of one directory, sorted, as ``os.walk`` sees them (a symbolic link to a
    directory is a directory, and is not descended); an unreadable directory is empty, as ``os.walk`` skips it."""
    files, dirs = [], []
    try:
        with os.scandir(d) as it:
            for e in it:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    files.append(e.name)
                elif not e.is_symlink():
                    dirs.append(e.name)
    except OSError:
        return [], []
    return sorted(files), sorted(dirs)


def plan(root: str | os.PathLike, min_parts: int | None = None) -> list[Part]:
    """The parts of the tree under ``root``, in ``os.walk`` order (see the module docstring); ``min_parts``
    defaults to :data:`MIN_PARTS` (1: the whole tree is one part, read by one task)."""
    min_parts = MIN_PARTS if min_parts is None else min_parts
    listed: dict[str, tuple[int, list[str]]] = {}
    frontier, depth = [str(root)], 0
    while frontier and len(frontier) < min_parts and depth < MAX_PLAN_DEPTH:
        below = []
        for d in frontier:
            files, dirs = _entries(d)
            subs = [os.path.join(d, s) for s in dirs]
            listed[d] = (len(files), subs)
            below += subs
        frontier, depth = below, depth + 1
    parts: list[Part] = []

    def visit(d: str) -> None:
        if d not in listed:
            parts.append(Part(len(parts), d, True))
            return
        n_files, subs = listed[d]
        if n_files:
            parts.append(Part(len(parts), d, False, n_files))
        for s in subs:
            visit(s)

    visit(str(root))
    return parts


class Batcher:
    """The scan's tasks, each cut when a worker thread is free to run it (:meth:`TaskStream.feed`): consecutive
    parts until about ``min_files`` (default :data:`BATCH_FILES`) files. A listed folder's own files are
    counted by the plan; a *tree* part (not listed) counts as the mean of the tree parts read so far -- until
    one has been read, each is a task of its own (the first tasks stay small, so conversion starts early) --
    and a task takes at most as many tree parts as have been read (a mean of few is a guess: series folders
    of 3, 160 and 96 files, the first read a localizer's, would otherwise put most of a tree in one task
    while the other workers wait), and never more than :data:`MAX_TREE_PARTS`. How the parts are grouped
    does not change the scan's result (module docstring), only the number of tasks: the OAI layout's patient
    folders are tree parts of a few dozen to a few thousand files, so one task per part cost the driver a task
    per ~50 files."""

    def __init__(self, parts: list[Part], min_files: int | None = None):
        import collections
        import threading

        self._parts = collections.deque(parts)
        self.total = len(parts)
        self._min = BATCH_FILES if min_files is None else min_files
        self._lock = threading.Lock()
        self._tree = [0, 0]  # tree parts read, their files
        self._made = 0

    def __call__(self) -> Batch | None:
        with self._lock:
            if not self._parts:
                return None
            est = self._tree[1] / self._tree[0] if self._tree[0] else None
            group: list[Part] = []
            n, trees = 0.0, 0
            while self._parts and (not group or n < self._min):
                p = self._parts[0]
                # at most as many tree parts as have been read (none yet: a tree part goes alone)
                if p.tree and group and trees >= min(MAX_TREE_PARTS, self._tree[0]):
                    break
                group.append(self._parts.popleft())
                trees += p.tree
                n += (max(est, 1.0) if est is not None else self._min) if p.tree else p.n_files
            self._made += 1
            return Batch(self._made - 1, tuple(group))

    def record(self, batch: Batch, result: PartResult) -> None:
        """Learn the tree parts' size from a finished task."""
        trees = sum(p.tree for p in batch.parts)
        if trees:
            with self._lock:
                self._tree[0] += trees
                self._tree[1] += result.n_files - sum(p.n_files for p in batch.parts if not p.tree)


def batches(parts: list[Part], min_files: int | None = None) -> list[Batch]:
    """Every batch :class:`Batcher` cuts when no task has finished (tree parts alone)."""
    cut = Batcher(parts, min_files)
    return list(iter(cut, None))


def _folders(part: Part) -> list[tuple[Path, list[Path]]]:
    """The folders of a part that hold files, with their files, in ``os.walk`` order."""
    if not part.tree:
        files, _ = _entries(part.path)
        return [(Path(part.path), [Path(part.path) / f for f in files])] if files else []
    out = []
    for dirpath, dirnames, filenames in os.walk(part.path):
        dirnames.sort()
        if filenames:
            out.append((Path(dirpath), [Path(dirpath) / f for f in sorted(filenames)]))
    return out


def scan_folders(
    index: int, folders: list[tuple[Path, list[Path]]], qc: QC, split_orientation_atol: float
) -> PartResult:
    """Read and describe the series of these folders (whole folders; see the module docstring)."""
    headers, unreadable, not_slices, skipped, n = [], [], set(), 0, 0
    keyed = []
    for folder, files in folders:
        here, lost, not_here, skip = read_folder(files)
        headers += here
        unreadable += lost
        not_slices |= not_here
        skipped += skip
        n += len(files)
        keyed.append((str(folder), tuple(sorted({group_key(h) for h in here}))))
    series = describe(headers, unreadable, not_slices, qc, split_orientation_atol, {})
    return PartResult(index, series, keyed, unreadable, skipped, n)


def scan_batch(batch: Batch, qc: QC, split_orientation_atol: float) -> PartResult:
    """A scan task: list the batch's parts and :func:`scan_folders` them."""
    return scan_folders(
        batch.index, [f for p in batch.parts for f in _folders(p)], qc, split_orientation_atol
    )


def _rescan(folders: list[str], qc: QC, split_orientation_atol: float) -> PartResult:
    """A reconcile task: the series of these folders (a closed set of folders sharing groups)."""
    return scan_folders(-1, [(Path(f), [Path(f) / n for n in _entries(f)[0]]) for f in folders], qc,
                        split_orientation_atol)  # fmt: skip


def _spread(parts: list[PartResult]) -> list[list[str]]:
    """The sets of folders to describe again: groups whose folders lie in more than one part, with every
    folder and group connected to them through shared folders or groups; each set in walk order."""
    where: dict[str, set[int]] = defaultdict(set)
    for p in parts:
        for _f, keys in p.folders:
            for k in keys:
                where[k].add(p.index)
    spread = {k for k, ps in where.items() if len(ps) > 1}
    if not spread:
        return []
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    order: list[str] = []
    for p in parts:
        for f, keys in p.folders:
            order.append(f)
            for k in keys:
                parent[find("f:" + f)] = find("k:" + k)
    roots = {find("k:" + k) for k in spread}
    sets: dict[str, list[str]] = defaultdict(list)
    for f in order:
        r = find("f:" + f)
        if r in roots:
            sets[r].append(f)
    return list(sets.values())


def scan_tree(
    root: str | Path,
    qc: QC = QC(),  # noqa: B008 - frozen dataclass, safe as a default
    progress: Callable[[int, int], None] | None = None,
    *,
    split_orientation_atol: float = 0.05,
    on_series: Callable[[SeriesInfo], None] | None = None,
    on_part: Callable[[int, list[SeriesInfo]], None] | None = None,
    executor=None,
) -> ScanResult:
    """Scan every file under ``root`` (any layout, extensionless files included) and describe each series.

    Reads headers only (PixelData deferred). A file that is not DICOM is counted in ``non_dicom_skipped`` --
    unless its name ends in ``.dcm``, which makes it unreadable. Unreadable files (empty, corrupt, not DICOM
    but named ``.dcm``) are listed in ``unreadable``; when their folder holds exactly one series they are also
    that series' ``dropped`` files and fail its QC (a non-DICOM ``.dcm`` file is never taken for a lost slice).
    Raises :class:`~kneeprep.errors.InputNotFoundError` if ``root`` is not a directory.

    ``executor``: a :mod:`kneeprep.parallel` executor to run the tasks on (``None``: this process); the result
    is the same for any executor. ``progress(done, total)`` counts the parts of the tree (module docstring).

    ``on_series(info)``, if given, is called with a *provisional* :class:`SeriesInfo` as soon as the part
    holding its files has been read -- before the rest of the tree -- so a caller can start work on it early.
    It is what the final result will say unless the series' UID continues in another part or its volume id
    collides with another series: the returned :class:`ScanResult` is authoritative, and a caller that acted on
    a provisional series must compare it (``==``) with the final one and redo what differs.

    ``on_part(index, series)``, if given, is called with every task's provisional series (in the task's order;
    ``index``: the task's number, 0, 1, ... in walk order, each called once, in completion order) -- what a
    caller streams to an inventory file while the scan runs (``kneeprep scan --out``).
    """
    from kneeprep.parallel import SerialExecutor

    root = Path(root)
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: raw DICOM folder not found (or not a directory)")
    ex = executor if executor is not None else SerialExecutor()
    cut = Batcher(plan(root))
    results: dict[int, PartResult] = {}
    seen_ids: set[str] = set()
    stream = ex.stream(
        scan_batch, on_error=lambda part, exc: part, qc=qc, split_orientation_atol=split_orientation_atol
    )
    sent: dict[int, Batch] = {}

    def source() -> Batch | None:
        b = cut()
        if b is not None:
            sent[b.index] = b
        return b

    stream.feed(source)
    done = 0
    if progress is not None:
        progress(0, cut.total)
    for r in stream.results():
        if isinstance(r, Batch):  # the task was lost twice (or failed): read it here
            r = scan_batch(r, qc, split_orientation_atol)
        batch = sent.pop(r.index)
        cut.record(batch, r)
        done += len(batch.parts)
        results[r.index] = r
        if on_part is not None:
            on_part(r.index, [info for _key, info in r.series])
        if on_series is not None:
            for _key, info in r.series:
                if info.volume_id not in seen_ids:  # an id taken by an earlier one: wait for the end
                    seen_ids.add(info.volume_id)
                    on_series(info)
        if progress is not None:
            progress(done, cut.total)
    got = [results[i] for i in sorted(results)]
    series = [entry for r in got for entry in r.series]
    redo = _spread(got)
    if redo:
        again = {f for folders in redo for f in folders}
        keys_again = {k for r in got for f, keys in r.folders if f in again for k in keys}
        series = [e for e in series if e[0][0] not in keys_again]
        for r in ex.map_unordered(
            _rescan,
            redo,
            on_error=lambda folders, exc: folders,
            qc=qc,
            split_orientation_atol=split_orientation_atol,
        ):
            if not isinstance(r, PartResult):  # lost twice (or failed): read it here, as the first pass does
                r = _rescan(r, qc, split_orientation_atol)
            series += r.series
    series.sort(key=lambda e: (e[0][1], e[0][2]))
    return ScanResult(
        root,
        tuple(unique_ids([s for _, s in series])),
        sum(r.non_dicom_skipped for r in got),
        tuple(u for r in got for u in r.unreadable),
        sum(r.n_files for r in got),
    )
