"""The scan as tasks (kneeprep.dicom.scan_tasks): the same result however the tree is cut into parts and
wherever the parts run -- one task for the whole tree (what a scan in one process did), one part per folder,
the default plan, and a Dask cluster -- also for a series whose files sit in folders of different parts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dicom_fixtures import FIXTURES, OAI_SERIES, make_fixture

from kneeprep.dicom import scan_tasks, scan_tree
from kneeprep.dicom.scan_tasks import plan


def _tree(tmp_path: Path) -> Path:
    """A series cut in two across patient folders (with an unreadable file next to its second half), a
    folder holding two series and files at the root."""
    root = tmp_path / "tree"
    shutil.copytree(make_fixture("two_series_one_folder", tmp_path / "fx"), root / "two")
    spread = make_fixture("clean", tmp_path / "spread")
    first = spread / OAI_SERIES
    other = spread / "00m" / "0.C.2" / "9000297" / "20040909" / "10693717"
    other.mkdir(parents=True)
    for f in sorted(first.iterdir())[4:]:
        f.rename(other / f.name)
    (other / "zz.dcm").write_bytes(b"not dicom at all")
    shutil.copytree(spread, root / "spread")
    (root / "notes.txt").write_text("a file at the root\n")
    return root


def _scan(root: Path, monkeypatch, min_parts: int, executor=None, batch_files: int = 1):
    monkeypatch.setattr(scan_tasks, "MIN_PARTS", min_parts)
    monkeypatch.setattr(scan_tasks, "BATCH_FILES", batch_files)  # 1: a task per folder listed by the plan
    return scan_tree(root, executor=executor)


@pytest.fixture
def tree(tmp_path):
    return _tree(tmp_path)


def test_plan_lists_directories_until_there_are_enough_parts(tree):
    assert [(p.path, p.tree) for p in plan(tree, 1)] == [(str(tree), True)]
    parts = plan(tree, 10**6)  # every folder that holds files is its own part
    assert all(not p.tree for p in parts)
    assert [Path(p.path) for p in parts] == [Path(d) for d, _, f in _walk(tree) if f]
    default = plan(tree)
    assert 1 < len(default) and [p.index for p in default] == list(range(len(default)))


def _walk(root):
    import os

    for d, dirs, files in os.walk(root):
        dirs.sort()
        yield d, dirs, files


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_scans_the_same_in_parts(name, tmp_path, monkeypatch):
    root = make_fixture(name, tmp_path)
    whole = _scan(root, monkeypatch, 1)  # one task reads the whole tree in walk order
    for n in (2, 10**6):
        assert _scan(root, monkeypatch, n) == whole, n


def test_the_result_does_not_depend_on_the_parts(tree, monkeypatch):
    whole = _scan(tree, monkeypatch, 1)  # one task reads the whole tree in walk order
    assert whole.unreadable and whole.non_dicom_skipped and len(whole.series) >= 2
    spread = [s for s in whole.series if "spread" in str(s.files[0])]
    assert len(spread) == 1 and len({f.parent for f in spread[0].files}) == 2  # one series, two folders
    for n in (2, 5, 64, 10**6):
        for batch in (1, 10, 10**6):
            assert _scan(tree, monkeypatch, n, batch_files=batch) == whole, (n, batch)


def test_provisional_series_come_per_part(tree, monkeypatch):
    monkeypatch.setattr(scan_tasks, "MIN_PARTS", 10**6)
    monkeypatch.setattr(scan_tasks, "BATCH_FILES", 1)
    seen = []
    final = scan_tree(tree, on_series=seen.append)
    ids = [s.volume_id for s in seen]
    assert len(ids) == len(set(ids)) and set(ids) >= {s.volume_id for s in final.series} - {
        s.volume_id for s in final.series if "." in s.series_folder
    }
    # the series cut in two is first seen with half its files; the final record has all of them
    half = [s for s in seen if "spread" in str(s.files[0])]
    assert half and len(half[0].files) < len(
        next(s for s in final.series if "spread" in str(s.files[0])).files
    )


def test_folders_are_batched_into_tasks_by_file_count(tree):
    from kneeprep.dicom.scan_tasks import batches

    parts = plan(tree, 10**6)
    assert [b.parts for b in batches(parts, 1)] == [(p,) for p in parts]
    assert len(batches(parts, 10**6)) == 1
    some = batches(parts, 10)
    assert [p for b in some for p in b.parts] == parts and [b.index for b in some] == list(range(len(some)))
    assert all(sum(p.n_files for p in b.parts) >= 10 for b in some[:-1])
    mixed = [*plan(tree, 3)]  # before any tree part was read, a tree part is a task of its own
    assert any(p.tree for p in mixed)
    assert all(len(b.parts) == 1 for b in batches(mixed, 10**6) if any(p.tree for p in b.parts))


def test_tree_parts_are_batched_by_the_size_of_those_read():
    from kneeprep.dicom.scan_tasks import Batcher, Part, PartResult

    parts = [Part(i, f"/t/{i}", True) for i in range(200)]
    cut = Batcher(parts, 100)
    got = [cut()]
    assert got[0].parts == (parts[0],)  # nothing read yet: alone
    cut.record(got[0], PartResult(0, [], [], n_files=10))  # tree parts hold ~10 files
    while len(got[-1].parts) < 10:  # at most as many as were read, until the mean says ~100 files
        read = sum(len(b.parts) for b in got)
        got.append(cut())
        assert len(got[-1].parts) <= read
        cut.record(got[-1], PartResult(got[-1].index, [], [], n_files=10 * len(got[-1].parts)))
    assert len(got) <= 6  # 1, 1, 2, 4, 8, then the mean's 10 (~100 files)
    extra = cut()
    # empty ones: the mean falls, capped per task
    cut.record(extra, PartResult(extra.index, [], [], n_files=0))
    rest = list(iter(cut, None))
    assert all(len(b.parts) <= scan_tasks.MAX_TREE_PARTS for b in rest)
    every = [*got, extra, *rest]
    assert [p for b in every for p in b.parts] == parts
    assert [b.index for b in every] == list(range(len(every)))


def test_an_unrepresentative_first_tree_part_does_not_put_the_tree_in_one_task():
    # series folders of 3, 160 and 96 files (a localizer first): the mean of the first one read is 3 files
    from kneeprep.dicom.scan_tasks import Batcher, Part, PartResult

    sizes = [3, 160, 96] * 25
    parts = [Part(i, f"/t/{i}", True) for i in range(len(sizes))]
    cut = Batcher(parts, 1024)
    pending, done = [cut(), cut()], []  # two workers
    while pending:
        b = pending.pop(0)
        files = sum(sizes[p.index] for p in b.parts)
        done.append(files)
        cut.record(b, PartResult(b.index, [], [], n_files=files))
        if (nxt := cut()) is not None:
            pending.append(nxt)
    assert sum(done) == sum(sizes)
    assert max(done) <= 2 * 1024  # before: one task of 64 parts, ~5,500 of the 6,475 files
    assert len(done) >= 8


def test_a_dask_cluster_gives_the_same_result(tree, monkeypatch):
    from kneeprep.parallel import executor

    whole = _scan(tree, monkeypatch, 1)
    with executor(workers=1) as ex:
        assert _scan(tree, monkeypatch, 10**6, ex) == whole


class _LosesRescans:
    """An executor on which every re-describe task of a spread series is lost (its worker died twice)."""

    def __init__(self):
        from kneeprep.parallel import SerialExecutor

        self._ex = SerialExecutor()
        self.lost = 0

    def stream(self, fn, on_error=None, **kwargs):
        return self._ex.stream(fn, on_error, **kwargs)

    def map_unordered(self, fn, items, on_error=None, **kwargs):
        if fn is not scan_tasks._rescan:
            return self._ex.map_unordered(fn, items, on_error, **kwargs)
        items = list(items)
        self.lost += len(items)
        return iter([on_error(item, RuntimeError("worker died twice")) for item in items])


def test_a_lost_re_describe_task_is_read_in_the_driver(tree, monkeypatch):
    whole = _scan(tree, monkeypatch, 1)
    ex = _LosesRescans()
    assert _scan(tree, monkeypatch, 10**6, executor=ex) == whole
    assert ex.lost >= 1  # the spread series' task was lost, and its result is still there


def test_cli_scan_streams_each_task_rows_to_a_partial_dataset(tree, tmp_path, monkeypatch):
    """``scan --out F``: while the scan runs, every task's rows are one file of ``F.partial/`` -- a Parquet
    dataset a reader opens meanwhile, holding every row added so far -- and ``F`` appears only at the end,
    whole, from the final records (the spread series settled); the folder is gone then, and one a killed run
    left is cleared first."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from kneeprep.cli import cli
    from kneeprep.stages import scan as scan_stage

    monkeypatch.setattr(scan_tasks, "BATCH_FILES", 1)  # a task per folder: several parts stream
    out = tmp_path / "inv" / "scan.parquet"
    stale = out.with_name("scan.parquet.partial")
    stale.mkdir(parents=True)
    (stale / "part-999999.parquet").write_text("left by a killed run: not Parquet")
    seen, streamed = [], []
    add = scan_stage.InventoryParts.add

    def watched(self, index, rows):
        add(self, index, rows)
        streamed.extend(r["series_uid"] for r in rows)
        assert not out.exists()
        seen.append((ds.dataset(self.folder, format="parquet").to_table().num_rows, self.rows))

    monkeypatch.setattr(scan_stage.InventoryParts, "add", watched)
    res = CliRunner().invoke(
        cli, ["scan", str(tree), "--out", str(out), "--workers", "0", "-q", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert len(seen) > 2 and all(on_disk == added for on_disk, added in seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen) and seen[-1][0] >= 4
    assert not stale.exists()
    final = pq.read_table(out).to_pylist()
    want = [scan_stage.series_row(s) for s in scan_tree(tree).series]
    assert final == want
    # the series cut over two patient folders streamed as provisional rows of each half, settled at the end
    uids = [r["series_uid"] for r in final]
    assert len(streamed) > len(final) and any(streamed.count(u) > uids.count(u) for u in uids)
