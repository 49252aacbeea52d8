"""A bounded local cache of remote shard files, shared by every process of one node.

**Layout.** ``CACHE_DIR/<sha256>.parquet`` holds a shard whose content has that SHA-256 (the manifest's
``sha256``): content-addressed, so shards of several URLs share one cache and a rebuilt shard never meets a stale
copy. ``<sha256>.lock`` (empty, kept) carries the locks of that file; ``.cache.lock`` serializes the space
accounting; downloads in progress are ``kneeprep.files`` temporary names (``.<sha256>.parquet.<random>.partial…``).

**Complete or absent.** A download goes to a temporary file that has the shard's full size from the start (a
sparse reservation, so the cache's total counts it), is checked against the manifest's ``bytes`` and ``sha256``
while it streams, and only then renamed to its final name (:func:`kneeprep.files.temp_path` and
:func:`~kneeprep.files.publish`). A killed
download leaves a temporary file that is never read and is removed by the next process that needs room.
A file under its final name is checked again by size on every use and by SHA-256 the first time each process
uses it (and whenever its inode, size or mtime changed): a corrupted copy is removed and downloaded again.

**Concurrency** (``flock`` on ``<sha256>.lock``, so it needs the cache on a local disk; it works between
threads, processes and DataLoader workers alike). A reader holds a shared lock for as long as it uses the file; the
one process that downloads holds the exclusive lock, so the others block until the file lands and then read
it -- each shard is downloaded once per node. Eviction takes the exclusive lock without waiting, so it never
removes a file in use.

**Bound.** The files under the cache directory never total more than ``cache_bytes``: before a download,
least recently used files (by access time, which every use sets) not in use are evicted until the new file
fits. When the files in use leave no room, :meth:`ShardCache.acquire` waits for other processes to release some
(up to ``wait_s``) and then raises ``StoreError``: give at least two shards per process reading on the node
(the shard in use and the one prefetched).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kneeprep.errors import StoreError
from kneeprep.files import PARTIAL, publish, sha256_file, temp_path

DEFAULT_CACHE_BYTES = 32 << 30
CHUNK = 8 << 20  #: bytes per ranged GET while downloading
_SPIN_S = 0.02

#: (path, inode, size, mtime_ns) of cached files this process has verified by SHA-256
_VERIFIED: set[tuple[str, int, int, int]] = set()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/kneeprep/shards`` (``~/.cache/kneeprep/shards`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kneeprep" / "shards"


@dataclass(frozen=True)
class Source:
    """One remote shard: ``fs`` (fsspec filesystem), ``path`` in it, ``url`` (for messages), manifest
    ``size`` and ``sha256``."""

    fs: object
    path: str
    url: str
    size: int
    sha256: str


class Lease:
    """A cached file held in use (a shared lock: never evicted meanwhile); :meth:`release` when done."""

    def __init__(self, fh, path: Path):
        self._fh, self.path = fh, path

    def release(self) -> None:
        self._fh.close()


class ShardCache:
    """Shard files of remote shards directories, on local disk (see the module docs)."""

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        cache_bytes: int | None = None,
        wait_s: float = 60.0,
    ):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_bytes = DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        if self.cache_bytes < 1:
            raise ValueError(f"cache_bytes must be >= 1, got {cache_bytes}")
        self.wait_s = wait_s
        self.downloads = 0  #: files this object downloaded
        self.refetched = 0  #: of those, files whose cached copy failed its check
        self.evicted = 0  #: files this object evicted
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.dir}: cannot create the shard cache: {e.strerror or e}") from e

    def path_for(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.parquet"

    # -- use -------------------------------------------------------------------------------------------

    def acquire(self, src: Source, wait: bool = True) -> Lease | None:
        """The cached copy of ``src``, downloaded if needed, held until :meth:`Lease.release`. With
        ``wait=False`` (prefetch) returns None instead of waiting for room."""
        final = self.path_for(src.sha256)
        fh = open(self.dir / f"{src.sha256}.lock", "a+")  # noqa: SIM115 - held by the Lease
        deadline = time.monotonic() + self.wait_s
        try:
            while True:
                fcntl.flock(fh, fcntl.LOCK_SH)  # blocks while another process downloads it
                present = final.exists()
                if self._valid(final, src):
                    st = final.stat()
                    os.utime(final, (time.time(), st.st_mtime))  # LRU: the access time is the last use
                    return Lease(fh, final)
                fcntl.flock(fh, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process checks, reads or downloads it: look again
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"{final}: the cached copy of {src.url} fails its check and another process "
                            f"still holds it after {self.wait_s:.0f} s"
                        ) from None
                    time.sleep(_SPIN_S)
                    continue
                if not self._valid(final, src):  # nobody fixed it meanwhile: this process downloads
                    final.unlink(missing_ok=True)
                    if not self._download(src, final, wait):
                        fh.close()
                        return None
                    self.refetched += present
                # loop: convert to a shared lock and check again (flock's conversion is not atomic)
        except BaseException:
            fh.close()
            raise

    def prefetch(self, src: Source) -> bool:
        """Download ``src`` into the cache if absent and room can be made without waiting; holds nothing."""
        lease = self.acquire(src, wait=False)
        if lease is None:
            return False
        lease.release()
        return True

    # -- internals ------------------------------------------------------------------------------------

    def _valid(self, final: Path, src: Source) -> bool:
        try:
            st = final.stat()
        except FileNotFoundError:
            return False
        if st.st_size != src.size:
            return False
        key = (str(final), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _VERIFIED:
            return True
        if sha256_file(final) != src.sha256:
            return False
        _VERIFIED.add(key)
        return True

    def _download(self, src: Source, final: Path, wait: bool) -> bool:
        if src.size > self.cache_bytes:
            raise StoreError(
                f"{src.url}: {src.size} bytes, more than the shard cache holds "
                f"(cache_bytes={self.cache_bytes}, {self.dir})"
            )
        tmp = temp_path(final)  # not atomic_path: the reservation may decide there is nothing to publish
        try:
            if not self._reserve(tmp, src, wait):
                return False
            self._fetch_into(tmp, src)
        except BaseException:  # Ctrl-C included: no temporary file left behind
            tmp.unlink(missing_ok=True)
            raise
        publish(tmp, final)
        st = final.stat()
        _VERIFIED.add((str(final), st.st_ino, st.st_size, st.st_mtime_ns))
        self.downloads += 1
        return True

    def _fetch_into(self, tmp: Path, src: Source) -> None:
        """Stream ``src`` into the reserved ``tmp`` by ranged GETs, checking bytes and sha256 on the way."""
        h = hashlib.sha256()
        got = 0
        try:
            with (
                src.fs.open(src.path, "rb", block_size=CHUNK, cache_type="none") as rf,
                open(tmp, "r+b") as out,
            ):
                while got < src.size and (chunk := rf.read(min(CHUNK, src.size - got))):
                    h.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
        except FileNotFoundError:
            raise StoreError(f"{src.url}: listed in the manifest but not found") from None
        except Exception as e:  # OSError (ENOSPC names the cache file) and botocore/aiohttp errors alike
            raise StoreError(f"{src.url}: could not download to {tmp.parent}: {e}") from e
        if got != src.size or h.hexdigest() != src.sha256:
            raise StoreError(
                f"{src.url}: downloaded {got} bytes with sha256 {h.hexdigest()[:16]}..., the manifest says "
                f"{src.size} bytes, {src.sha256[:16]}... (the object changed after the manifest was written?)"
            )

    def _reserve(self, tmp: Path, src: Source, wait: bool) -> bool:
        """Make room for ``src.size`` bytes (evicting files not in use, least recently used first) and create
        ``tmp`` with that size, atomically with respect to other processes of this cache."""
        deadline = time.monotonic() + self.wait_s
        while True:
            with self._space_lock():
                total, in_use = self._make_room(src.size)
                if total + src.size <= self.cache_bytes:
                    with open(tmp, "wb") as fh:
                        fh.truncate(src.size)  # sparse: counts the whole file from now on
                    return True
            if not wait:
                return False
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{self.dir}: no room for {src.url} ({src.size} bytes) in cache_bytes={self.cache_bytes}: "
                    f"{in_use} bytes are shards in use; give a larger cache_bytes (two shards per process "
                    f"reading on this node, at least)"
                )
            time.sleep(0.1)

    def _make_room(self, need: int) -> tuple[int, int]:
        """Evict until ``need`` more bytes fit (or nothing more can go); returns (total, bytes in use)."""
        finals: list[tuple[float, int, Path]] = []
        total = 0
        for p in self.dir.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if PARTIAL in p.name:
                if self._try_remove(p, p.name.split(".")[1]):  # a killed download
                    continue
            elif p.suffix == ".parquet":
                finals.append((st.st_atime, st.st_size, p))
            total += st.st_size
        in_use = 0
        for _, size, p in sorted(finals):
            if total + need <= self.cache_bytes:
                break
            if self._try_remove(p, p.stem):
                total -= size
                self.evicted += 1
            else:
                in_use += size
        return total, in_use

    def _try_remove(self, path: Path, sha256: str) -> bool:
        """Remove ``path`` if nobody holds ``<sha256>.lock`` (not waiting); True when removed."""
        with open(self.dir / f"{sha256}.lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)
            return True

    @contextlib.contextmanager
    def _space_lock(self) -> Iterator[None]:
        with open(self.dir / ".cache.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def size(self) -> int:
        """Bytes of every file under the cache directory (what ``cache_bytes`` bounds)."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())
