"""Outputs on object storage, against the real local S3 server (moto, ``tests/s3server.py``).

* ``kneeprep rebuild --out s3://bucket/x`` on the small sample: every object equals the file of a local-disk
  rebuild of the same input (zarr chunks and metadata, attrs, Parquet shards, manifest, boxes table), byte for
  byte (run reports and the card, which hold timings and paths, aside); ``validate``, ``export`` (from and to
  s3://) and ``score`` read it; ``ShardDataset`` over the s3 shards yields the local shards' samples.
* s3fs's conditional create (``If-None-Match: *``) is honoured by the server: the run lock relies on it.
* A rebuild SIGKILLed while publishing (after its first volume's completion record, in the middle of the
  second volume's objects): nothing incomplete is listed as complete; the re-run takes over the dead run's
  lock, removes the leftovers and ends with objects identical to a clean run's.
* The convert tasks publish their volumes from the worker processes (a run killed right after the convert
  stage has every volume on the store); a re-run elsewhere resumes from them, uploading no voxel again.
* A second run while one holds the lock is refused with the holder and ``--break-lock`` named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kneeprep.cli import cli, main
from kneeprep.formats import objstore
from kneeprep.formats.urls import url_filesystem
from kneeprep.remote import LOCK_OBJECT, remote_lock

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"
#: objects whose bytes hold run timings or output paths (compared by presence only)
VARYING = ("report.json", "README.md", "export_manifest.json")


def _rebuild_args(sample: Path, out: str) -> list[str]:
    return [
        "rebuild", "--recipe", str(RECIPE), "--raw", str(sample / "raw"), "--annotations", str(sample),
        "--masks", str(sample), "--out", out, "--workers", "0", "--no-progress",
    ]  # fmt: skip


def _varying(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in VARYING


def _local_files(folder: Path) -> dict[str, bytes]:
    return {k: p.read_bytes() for k, p in objstore.list_local(folder).items()}


def _remote_files(fs, root: str) -> dict[str, bytes]:
    return {k: fs.cat_file(f"{root}/{k}") for k in objstore.list_remote(fs, root)}


def _is_chunk(rel: str) -> bool:
    return "/c/" in rel and not rel.endswith(".json")  # zarr v3 chunk keys: <array>/c/<i>/<j>/<k>


def _assert_same(remote: dict[str, bytes], local: dict[str, bytes], remote_url=None, local_dir=None) -> None:
    """Same objects; the same bytes, except run reports and the card, and zarr chunks, compared by value:
    Blosc compresses with several threads and writes blocks in completion order, so a chunk's bytes vary run
    to run, locally too (kneeprep.formats.store). ``remote_url``/``local_dir``: where both sides' arrays open."""
    assert sorted(remote) == sorted(local)
    differ = [k for k in local if not _varying(k) and not _is_chunk(k) and remote[k] != local[k]]
    assert differ == []
    arrays = sorted({k.split("/c/")[0] for k in local if _is_chunk(k)})
    if arrays:
        assert remote_url is not None and local_dir is not None
    for a in arrays:
        r = zarr.open_array(f"{remote_url}/{a}", mode="r")[...]
        x = zarr.open_array(f"{local_dir}/{a}", mode="r")[...]
        assert r.dtype == x.dtype and r.shape == x.shape
        np.testing.assert_array_equal(r, x)


@pytest.fixture(scope="module")
def env(s3_server, tmp_path_factory):
    """The AWS environment reaching the test server and a staging root, for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        mp.setenv("KNEEPREP_STAGE_DIR", str(tmp_path_factory.mktemp("stage")))
        yield mp


@pytest.fixture(scope="module")
def built(small_sample, s3_server, env, tmp_path_factory):
    """The same sample rebuilt to local disk and to s3://<bucket>/x."""
    from s3server import new_bucket

    local = tmp_path_factory.mktemp("local") / "out"
    res = CliRunner().invoke(cli, _rebuild_args(small_sample, str(local)), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    bucket = new_bucket(s3_server)
    url = bucket.url("x")
    res = CliRunner().invoke(cli, _rebuild_args(small_sample, url), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    yield small_sample, local, bucket, url
    bucket.fs.rm(bucket.bucket, recursive=True)


def test_the_server_honours_conditional_create(s3_bucket):
    """What the run lock relies on, measured: a second ``If-None-Match: *`` PUT of a key is refused."""
    path = f"{s3_bucket.bucket}/lock"
    s3_bucket.fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(FileExistsError):
        s3_bucket.fs.pipe_file(path, b"second", mode="create")
    assert s3_bucket.fs.cat_file(path) == b"first"
    assert [m for m, k, _, _ in s3_bucket.requests() if k == "lock"][:2] == ["PUT", "PUT"]  # both reached it


def test_rebuild_to_s3_equals_a_local_rebuild(built):
    _, local, bucket, url = built
    fs, root = url_filesystem(url)
    remote = _remote_files(fs, root)
    assert any(k.endswith("/image/c/0/0/0") for k in remote) and "shards/manifest.json" in remote
    _assert_same(remote, _local_files(local), url, local)
    assert not fs.exists(f"{root}/{LOCK_OBJECT}")  # released


def test_a_rerun_to_s3_does_nothing_and_uploads_nothing(built):
    sample, _, bucket, url = built
    fs, root = url_filesystem(url)
    before = {k: v["etag"] for k, v in objstore.list_remote(fs, root).items() if not _varying(k)}
    mark = len(bucket.requests())
    res = CliRunner().invoke(cli, _rebuild_args(sample, url), catch_exceptions=False)
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    puts = {k for m, k, _, _ in bucket.requests()[mark:] if m == "PUT"}
    assert puts and all(_varying(k) or k.endswith(f"/{LOCK_OBJECT}") for k in puts), (
        puts
    )  # reports, card, locks
    assert {k: v["etag"] for k, v in objstore.list_remote(fs, root).items() if not _varying(k)} == before


def test_validate_score_and_export_read_s3(built, tmp_path):
    sample, local, bucket, url = built
    runner = CliRunner()
    for target in (f"{url}/shards", f"{url}/volumes.zarr"):
        res = runner.invoke(
            cli, ["validate", target, "--workers", "0", "--no-progress"], catch_exceptions=False
        )
        assert res.exit_code == 0 and f"{target}: OK" in res.output, res.output
    local_export = tmp_path / "export"
    args = ["--store", "{}/volumes.zarr", "--workers", "0", "--no-progress"]
    res = runner.invoke(
        cli, ["export", str(local / "shards"), str(local_export)] + [a.format(local) for a in args]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["export", f"{url}/shards", f"{url}/export"] + [a.format(url) for a in args])
    assert res.exit_code == 0, res.output
    assert (
        f"report: {url}/export/report.json" in res.output and "stage" not in res.output
    )  # the URL's objects
    fs, root = url_filesystem(url)
    exported = _remote_files(fs, f"{root}/export")
    assert any(k.endswith(".nii.gz") for k in exported)
    _assert_same(exported, _local_files(local_export), f"{url}/export", local_export)
    # score: the same report from the s3 shards as from the local ones
    from kneeprep.formats.shard_reader import iter_quintuples

    preds = {
        r["sample_id"]: "{}" for r in iter_quintuples(local / "shards", split="test", columns=["sample_id"])
    }
    pfile = tmp_path / "preds.json"
    pfile.write_text(json.dumps(preds))
    outs = []
    for shards in (str(local / "shards"), f"{url}/shards"):
        res = runner.invoke(cli, ["score", str(pfile), shards], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        outs.append(res.output)
    assert outs[0] == outs[1] and f"{len(preds)} in truth, {len(preds)} predicted" in outs[0]


def test_training_reads_the_s3_shards_as_the_local_ones(built, tmp_path, s3_server):
    from kneeprep.loader import ShardDataset

    _, local, _, url = built
    a = list(ShardDataset(local / "shards", split="train", shuffle=True, seed=3))
    b = list(ShardDataset(f"{url}/shards", split="train", shuffle=True, seed=3, cache_dir=tmp_path / "cache"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x["sample_id"] == y["sample_id"] and x["question"] == y["question"]
        np.testing.assert_array_equal(x["image"], y["image"])


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from kneeprep.formats import objstore
    real, calls = objstore.put_marker, []
    def put_marker(fs, root, local, rel):
        calls.append(rel)
        if len(calls) == 2:  # the second volume's objects are uploaded, its completion record is not
            os.kill(os.getpid(), signal.SIGKILL)
        real(fs, root, local, rel)
    objstore.put_marker = put_marker
    from kneeprep.cli import main
    main(sys.argv[1:])
    """
)


def test_a_rebuild_killed_while_publishing_leaves_nothing_complete_and_the_rerun_equals_a_clean_run(
    built, s3_server, tmp_path
):
    from s3server import new_bucket

    sample, _, clean_bucket, clean_url = built
    bucket = new_bucket(s3_server)
    url = bucket.url("x")
    env = os.environ | {"KNEEPREP_STAGE_DIR": str(tmp_path / "stage"), "PYTHONPATH": f"{ROOT}"}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, *_rebuild_args(sample, url)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    fs, root = url_filesystem(url)
    remote = objstore.list_remote(fs, root)
    units = objstore.Units.of(remote)
    complete = [u for u in units.volumes if objstore.marker(u) in remote]
    assert len(complete) == 1 and len(units.volumes) == 2  # one published, one half-uploaded without marker
    assert "shards/manifest.json" not in remote and "report.json" not in remote
    assert fs.exists(f"{root}/{LOCK_OBJECT}")  # the dead run's lock
    # a reader trusts only the published volume
    assert {k.split("/")[1] for k in objstore.complete_state(fs, root, remote) if k.count("/") > 1} == {
        complete[0].split("/")[1]
    }
    res = CliRunner().invoke(cli, _rebuild_args(sample, url), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "taking over the stale lock" in res.output and "a killed run left" in res.output
    cfs, croot = url_filesystem(clean_url)
    clean = {k: v for k, v in _remote_files(cfs, croot).items() if not k.startswith("export/")}
    _assert_same(_remote_files(fs, root), clean, url, clean_url)
    bucket.fs.rm(bucket.bucket, recursive=True)


_KILL_AFTER_CONVERT = textwrap.dedent(
    """
    import os, signal, sys
    from kneeprep.stages import rebuild
    def boxes(*a, **k):  # the convert stage is over, the driver has pushed nothing yet: kill everything
        os.killpg(os.getpgid(0), signal.SIGKILL)
    rebuild.recompute_store_boxes = boxes
    from kneeprep.cli import main
    if __name__ == "__main__":
        main(sys.argv[1:])
    """
)


def test_the_convert_tasks_publish_each_volume_from_the_workers_and_a_rerun_resumes_from_them(
    built, s3_server, tmp_path
):
    """``--workers 2``: every volume is on the object store, complete, as soon as its task has written it --
    uploaded by the worker process (the driver, killed with its workers right after the convert stage, pushed
    nothing). A re-run on another machine (an empty staging folder) resumes from them: no volume is converted
    or uploaded again, and the objects end equal to a clean run's."""
    from s3server import new_bucket

    sample, _, _, clean_url = built
    bucket = new_bucket(s3_server)
    url = bucket.url("x")
    script = tmp_path / "kill_after_convert.py"
    script.write_text(_KILL_AFTER_CONVERT)
    env = os.environ | {"KNEEPREP_STAGE_DIR": str(tmp_path / "stage"), "PYTHONPATH": f"{ROOT}"}
    args = _rebuild_args(sample, url)
    args[args.index("--workers") + 1] = "2"
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        timeout=300,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    fs, root = url_filesystem(url)
    remote = objstore.list_remote(fs, root)
    units = objstore.Units.of(remote)
    cfs, croot = url_filesystem(clean_url)
    clean_volumes = objstore.Units.of(objstore.list_remote(cfs, croot)).volumes
    assert sorted(units.volumes) == sorted(clean_volumes)  # every volume, each with all its objects
    assert all(
        objstore.marker(u) in remote and len(units.volumes[u]) == len(clean_volumes[u]) for u in units.volumes
    )
    assert "shards/manifest.json" not in remote and "report.json" not in remote
    mark = len(bucket.requests())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "elsewhere"))  # another machine: nothing staged
        res = CliRunner().invoke(cli, _rebuild_args(sample, url), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "taking over the stale lock" in res.output and "0 written" in res.output, res.output
    puts = {k for m, k, _, _ in bucket.requests()[mark:] if m == "PUT"}
    assert not [k for k in puts if _is_chunk(k)], puts  # no voxel uploaded again
    clean = {k: v for k, v in _remote_files(cfs, croot).items() if not k.startswith("export/")}
    _assert_same(_remote_files(fs, root), clean, url, clean_url)
    bucket.fs.rm(bucket.bucket, recursive=True)


def test_a_second_run_is_refused_while_one_holds_the_lock(built, capsys):
    sample, _, _, url = built
    fs, root = url_filesystem(url)
    before = {k: v["etag"] for k, v in objstore.list_remote(fs, root).items()}
    with remote_lock(fs, root, url, "output"), pytest.raises(SystemExit) as exit_:
        main(_rebuild_args(sample, url))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert f"{url}: another kneeprep run is writing to this output" in err and "--break-lock" in err
    assert f"pid {os.getpid()}" in err
    assert {k: v["etag"] for k, v in objstore.list_remote(fs, root).items()} == before
    # a lock from another host is never taken over on its own; --break-lock clears it, the run then completes
    # and releases its own
    fs.pipe_file(f"{root}/{LOCK_OBJECT}", b'{"host": "elsewhere", "pid": 1}', mode="create")
    with pytest.raises(SystemExit) as exit_:
        main(_rebuild_args(sample, url))
    assert exit_.value.code == 1 and "held by pid 1 on elsewhere" in capsys.readouterr().err
    res = CliRunner().invoke(cli, _rebuild_args(sample, url) + ["--break-lock"], catch_exceptions=False)
    assert res.exit_code == 0 and "breaking lock of pid 1 on elsewhere" in res.output, res.output
    assert not fs.exists(f"{root}/{LOCK_OBJECT}")


def test_convert_and_shards_to_s3_as_separate_stages(built, s3_server):
    """``convert RAW s3://.../volumes.zarr`` (lock in ``volumes.zarr.kneeprep``), then ``shards`` from that store
    to ``s3://.../shards``: the same volumes and shard bytes as the local rebuild."""
    from s3server import new_bucket

    sample, local, _, _ = built
    bucket = new_bucket(s3_server)
    store, shards = bucket.url("v/volumes.zarr"), bucket.url("v/shards")
    runner = CliRunner()
    common = ["--workers", "0", "--no-progress"]
    res = runner.invoke(
        cli,
        ["convert", str(sample / "raw"), store, "--recipe", str(RECIPE), "--annotations", str(sample)]
        + ["--masks", str(sample), *common],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert f"report: {store}.kneeprep/report.json" in res.output  # the published object, not the staging copy
    fs, root = url_filesystem(store)
    assert fs.exists(f"{root}.kneeprep/sources.json") and not fs.exists(f"{root}.kneeprep/{LOCK_OBJECT}")
    res = runner.invoke(
        cli, ["shards", store, str(sample), shards, "--recipe", str(RECIPE), *common], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    got = _remote_files(fs, root)
    want = {
        k[len("volumes.zarr/") :]: v for k, v in _local_files(local).items() if k.startswith("volumes.zarr/")
    }
    _assert_same(got, want, store, local / "volumes.zarr")
    sfs, sroot = url_filesystem(shards)
    want = {k[len("shards/") :]: v for k, v in _local_files(local).items() if k.startswith("shards/")}
    _assert_same(_remote_files(sfs, sroot), want)
    res = runner.invoke(cli, ["validate", shards, *common], catch_exceptions=False)
    assert res.exit_code == 0 and f"{shards}: OK" in res.output, res.output
    bucket.fs.rm(bucket.bucket, recursive=True)


def test_rebuild_to_memory_url_with_worker_processes_equals_a_local_rebuild(built, tmp_path, monkeypatch):
    """``memory://`` lives in one process: there the tasks (in worker processes) do not publish and the driver
    pushes everything at the end; the objects equal a local rebuild's and ``validate`` reads them."""
    import fsspec

    sample, local, _, _ = built
    monkeypatch.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "stage"))
    url = "memory://kneeprep-test/x"
    args = _rebuild_args(sample, url)
    args[args.index("--workers") + 1] = "2"
    try:
        res = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        fs, root = url_filesystem(url)
        _assert_same(_remote_files(fs, root), _local_files(local), url, local)
        res = CliRunner().invoke(cli, ["validate", f"{url}/shards", "--no-progress"], catch_exceptions=False)
        assert res.exit_code == 0 and f"{url}/shards: OK" in res.output, res.output
    finally:
        fsspec.filesystem("memory").rm("/kneeprep-test", recursive=True)


def test_a_rebuild_and_a_convert_into_its_store_exclude_each_other(built, capsys):
    """``rebuild --out s3://b/x`` also holds the lock of its store (``x/volumes.zarr.kneeprep``) and of its
    shards directory, the locks ``convert ... s3://b/x/volumes.zarr`` and ``shards ... s3://b/x/shards`` take:
    whichever starts second is refused, and nothing is written."""
    sample, _, _, url = built
    fs, root = url_filesystem(url)
    before = {k: v["etag"] for k, v in objstore.list_remote(fs, root).items()}
    store_lock = (f"{root}/volumes.zarr.kneeprep", f"{url}/volumes.zarr.kneeprep")
    convert = ["convert", str(sample / "raw"), f"{url}/volumes.zarr", "--recipe", str(RECIPE)]
    convert += ["--annotations", str(sample), "--masks", str(sample), "--workers", "0", "--no-progress"]
    with remote_lock(fs, *store_lock, "volume store"):  # what a running convert (or rebuild) holds
        for args in (_rebuild_args(sample, url), convert):
            with pytest.raises(SystemExit) as exit_:
                main(args)
            err = capsys.readouterr().err
            assert exit_.value.code == 1 and "Traceback" not in err, err
            assert "another kneeprep run is writing to this" in err and "volumes.zarr.kneeprep" in err, err
    with remote_lock(fs, f"{root}/shards", f"{url}/shards", "shards directory"):  # a running `shards`
        with pytest.raises(SystemExit) as exit_:
            main(_rebuild_args(sample, url))
        assert exit_.value.code == 1 and "writing to this shards directory" in capsys.readouterr().err
    assert {k: v["etag"] for k, v in objstore.list_remote(fs, root).items()} == before
    assert not fs.exists(f"{root}/{LOCK_OBJECT}")  # the refused rebuild released the lock it had taken


def test_a_task_whose_upload_fails_warns_and_the_final_push_publishes_its_volume(
    built, s3_server, tmp_path, monkeypatch
):
    """An upload error in a task (here: every one) is a warning on that volume, not a failure; the driver's
    final push publishes what no task could, so the objects still equal a clean run's."""
    from s3server import new_bucket

    from kneeprep.errors import StoreError
    from kneeprep.publish import Publisher

    def refuse(self, *a, **k):
        raise StoreError(f"{self.url}: could not publish: refused by the test")

    monkeypatch.setattr(Publisher, "volume", refuse)
    monkeypatch.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "stage"))
    sample, _, _, clean_url = built
    bucket = new_bucket(s3_server)
    url = bucket.url("x")
    res = CliRunner().invoke(cli, _rebuild_args(sample, url), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    fs, root = url_filesystem(url)
    rep = json.loads(fs.cat_file(f"{root}/volumes.zarr.kneeprep/report.json"))
    written = [i for i in rep["items"] if i["status"] == "written"]
    assert written and all(
        any("refused by the test; the end of the run publishes it" in w for w in i["warnings"])
        for i in written
    )
    cfs, croot = url_filesystem(clean_url)
    clean = {k: v for k, v in _remote_files(cfs, croot).items() if not k.startswith("export/")}
    _assert_same(_remote_files(fs, root), clean, url, clean_url)
    bucket.fs.rm(bucket.bucket, recursive=True)
