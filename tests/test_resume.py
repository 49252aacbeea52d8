"""Re-runs tell the truth (issue 19.2, 19.4, 19.5): derived tables follow the volumes after a kill, vanished
or now-refused series lose their volumes, ``--verify`` catches in-place edits.

* the boxes table after a SIGKILL just after a changed volume was installed, and after a full disk during the
  table write: the next ``convert`` rewrites it, and ``kneeprep validate STORE`` finds the stale one;
* a slice file or a whole series folder deleted: the re-run removes those volumes (``removed``, exit 1) and
  its store and shards equal a clean run's; a run over another raw tree into the same store removes nothing
  of the first tree's;
* pixel bytes edited in place with the mtime restored: invisible by default (documented), caught by
  ``--verify``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner
from test_convert import Tree

from kneeprep.cli import cli
from kneeprep.errors import KneeprepError
from kneeprep.formats import store
from kneeprep.formats.box import BOXES_TABLE, BOXES_TABLE_STALE
from kneeprep.formats.shard_reader import read_manifest
from kneeprep.recipe import parse_recipe
from kneeprep.stages.convert import run_convert
from kneeprep.stages.resume import read_sources
from kneeprep.stages.validate_store import validate_store

ROOT = Path(__file__).parent.parent


def _tree_with_masks(tmp_path: Path) -> tuple[Tree, Path]:
    tree = Tree(tmp_path / "t")
    ids = [tree.add("9000001", "RIGHT"), tree.add("9000002", "LEFT")]
    rows = {vid: tree.add_mask(vid) for vid in ids}
    return tree, tree.write_splits(rows)


def _table(store_path: Path) -> list[dict]:
    rows = pq.read_table(store.boxes_table_path(store_path)).to_pylist()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def _change_inputs(tree: Tree) -> tuple[str, str]:
    """A new series with a mask, and one existing series' mask moved (its boxes change)."""
    new = tree.add("9000003", "RIGHT")
    rows = {vid: f"masks/{vid}.nii.gz" for vid in tree.series if vid != new} | {new: tree.add_mask(new)}
    changed = next(iter(tree.series))
    tree.add_mask(changed, shift_mm=2.0)
    tree.write_splits(rows)
    return new, changed


def test_a_kill_after_a_volume_is_installed_leaves_no_stale_boxes_table(tmp_path):
    tree, annotations = _tree_with_masks(tmp_path)
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({})
    assert run_convert(tree.raw, out, recipe, annotations=annotations, workers=0).counts["written"] == 2
    before = _table(out)
    new, changed = _change_inputs(tree)
    # SIGKILL right after the first changed volume is installed (before the driver rewrites the table)
    script = textwrap.dedent(f"""
        import os, signal
        from kneeprep.formats import store
        from kneeprep.recipe import parse_recipe
        from kneeprep.stages.convert import run_convert
        real = store.write_volume
        def write_then_die(*a, **k):
            path = real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        store.write_volume = write_then_die
        run_convert({str(tree.raw)!r}, {str(out)!r}, parse_recipe({{}}), annotations={str(annotations)!r}, workers=0)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", script], env=env, timeout=120, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert _table(out) == before  # the table still describes the old volumes ...
    problems = validate_store(out)
    assert problems and any(p.kind == "boxes_table" for p in problems)  # ... and validate says so
    r = CliRunner().invoke(cli, ["validate", str(out)])
    assert r.exit_code == 1 and "boxes_table" in r.output
    # the re-run: every volume's rows as its attrs give them, equal to a clean run's table
    again = run_convert(tree.raw, out, recipe, annotations=annotations, workers=0)
    assert again.counts["failed"] == 0
    clean = tmp_path / "clean.zarr"
    run_convert(tree.raw, clean, recipe, annotations=annotations, workers=0)
    assert _table(out) == _table(clean) != before
    assert {r["volume_id"] for r in _table(out)} == set(
        store.list_volumes(out)
    ) and new in store.list_volumes(out)
    assert validate_store(out) == [] and not (store.kneeprep_dir(out) / BOXES_TABLE_STALE).exists()
    r = CliRunner().invoke(cli, ["validate", str(out)])
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_a_full_disk_while_writing_the_boxes_table_is_repaired_by_the_next_convert(tmp_path, monkeypatch):
    import kneeprep.stages.boxes as boxes_stage

    tree, annotations = _tree_with_masks(tmp_path)
    out = tmp_path / "v.zarr"
    real = boxes_stage.pq.write_table

    def full(table, where, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(boxes_stage.pq, "write_table", full)
    try:
        run_convert(tree.raw, out, parse_recipe({}), annotations=annotations, workers=0)
    except (KneeprepError, OSError) as e:
        assert BOXES_TABLE in str(e) or "space" in str(e)
    monkeypatch.setattr(boxes_stage.pq, "write_table", real)
    assert not store.boxes_table_path(out).exists() and len(store.list_volumes(out)) == 2
    assert not [p for p in out.iterdir() if p.name.startswith(BOXES_TABLE) and p.name != BOXES_TABLE]
    again = run_convert(tree.raw, out, parse_recipe({}), annotations=annotations, workers=0)
    assert again.counts["written"] == 0  # nothing changed since ... and still the table is written
    assert store.boxes_table_path(out).is_file() and validate_store(out) == []


def _rebuild(raw: Path, annotations: Path, out: Path):
    args = ["rebuild", "--recipe", "3dreasonknee", "--raw", str(raw), "--annotations", str(annotations),
            "--masks", str(annotations), "--out", str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _series_folders(raw: Path) -> list[Path]:
    return sorted({p.parent for p in raw.rglob("*") if p.is_file() and p.name.isdigit()})


def _quintuple_volumes(shards: Path) -> set[str]:
    vols = set()
    for e in read_manifest(shards)["shards"]:
        vols |= set(pq.read_table(shards / e["path"], columns=["volume_id"]).column(0).to_pylist())
    return vols


def test_vanished_inputs_remove_their_volumes_and_quintuples_as_a_clean_run_would(small_sample, tmp_path):
    sample = tmp_path / "sample"
    shutil.copytree(small_sample, sample)
    out = tmp_path / "out"
    first = _rebuild(sample / "raw", sample, out)
    assert first.exit_code == 0, first.output
    vols = store.list_volumes(out / "volumes.zarr")
    assert len(vols) == 5
    folders = {store.read_attrs(out / "volumes.zarr", v)["series_folder"]: v for v in vols}
    by_vid = {folders[f.name]: f for f in _series_folders(sample / "raw") if f.name in folders}
    one_slice, whole = sorted(by_vid)[:2]
    next(p for p in sorted(by_vid[one_slice].iterdir()) if p.name.isdigit() and p.name != "001").unlink()
    shutil.rmtree(by_vid[whole])
    assert {one_slice, whole} <= _quintuple_volumes(out / "shards")

    again = _rebuild(sample / "raw", sample, out)
    assert again.exit_code == 1 and "2 removed" in again.output, again.output
    rep = json.loads(store.report_path(out / "volumes.zarr").read_text())
    removed = {i["item"]: i for i in rep["items"] if i["status"] == "removed"}
    assert set(removed) == {one_slice, whole}
    assert removed[one_slice]["kind"] == "qc" and "missing" in removed[one_slice]["message"]
    assert removed[whole]["kind"] == "vanished" and "removed" in removed[whole]["message"]
    # what a clean run of the changed tree gives: the same volumes, the same quintuples
    clean = tmp_path / "clean"
    fresh = _rebuild(sample / "raw", sample, clean)
    assert store.list_volumes(out / "volumes.zarr") == store.list_volumes(clean / "volumes.zarr")
    assert one_slice not in store.list_volumes(out / "volumes.zarr")
    assert _quintuple_volumes(out / "shards") == _quintuple_volumes(clean / "shards")
    assert not {one_slice, whole} & _quintuple_volumes(out / "shards")
    assert _table(out / "volumes.zarr") == _table(clean / "volumes.zarr")
    # and a further re-run has nothing left to remove: it exits as the clean run did
    assert _rebuild(sample / "raw", sample, out).exit_code == fresh.exit_code


def test_a_run_over_another_raw_tree_removes_nothing_of_the_first(tmp_path):
    a, b = Tree(tmp_path / "a"), Tree(tmp_path / "b")
    va = a.add("9000001", "RIGHT")
    vb = b.add("9000002", "LEFT")
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({})
    assert run_convert(a.raw, out, recipe, workers=0).counts["written"] == 1
    rep = run_convert(b.raw, out, recipe, workers=0)
    assert rep.counts == {"written": 1, "skipped": 0, "failed": 0}
    assert store.list_volumes(out) == sorted([va, vb])
    assert read_sources(out) == {va: os.path.abspath(a.raw), vb: os.path.abspath(b.raw)}
    assert (
        "raw_root" not in store.read_attrs(out, va)["source"]
    )  # a volume does not depend on where raw lives
    shutil.rmtree(b.series[vb]["folder"])
    (b.raw / "00m" / "other").mkdir()
    r = CliRunner().invoke(cli, ["convert", str(b.raw), str(out), "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and "removed" in r.output and vb in r.output, r.output
    assert store.list_volumes(out) == [va]


def _edit_pixels_keep_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-2:] = (int.from_bytes(data[-2:], "little") ^ 0x0101).to_bytes(2, "little")  # the last pixel
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_verify_catches_an_in_place_edit_with_the_mtime_restored(tmp_path):
    tree = Tree(tmp_path / "t")
    vid = tree.add("9000001", "RIGHT")
    other = tree.add("9000002", "LEFT")
    out = tmp_path / "v.zarr"
    recipe = parse_recipe({})
    assert run_convert(tree.raw, out, recipe, workers=0).counts["written"] == 2
    stored = store.read_volume(out, vid)[0].copy()
    _edit_pixels_keep_mtime(tree.series[vid]["files"][-1])
    # the default re-run looks at names, sizes and mtimes only: the edit is invisible (documented)
    plain = run_convert(tree.raw, out, recipe, workers=0)
    assert plain.counts["written"] == 0
    assert np.array_equal(store.read_volume(out, vid)[0], stored)
    # --verify hashes the bytes: that volume is redone, the untouched one is verified and kept
    r = CliRunner().invoke(
        cli, ["convert", str(tree.raw), str(out), "--workers", "0", "--no-progress", "--verify"]
    )
    assert r.exit_code == 0, r.output
    rep = {i["item"]: i for i in json.loads(store.report_path(out).read_text())["items"]}
    assert rep[vid]["status"] == "written" and rep[vid]["details"]["replaced"]
    assert rep[other]["status"] == "skipped" and "verified" in rep[other]["message"]
    image = store.read_volume(out, vid)[0]
    assert not np.array_equal(image, stored)
    assert int((image != stored).sum()) == 1  # the edited pixel, nothing else
    assert json.loads(store.report_path(out).read_text())["context"]["verify"] is True
    assert "--verify" in CliRunner().invoke(cli, ["rebuild", "--help"]).output
