"""`kneeprep rebuild` end to end on the small sample; resumability; the dataset card; `kneeprep preview`."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kneeprep.cli import cli
from kneeprep.recipe import load_recipe

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"


def _rebuild(sample: Path, out: Path, recipe: Path = RECIPE):
    args = [
        "rebuild", "--recipe", str(recipe), "--raw", str(sample / "raw"), "--annotations", str(sample),
        "--masks", str(sample), "--out", str(out), "--workers", "0", "--no-progress",
    ]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuild")
    res = _rebuild(small_sample, out)
    return small_sample, out, res


def test_rebuild_end_to_end(built):
    sample, out, res = built
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and not report["did_nothing"]
    truth = json.loads((sample / "truth.json").read_text())
    written = report["stages"]["convert"]["counts"]["written"]
    assert written == len(truth["volumes"] if "volumes" in truth else truth)
    # what convert has just written carries this recipe's boxes: the boxes stage does not check it again
    assert (report["stages"]["boxes"]["volumes"], report["stages"]["boxes"]["unchanged"]) == (0, written)
    n_lines = sum(1 for _ in (sample / "quintuples.jsonl").open())
    q = report["stages"]["shards"]["quintuples"]
    rejected = sum(report["stages"]["shards"]["rejected"].values())
    assert sum(q.values()) + rejected == n_lines  # nothing dropped silently
    assert report["stages"]["validate"]["problems"] == []
    for stage in ("scan", "convert", "boxes", "shards", "validate"):
        assert stage in report["seconds"] and stage in res.output
    assert report["seconds"]["cluster_start"] >= 0 and "cluster start" in res.output
    assert "summary" in res.output and "status      ok" in res.output


def test_rerun_does_no_work_and_says_so(built, tmp_path):
    sample, out, _ = built
    before = _mtimes(out / "volumes.zarr") | {f"s/{k}": v for k, v in _mtimes(out / "shards").items()}
    res = _rebuild(sample, out)
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output
    after = _mtimes(out / "volumes.zarr") | {f"s/{k}": v for k, v in _mtimes(out / "shards").items()}
    changed = {k for k in before if after.get(k) != before[k]}
    # only the run reports and the card are rewritten; no volume, box or shard is touched
    assert changed <= {"report.json", "s/README.md"}, changed
    assert json.loads((out / "report.json").read_text())["did_nothing"]


def test_changing_a_recipe_value_rebuilds_only_what_depends_on_it(small_sample, tmp_path):
    out = tmp_path / "out"
    assert _rebuild(small_sample, out).exit_code == 0
    zarr_before = {k: v for k, v in _mtimes(out / "volumes.zarr").items() if "/image/" in k}
    manifest_before = json.loads((out / "shards" / "manifest.json").read_text())

    # [boxes] margin: boxes and shards change, images are not re-converted
    text = RECIPE.read_text().replace("margin_mm = 0.0", "margin_mm = 3.0")
    r2 = tmp_path / "margin.toml"
    r2.write_text(text)
    res = _rebuild(small_sample, out, r2)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())["stages"]
    assert rep["convert"]["counts"]["written"] == 0
    assert rep["boxes"]["volumes"] == len({k.split("/")[0] for k in zarr_before})
    assert {k: v for k, v in _mtimes(out / "volumes.zarr").items() if "/image/" in k} == zarr_before
    manifest_after = json.loads((out / "shards" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest_after["shards"]] != [s["sha256"] for s in manifest_before["shards"]]

    # [shards] target size only: nothing upstream is redone
    r3 = tmp_path / "shards.toml"
    r3.write_text(text.replace("target_bytes = 536870912", "target_bytes = 400000"))
    res = _rebuild(small_sample, out, r3)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())["stages"]
    assert rep["convert"]["counts"]["written"] == 0 and rep["boxes"]["volumes"] == 0
    assert rep["shards"]["up_to_date"] is False
    assert len(json.loads((out / "shards" / "manifest.json").read_text())["shards"]) > len(
        manifest_before["shards"]
    )


def test_dataset_card(built):
    _, out, _ = built
    card = (out / "shards" / "README.md").read_text()
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    for split, m in manifest["splits"].items():
        if m["rows"]:
            assert f"| {split} | {m['rows']} |" in card
    recipe = load_recipe(RECIPE)
    assert recipe.hash in card and "CC-BY-4.0" in card and "data use agreement" in card
    assert "| bml |" in card and "`image`" in card


def _read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", None, None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]
        if tag == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_preview_draws_the_region_box(built, tmp_path):
    _, out, _ = built
    png = tmp_path / "p.png"
    res = CliRunner().invoke(
        cli,
        ["preview", str(out / "volumes.zarr"), "--first", "--region", "femur medial central", "-o", str(png)],
    )
    assert res.exit_code == 0, res.output
    rgb = _read_png(png)[30 + 24 :]  # below the title bar and the panel captions
    red = (rgb[..., 0] == 255) & (rgb[..., 1] == 40) & (rgb[..., 2] == 40)
    yellow = (rgb[..., 0] == 255) & (rgb[..., 1] == 220) & (rgb[..., 2] == 0)
    assert red.sum() > 50 and yellow.sum() > 20
    # the region's outline lies inside the box's rectangle in every panel where both are drawn
    third = rgb.shape[1] // 3
    for panel in range(3):
        cols = slice(panel * third, (panel + 1) * third)
        r, y = np.argwhere(red[:, cols]), np.argwhere(yellow[:, cols])
        if len(r) and len(y):
            assert (y.min(0) >= r.min(0)).all() and (y.max(0) <= r.max(0)).all()
    bad = CliRunner().invoke(
        cli, ["preview", str(out / "volumes.zarr"), "--first", "--region", "nope", "-o", str(png)]
    )
    assert bad.exit_code == 2 and "not a region" in bad.output


def test_a_second_shards_run_into_the_same_directory_is_refused(built, capsys):
    """Two `kneeprep shards` runs at once used to share .partial names and corrupt a shard (issue 19, point 1):
    while one run holds the shards directory, another stops before any work, naming it."""
    from kneeprep.cli import main
    from kneeprep.files import lock

    sample, out, _ = built
    shards = out / "shards"
    before = _mtimes(shards)
    args = ["shards", str(out / "volumes.zarr"), str(sample), str(shards), "--recipe", str(RECIPE), "--force"]
    with lock(shards, what="shards directory"), pytest.raises(SystemExit) as exit_:  # a run in progress
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert (
        f"{shards}: another kneeprep run is writing to this shards directory" in err
        and "Traceback" not in err
    )
    assert _mtimes(shards) == before
    assert CliRunner().invoke(cli, ["validate", str(shards), "--workers", "0"]).exit_code == 0


def test_shards_and_validate_report_progress_without_click(built, tmp_path):
    """The stages call a plain progress(done, total) callback; the CLI draws it (issue 18, point 6)."""
    from kneeprep.recipe import load_recipe
    from kneeprep.stages.shards import build_shards
    from kneeprep.stages.validate import validate_shards

    sample, out, _ = built
    calls: list[tuple[int, int]] = []
    r = build_shards(
        out / "volumes.zarr",
        sample,
        tmp_path / "s",
        load_recipe(RECIPE),
        progress=lambda task, d, t, item: calls.append((d, t)) if task == "shards" and item else None,
    )
    n = r["shards"]  # one tick per shard task
    assert n > 0 and calls == [(i, n) for i in range(1, n + 1)]
    seen: list[tuple[int, int]] = []
    assert (
        validate_shards(
            tmp_path / "s",
            progress=lambda task, d, t, item: seen.append((d, t)) if task == "validate" and item else None,
        )
        == []
    )
    assert seen[-1] == (r["shards"], r["shards"]) and len(seen) == r["shards"]
    from kneeprep.stages.boxes import recompute_store_boxes

    box_calls: list[tuple[int, int]] = []
    recompute_store_boxes(
        out / "volumes.zarr",
        load_recipe(RECIPE),
        stale_only=True,
        progress=lambda task, d, t, item: box_calls.append((d, t)) if task == "boxes" else None,
    )
    assert box_calls and box_calls[-1][0] == box_calls[-1][1] == len(box_calls)
    res = CliRunner().invoke(cli, ["validate", str(tmp_path / "s"), "--no-progress"])
    assert res.exit_code == 0 and "OK" in res.output


def test_an_edited_question_bank_is_reported_when_records_carry_their_own_prompts(built, tmp_path):
    """Which prompt wins is a rule -- the record's own -- and a bank that disagrees is reported (issue 19.9)."""
    import shutil

    from kneeprep.loader import ShardDataset
    from kneeprep.recipe import load_recipe
    from kneeprep.stages.shards import build_shards

    sample, out, _ = built
    ann = tmp_path / "ann"
    ann.mkdir()
    for name in ("quintuples.jsonl", "split_files"):
        src = sample / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ann / name)
    bank = json.loads((sample / "questions.json").read_text())
    original = bank["1"]
    bank["1"] = "An edited prompt for question 1."
    (ann / "questions.json").write_text(json.dumps(bank))
    r = build_shards(out / "volumes.zarr", ann, tmp_path / "s", load_recipe(RECIPE))
    records = [json.loads(line) for line in (sample / "quintuples.jsonl").read_text().splitlines() if line]
    expected = sum(1 for x in records if x["question_id"] == "1")
    assert expected and r["prompt_rule"] == "record" and r["prompt_mismatches"] == expected
    assert {x["question_id"] for x in r["prompt_mismatch_examples"]} == {"1"}
    rows = [
        s
        for s in ShardDataset(tmp_path / "s", shuffle=False, columns=["question_id", "question"])
        if s["question_id"] == "1"
    ]
    assert rows and {s["question"] for s in rows} == {original}  # the record's prompt is what was written


def test_a_rebuild_keeps_what_earlier_stages_made_out_of_the_collectors_walks_and_undoes_it(
    small_sample, tmp_path, monkeypatch
):
    """Between stages the run's objects are frozen (gc.freeze: the shards stage starts with a permanent
    generation); after the run nothing is left frozen; a process that froze objects itself is left alone."""
    import gc

    from kneeprep.stages import rebuild as rb
    from kneeprep.stages.harness import settled_heap

    seen = []
    real = rb.build_shards
    monkeypatch.setattr(
        rb, "build_shards", lambda *a, **k: seen.append(gc.get_freeze_count()) or real(*a, **k)
    )
    assert gc.get_freeze_count() == 0
    res = _rebuild(small_sample, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        with settled_heap() as settle:
            extra = [[] for _ in range(10)]  # noqa: F841  (lists: objects the collector tracks)
            settle()
            assert gc.get_freeze_count() == mine
        assert gc.get_freeze_count() == mine
    finally:
        gc.unfreeze()
