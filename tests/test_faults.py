"""Faults: processes killed at random points, workers dying mid-task, write errors.

* ``kneeprep convert`` / ``kneeprep shards`` SIGKILLed at a random point after their first output appears, then
  re-run: the outputs equal a clean run's (volume arrays and attrs; shard and manifest bytes), and a poller
  running beside the killed process never saw a half-written volume or a manifest naming files it does not
  describe.
* A worker process that dies (``os._exit``) on one series: that series is reported ``failed``/``worker_lost``,
  the others are converted, the run ends (bounded by a timeout).
* Ctrl-C (SIGINT to the process group) while Dask workers convert series submitted during the scan: exit code
  130, an ``interrupted`` report, only complete volumes listed, no process left, and a re-run finishes the rest.
* ENOSPC inside the Zarr store writer and EFBIG (a real ``RLIMIT_FSIZE``) inside the Parquet writer: a
  ``StoreError`` naming the path, and no volume, shard or ``.partial`` left behind.

The killed processes are slowed by a wrapper (``_SLOW``: a sleep around each array or row-group write) so the
kill lands in the middle of the run; the code paths are the real ones.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kneeprep.errors import StoreError
from kneeprep.files import sha256_file
from kneeprep.formats import store
from kneeprep.formats.shard_schema import MANIFEST
from kneeprep.recipe import load_recipe
from kneeprep.stages.convert import run_convert
from kneeprep.stages.shards import build_shards
from kneeprep.stages.validate import validate_shards

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"
PYTHON = sys.executable
#: every subprocess here ends within this many seconds or the test fails (and the process group is killed).
DEADLINE = 120


def _convert(sample: Path, out: Path, **kw):
    kw = {"annotations": sample, "masks": sample, "workers": 0, "progress": False} | kw
    return run_convert(sample / "raw", out, load_recipe(RECIPE), **kw)


@pytest.fixture(scope="module")
def clean_store(small_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "volumes.zarr"
    rep = _convert(small_sample, out)
    assert rep.counts["failed"] == 0 and rep.counts["written"] == 5
    return out


@pytest.fixture(scope="module")
def clean_shards(small_sample, clean_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "shards"
    rep = build_shards(clean_store, small_sample, out, load_recipe(RECIPE))
    assert rep["errors"] == 0
    return out


def volume_snapshot(store_path: Path, vid: str) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
    image, _ = store.read_volume(store_path, vid)
    labels = {n: store.read_labels(store_path, vid, n) for n in store.label_names(store_path, vid)}
    return image, store.read_attrs(store_path, vid), labels


def assert_same_volume(a: Path, b: Path, vid: str) -> None:
    ia, aa, la = volume_snapshot(a, vid)
    ib, ab, lb = volume_snapshot(b, vid)
    assert ia.dtype == ib.dtype and np.array_equal(ia, ib), vid
    assert aa == ab, vid  # the attrs hold no timings (those are in report.json)
    assert la.keys() == lb.keys() and all(np.array_equal(la[k], lb[k]) for k in la), vid


def store_files(p: Path) -> set[str]:
    skip = {store.REPORT_NAME, store.LOCK_FILE}
    return {f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file() and f.name not in skip}


# Run a kneeprep command in a fresh interpreter, each array (convert) or row group (shards) write slowed down.
_SLOW = textwrap.dedent(
    """
    import sys, time
    from kneeprep.formats import shard_writer as shards
    from kneeprep.formats import store
    delay = float(sys.argv[1])
    _write_array, _write_group = store._write_array, shards._ParquetFile.write_group
    def slow_array(*a, **k):
        time.sleep(delay)
        return _write_array(*a, **k)
    def slow_group(self, *a, **k):
        _write_group(self, *a, **k)
        time.sleep(delay)
    store._write_array, shards._ParquetFile.write_group = slow_array, slow_group
    from kneeprep.cli import main
    main(sys.argv[2:])
    """
)


def spawn(args: list[str], delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-c", _SLOW, str(delay), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------------
# SIGKILL, then re-run


def test_convert_killed_at_a_random_point_then_rerun_equals_a_clean_run(small_sample, clean_store, tmp_path):
    rng = random.Random(int(time.time()))  # a different point each run; printed on failure
    out = tmp_path / "volumes.zarr"
    args = ["convert", str(small_sample / "raw"), str(out), "--recipe", str(RECIPE), "--annotations",
            str(small_sample), "--masks", str(small_sample), "--workers", "0", "--no-progress"]  # fmt: skip
    proc = spawn(args, delay=0.12)
    seen: dict[str, float] = {}
    kill_at = None
    after = rng.uniform(0.0, 0.35)
    try:
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < DEADLINE:
            if (out / "zarr.json").is_file():
                for vid in store.list_volumes(out):
                    if (
                        vid not in seen
                    ):  # listed => complete: every array readable and equal to the clean run's
                        assert_same_volume(out, clean_store, vid)
                        seen[vid] = time.monotonic()
            if seen and kill_at is None:
                kill_at = time.monotonic() + after
            if kill_at is not None and time.monotonic() >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout.read().decode()[-2000:])
    listed = store.list_volumes(out)
    assert set(listed) >= set(seen) and 1 <= len(listed) < 5, (
        f"killed {after:.3f} s after the first volume; {listed}"
    )
    for vid in set(listed) - set(seen):  # installed just before the kill: complete too
        assert_same_volume(out, clean_store, vid)
    assert not store.report_path(out).exists()  # the killed run never got to its report
    leftovers = sorted(os.listdir(store.work_dir(out))) if store.work_dir(out).is_dir() else []
    assert all(n.endswith((".partial", ".old")) for n in leftovers), leftovers

    rep = _convert(small_sample, out)
    assert rep.counts["failed"] == 0, rep.table()
    assert sorted(rep.context["cleaned_work_area"]) == leftovers
    written = {r.item for r in rep.items if r.status == "written"}
    assert written == set(store.list_volumes(clean_store)) - set(listed)  # the rest was skipped as unchanged
    assert store.list_volumes(out) == store.list_volumes(clean_store)
    for vid in store.list_volumes(out):
        assert_same_volume(out, clean_store, vid)
    assert store_files(out) == store_files(clean_store)  # same chunk files, nothing left in the work area


def test_shards_killed_at_a_random_point_then_rerun_is_byte_identical(
    small_sample, clean_store, clean_shards, tmp_path
):
    rng = random.Random(int(time.time()))
    out = tmp_path / "shards"
    # an earlier build with another recipe (more, smaller shards) whose manifest and files the killed run replaces
    small = tmp_path / "small.toml"
    small.write_text(RECIPE.read_text().replace("target_bytes = 536870912", "target_bytes = 400000"))
    build_shards(clean_store, small_sample, out, load_recipe(small))
    old_parts = {p.relative_to(out).as_posix() for p in out.glob("data/*.parquet")}
    assert len(old_parts) > len(json.loads((clean_shards / MANIFEST).read_text())["shards"])

    proc = spawn(
        ["shards", str(clean_store), str(small_sample), str(out), "--recipe", str(RECIPE), "--workers", "0"],
        delay=0.25,
    )
    bad_manifest = []
    kill_at = None
    after = rng.uniform(0.0, 0.4)
    start = {p: p.stat().st_mtime_ns for p in out.glob("data/*.parquet")}
    try:
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < DEADLINE:
            m = out / MANIFEST
            try:
                text = m.read_text()
                listed = json.loads(text)["shards"]
                wrong = [e["path"] for e in listed if sha256_file(out / e["path"]) != e["sha256"]]
                if (
                    wrong and m.is_file() and m.read_text() == text
                ):  # still the manifest, describing other bytes
                    bad_manifest.append(wrong)
            except (FileNotFoundError, ValueError):
                pass
            new = [p for p in out.glob("data/*.parquet") if start.get(p) != p.stat().st_mtime_ns]
            if new and kill_at is None:
                kill_at = time.monotonic() + after
            if kill_at is not None and time.monotonic() >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        kill_group(proc)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout.read().decode()[-2000:])
    assert bad_manifest == []  # a manifest on disk always described the files beside it
    assert not (out / MANIFEST).exists(), f"killed {after:.3f} s after the first new shard"
    problems = validate_shards(out)
    assert [p.kind for p in problems] == ["manifest"]  # readers refuse the directory

    recipe = load_recipe(RECIPE)
    rep = build_shards(clean_store, small_sample, out, recipe)
    assert rep["up_to_date"] is False and rep["errors"] == 0
    assert (out / MANIFEST).read_bytes() == (clean_shards / MANIFEST).read_bytes()
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.glob("*/*") if p.is_file())  # noqa: E731
    assert files(out) == files(clean_shards)  # no stale shard, no *.partial
    for rel in files(out):
        assert (out / rel).read_bytes() == (clean_shards / rel).read_bytes(), rel
    assert validate_shards(out) == []


# ----------------------------------------------------------------------------------------------------------
# a worker process dies on one series

_DIE_HOOK = """
import os
import kneeprep.stages.convert as p
if not getattr(p, "_die_hook", False):  # dask may run a preload file more than once
    p._die_hook = True
    _convert_series = p.convert_series
    def convert_series(info, *a, **k):
        if info.volume_id == os.environ["KNEEPREP_TEST_DIE_ON"]:
            os._exit(17)  # the worker process vanishes mid-task, as under the OOM killer
        return _convert_series(info, *a, **k)
    p.convert_series = convert_series
"""


def test_a_worker_dying_on_one_series_reports_it_and_the_run_ends(small_sample, clean_store, tmp_path):
    hook = tmp_path / "die_hook.py"
    hook.write_text(_DIE_HOOK)
    poison = sorted(store.list_volumes(clean_store))[1]
    out = tmp_path / "volumes.zarr"
    env = os.environ | {
        "KNEEPREP_TEST_DIE_ON": poison,
        "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(hook)]),
    }
    args = ["convert", str(small_sample / "raw"), str(out), "--recipe", str(RECIPE), "--annotations",
            str(small_sample), "--masks", str(small_sample), "--workers", "1", "--no-progress"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [PYTHON, "-m", "kneeprep", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output = proc.communicate(timeout=DEADLINE)[0].decode()
    finally:
        kill_group(proc)
    seconds = time.monotonic() - t0
    assert proc.returncode == 1, output[-3000:]
    rep = json.loads(store.report_path(out).read_text())
    items = {i["item"]: i for i in rep["items"] if i["kind"] != "not_selected"}
    assert items[poison]["status"] == "failed" and items[poison]["kind"] == "worker_lost"
    assert "worker process converting it died" in items[poison]["message"]
    assert str(small_sample / "raw") in items[poison]["message"]  # names the series folder
    assert f"{poison}  failed   worker_lost" in output
    others = set(store.list_volumes(clean_store)) - {poison}
    assert {v for v, i in items.items() if i["status"] != "failed"} == others
    assert store.list_volumes(out) == sorted(others)
    for vid in others:
        assert_same_volume(out, clean_store, vid)
    assert seconds < DEADLINE


_SLOW_HOOK = """
import time
import kneeprep.stages.convert as p
if not getattr(p, "_slow_hook", False):  # dask may run a preload file more than once
    p._slow_hook = True
    _convert_series = p.convert_series
    def convert_series(*a, **k):
        time.sleep(0.4)  # a worker slow enough for the interrupt to land mid-run
        return _convert_series(*a, **k)
    p.convert_series = convert_series
"""


def _live_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies waiting to be reaped do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(stat.parent.name))
    return live


def test_only_local_workers_leave_ctrl_c_to_the_driver():
    # kneeprep.warm is also a preload for workers users start themselves: those keep their Ctrl-C
    code = "import signal, kneeprep.warm; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    plain = {k: v for k, v in os.environ.items() if k != "KNEEPREP_LOCAL_WORKER"}
    for env, ignored in ((plain, "False"), (plain | {"KNEEPREP_LOCAL_WORKER": "1"}, "True")):
        out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == ignored, (env, out.stdout, out.stderr)


def test_ctrl_c_with_dask_workers_stops_everything_and_a_rerun_finishes(small_sample, clean_store, tmp_path):
    # Ctrl-C in a terminal: SIGINT to the whole process group (driver, nanny, worker), while series that were
    # submitted during the scan are converting
    hook = tmp_path / "slow_hook.py"
    hook.write_text(_SLOW_HOOK)
    out = tmp_path / "volumes.zarr"
    env = os.environ | {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(hook)])}
    args = ["convert", str(small_sample / "raw"), str(out), "--recipe", str(RECIPE), "--annotations",
            str(small_sample), "--masks", str(small_sample), "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [PYTHON, "-m", "kneeprep", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < DEADLINE:
            if (out / "zarr.json").is_file() and store.list_volumes(out):
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.01)
        output = proc.communicate(timeout=DEADLINE)[0].decode()
    finally:
        kill_group(proc)
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "Aborted" in output, output[-3000:]  # one message, from the driver
    t0 = time.monotonic()
    while _live_in_group(proc.pid) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert _live_in_group(proc.pid) == []  # no worker outlives the run
    rep = json.loads(store.report_path(out).read_text())
    assert rep["context"]["interrupted"] is True and rep["context"]["converted_early"] >= 1
    listed = store.list_volumes(out)
    assert 1 <= len(listed) < len(store.list_volumes(clean_store)), listed
    assert {i["item"] for i in rep["items"] if i["status"] == "written"} <= set(listed)
    for vid in listed:  # what is listed is complete
        assert_same_volume(out, clean_store, vid)
    rerun = _convert(small_sample, out)
    assert rerun.counts["failed"] == 0 and {r.item for r in rerun.items if r.status == "written"} == set(
        store.list_volumes(clean_store)
    ) - set(listed)
    assert store_files(out) == store_files(clean_store)


# ----------------------------------------------------------------------------------------------------------
# write errors


def test_enospc_while_writing_a_volume_names_it_and_leaves_nothing(
    small_sample, clean_store, tmp_path, monkeypatch
):
    import errno

    import zarr.storage._local as local

    victim = sorted(store.list_volumes(clean_store))[2]
    put = local._put
    calls = []

    def full_disk(path, value, exclusive=False):
        if f"{store.WORK_DIR_NAME}/{victim}." in str(path) and "/c/" in str(path):
            calls.append(path)
            if len(calls) >= 2:  # the image chunk made it to disk, then the disk is full (labels)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    out = tmp_path / "volumes.zarr"
    rep = _convert(small_sample, out)
    (failed,) = rep.failed
    assert (failed.item, failed.kind) == (victim, "store")
    assert str(out / victim) in failed.message and "No space left on device" in failed.message
    assert len(calls) == 2
    assert store.list_volumes(out) == sorted(set(store.list_volumes(clean_store)) - {victim})
    assert not any(store.work_dir(out).iterdir())  # the partial copy is gone
    for vid in store.list_volumes(out):
        assert_same_volume(out, clean_store, vid)
    # the direct API raises a StoreError (an OSError) naming the volume
    image, geometry = store.read_volume(clean_store, victim)
    with pytest.raises(StoreError, match=f"{victim}: could not write the volume: No space left"):
        store.write_volume(out, victim, image, geometry, store.read_attrs(clean_store, victim))
    assert victim not in store.list_volumes(out)


def _limit_file_size(limit: int):
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def test_a_shard_write_error_names_the_file_and_leaves_no_partial_shard(
    small_sample, clean_store, clean_shards, tmp_path
):
    sizes = sorted(e["bytes"] for e in json.loads((clean_shards / MANIFEST).read_text())["shards"])
    limit = (sizes[0] + sizes[-1]) // 2  # the smallest shard fits, the biggest does not
    out = tmp_path / "shards"
    proc = subprocess.run(
        [PYTHON, "-m", "kneeprep", "shards", str(clean_store), str(small_sample), str(out), "--recipe", str(RECIPE),
         "--no-progress", "--workers", "0"],
        capture_output=True, text=True, timeout=DEADLINE, preexec_fn=_limit_file_size(limit),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "could not write the shard" in err and "File too large" in err, err
    failing = err.split("error: ", 1)[1].split(":", 1)[0]
    assert Path(failing).parent.parent == out and Path(failing).suffix == ".parquet", err
    assert not (out / MANIFEST).exists()
    assert list(out.glob("*/*.partial")) == []
    for p in out.glob("*/*.parquet"):  # what was finished before the error is whole (same bytes as clean)
        assert p.stat().st_size < limit
        assert p.read_bytes() == (clean_shards / p.relative_to(out)).read_bytes()
    assert [p.kind for p in validate_shards(out)] == ["manifest"]
