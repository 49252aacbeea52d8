"""Raw DICOM read from object storage (the local S3 server, ``tests/s3server.py``).

``kneeprep convert s3://bucket/raw STORE`` mirrors the tree into a staging folder, each file with its object's
modification time: the volumes equal a conversion of the local tree; the report and ``sources.json`` name the
URL, not the staging folder; a re-run from an empty staging folder (another machine) downloads every object
again but converts nothing (the fingerprint of names, sizes and mtimes is the same); a series whose objects
are deleted is removed from the store by the next run, as a deleted local folder is; ``kneeprep scan`` of the
URL names the objects by URL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kneeprep.cli import cli, main
from kneeprep.formats import store as vstore

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"


def _convert(raw: str, out: Path, sample: Path, stage: Path) -> tuple[int, str, dict]:
    args = ["convert", raw, str(out), "--recipe", str(RECIPE), "--annotations", str(sample)]
    args += ["--masks", str(sample), "--workers", "0", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KNEEPREP_STAGE_DIR", str(stage))
        res = CliRunner().invoke(cli, args, catch_exceptions=False)
    report = json.loads(vstore.report_path(out).read_text())
    return res.exit_code, res.output, report


def test_convert_from_s3_raw_equals_local_names_the_url_and_resumes_elsewhere(
    small_sample, s3_bucket, tmp_path, monkeypatch
):
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    s3_bucket.fs.put(str(small_sample / "raw"), f"{s3_bucket.bucket}/tree", recursive=True)
    url = s3_bucket.url("tree")
    local_store, s3_store = tmp_path / "local.zarr", tmp_path / "s3.zarr"

    code, out, _ = _convert(str(small_sample / "raw"), local_store, small_sample, tmp_path / "stage")
    assert code == 0, out
    code, out, rep = _convert(url, s3_store, small_sample, tmp_path / "stage")
    assert code == 0, out
    vids = vstore.list_volumes(local_store)
    assert vids and vstore.list_volumes(s3_store) == vids
    for vid in vids:
        np.testing.assert_array_equal(
            np.asarray(vstore.read_volume(s3_store, vid)[0]),
            np.asarray(vstore.read_volume(local_store, vid)[0]),
        )
        a, b = vstore.read_volume_attrs(s3_store, vid), vstore.read_volume_attrs(local_store, vid)
        assert a.boxes == b.boxes and a.source.content_hash == b.source.content_hash
    # the URL names the tree: in the report and in sources.json, never the staging folder
    stage = str(tmp_path / "stage")
    assert rep["context"]["raw"] == url
    written = [i for i in rep["items"] if i["status"] == "written"]
    assert len(written) == len(vids) and all(i["source"].startswith(url + "/") for i in written)
    assert stage not in json.dumps(rep)
    sources = json.loads((vstore.kneeprep_dir(s3_store) / vstore.SOURCES_FILE).read_text())
    assert sources == {v: url for v in vids}

    # another machine (an empty staging folder): every object downloaded again, nothing converted
    mark = len(s3_bucket.requests())
    code, out, rep = _convert(url, s3_store, small_sample, tmp_path / "elsewhere")
    assert code == 0, out
    assert {i["status"] for i in rep["items"] if i["item"] in vids} == {"skipped"}, out
    assert all(i["kind"] == "unchanged" for i in rep["items"] if i["item"] in vids)
    n_objects = sum(1 for _ in (small_sample / "raw").rglob("*") if _.is_file())
    got = [k for m, k, q, _ in s3_bucket.requests()[mark:] if m == "GET" and k.startswith("tree/") and not q]
    assert len(got) == n_objects  # each object downloaded once

    # a series deleted from the bucket: its volume is removed, as for a local tree
    gone = next(i for i in rep["items"] if i["item"] == vids[0])["source"]
    s3_bucket.fs.rm(f"{s3_bucket.bucket}/{gone[len('s3://' + s3_bucket.bucket) + 1 :]}", recursive=True)
    code, out, rep = _convert(url, s3_store, small_sample, tmp_path / "elsewhere")
    assert code == 1 and vids[0] not in vstore.list_volumes(s3_store), out
    removed = [i for i in rep["items"] if i["status"] == "removed"]
    assert [i["item"] for i in removed] == [vids[0]] and url in removed[0]["message"]
    assert vstore.list_volumes(s3_store) == vids[1:]


def test_scan_of_an_s3_tree_names_the_objects_by_url(small_sample, s3_bucket, tmp_path, monkeypatch):
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "stage"))
    s3_bucket.fs.put(str(small_sample / "raw"), f"{s3_bucket.bucket}/tree", recursive=True)
    url = s3_bucket.url("tree")
    res = CliRunner().invoke(cli, ["scan", url, "-q", "--no-progress", "--out", str(tmp_path / "s3.csv")])
    assert res.exit_code == 0, res.output
    res_local = CliRunner().invoke(
        cli, ["scan", str(small_sample / "raw"), "-q", "--no-progress", "--out", str(tmp_path / "local.csv")]
    )
    assert res_local.exit_code == 0, res_local.output
    s3_rows = (tmp_path / "s3.csv").read_text().splitlines()
    local_rows = (tmp_path / "local.csv").read_text().splitlines()
    assert len(s3_rows) == len(local_rows) > 1
    assert str(tmp_path / "stage") not in "\n".join(s3_rows)
    assert (tmp_path / "s3.csv").read_text().count(url + "/") == len(s3_rows) - 1
    # the same rows once the tree's location is taken out
    norm = lambda text, root: text.replace(root, "<root>").replace(os.sep, "/")  # noqa: E731
    assert norm("\n".join(s3_rows), url) == norm("\n".join(local_rows), str(small_sample / "raw"))


def test_an_empty_or_missing_raw_url_is_a_clear_error(s3_bucket, tmp_path, monkeypatch, capsys):
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "stage"))
    with pytest.raises(SystemExit) as exit_:
        main(["scan", s3_bucket.url("nothing-here"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert f"{s3_bucket.url('nothing-here')}: nothing here (no such prefix, or no objects)" in err, err


def test_rebuild_from_an_s3_tree_to_s3(small_sample, s3_bucket, tmp_path, monkeypatch):
    """Both ends on the object store: the output's lock first (a refused run downloads nothing), then the tree
    mirrored; the published volumes' report names the tree's URL."""
    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "stage"))
    s3_bucket.fs.put(str(small_sample / "raw"), f"{s3_bucket.bucket}/tree", recursive=True)
    url, out = s3_bucket.url("tree"), s3_bucket.url("out")
    args = ["rebuild", "--recipe", str(RECIPE), "--raw", url, "--annotations", str(small_sample)]
    args += ["--masks", str(small_sample), "--out", out, "--workers", "0", "--no-progress"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(s3_bucket.fs.cat_file(f"{s3_bucket.bucket}/out/volumes.zarr.kneeprep/report.json"))
    assert rep["context"]["raw"] == url
    assert json.loads(s3_bucket.fs.cat_file(f"{s3_bucket.bucket}/out/shards/manifest.json"))["shards"]


def test_a_second_run_reading_the_same_url_through_the_same_staging_copy_is_refused(
    small_sample, s3_bucket, tmp_path, monkeypatch, capsys
):
    from kneeprep.files import lock
    from kneeprep.remote import stage_path

    for k, v in s3_bucket.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KNEEPREP_STAGE_DIR", str(tmp_path / "stage"))
    s3_bucket.fs.put(str(small_sample / "raw"), f"{s3_bucket.bucket}/tree", recursive=True)
    url = s3_bucket.url("tree")
    with lock(stage_path(url, "raw").parent, "staging copy"):  # what a running scan/convert/rebuild holds
        with pytest.raises(SystemExit) as exit_:
            main(["scan", url, "-q", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err
    assert f"another kneeprep run is writing to this staging copy of {url}" in err, err
    assert "KNEEPREP_STAGE_DIR" in err
    assert not [
        k for m, k, _, _ in s3_bucket.requests() if m == "GET" and k.startswith("tree/")
    ]  # nothing read
