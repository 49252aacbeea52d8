"""Patient data: no DICOM identifier reaches any output; ``privacy.pseudonymize_ids`` replaces patient ids.

The synth sample writes names, birth dates, addresses, accession numbers, other ids, institution, physician,
operator and station markers (``kneeprep.synth.PHI_MARKERS``) into every DICOM file. A rebuild's outputs --
every file of the Zarr store (chunks decoded through zarr), the shards (every column of every Parquet file read
back decompressed), the manifest, the dataset card, all reports -- must hold none of them. The same search finds
them in the raw DICOM tree (positive control), so an empty result means something.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import hmac
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kneeprep.cli import cli, main
from kneeprep.errors import RecipeError
from kneeprep.formats.card import write_card
from kneeprep.formats.shard_schema import MANIFEST
from kneeprep.formats.splits import read_split_csvs
from kneeprep.privacy import Pseudonymizer
from kneeprep.recipe import load_recipe
from kneeprep.stages.shards import build_shards
from kneeprep.stages.validate import validate_shards
from kneeprep.synth import PHI_MARKERS

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"
KEY_ENV = "KNEEPREP_ID_KEY"


def _texts_of_parquet(path: Path) -> list[bytes]:
    """Every value of every column, decompressed: strings (also inside lists/structs) as JSON, binaries as is."""
    t = pq.read_table(path)
    out = []
    for name in t.column_names:
        col = t.column(name)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out += [v for v in col.to_pylist() if v is not None]
        else:
            out.append(json.dumps(col.to_pylist(), default=str).encode())
    out.append(
        json.dumps(
            {k.decode(): v.decode(errors="replace") for k, v in (t.schema.metadata or {}).items()}
        ).encode()
    )
    return out


def _zarr_contents(store_path: Path) -> list[bytes]:
    """Every array of a Zarr v3 hierarchy read through zarr (chunks decompressed), as bytes."""
    import zarr

    out = []
    for meta in store_path.rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            out.append(np.ascontiguousarray(zarr.open_array(str(meta.parent), mode="r")[...]).tobytes())
    return out


def contents(root: Path) -> dict[str, list[bytes]]:
    """Each file under ``root`` -> what a reader could get out of it: raw bytes, plus decoded Parquet columns,
    gunzipped data, and (once, under the store's path) every decoded Zarr array."""
    found: dict[str, list[bytes]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        blobs = [p.read_bytes()]
        if p.suffix == ".parquet":
            blobs += _texts_of_parquet(p)
        elif p.suffix == ".gz":
            blobs.append(gzip.decompress(blobs[0]))
        elif (
            p.name == "zarr.json"
            and json.loads(blobs[0]).get("attributes", {}).get("kneeprep", {}).get("kind") == "volume_store"
        ):
            blobs += _zarr_contents(p.parent)
        found[rel] = blobs
    return found


def hits(root: Path, needles) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel, blobs in contents(root).items():
        for n in needles:
            if any(n.encode() in b for b in blobs):
                out.setdefault(rel, []).append(n)
    return out


def _rebuild(sample: Path, out: Path, recipe: Path = RECIPE):
    args = ["rebuild", "--recipe", str(recipe), "--raw", str(sample / "raw"), "--annotations", str(sample),
            "--masks", str(sample), "--out", str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def built(small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy") / "out"
    res = _rebuild(small_sample, out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def pseudo_recipe(tmp_path) -> Path:
    p = tmp_path / "pseudo.toml"
    p.write_text(RECIPE.read_text().replace("pseudonymize_ids = false", "pseudonymize_ids = true"))
    assert load_recipe(p).privacy.pseudonymize_ids
    return p


def real_patients(sample: Path) -> set[str]:
    return {r.patient_id for r in read_split_csvs(sample)}


def test_no_dicom_identifier_in_any_output(small_sample, built):
    markers = sorted(set(PHI_MARKERS.values()))
    # positive control: the search finds every marker in the raw DICOM
    raw_hits = hits(small_sample / "raw", markers)
    assert raw_hits and set().union(*raw_hits.values()) == set(markers)

    scanned = contents(built)
    kinds = {Path(r).suffix for r in scanned} | {r.split("/")[0] for r in scanned}
    assert {
        ".parquet",
        ".json",
        ".md",
        "volumes.zarr",
        "shards",
    } <= kinds  # store, shards, reports, card, manifest
    assert any("/c/" in r for r in scanned)  # zarr chunk files were walked (and decoded through zarr)
    assert hits(built, markers) == {}


def test_pseudonymized_shards_hold_no_real_patient_id(
    small_sample, built, pseudo_recipe, tmp_path, monkeypatch
):
    store = built / "volumes.zarr"
    patients = real_patients(small_sample)
    assert patients and hits(built / "shards", sorted(patients))  # the plain shards do hold them

    monkeypatch.setenv(KEY_ENV, "key-one")
    recipe = load_recipe(pseudo_recipe)
    a = tmp_path / "a"
    rep = build_shards(store, small_sample, a, recipe)
    write_card(a, recipe)
    assert rep["errors"] == 0 and validate_shards(a) == []
    leaks = hits(a, sorted(patients) + sorted(set(PHI_MARKERS.values())))
    assert leaks == {}, leaks

    def ids(d: Path) -> list[tuple[str, str, str]]:
        m = json.loads((d / MANIFEST).read_text())
        rows = []
        for e in m["shards"]:
            t = pq.read_table(d / e["path"], columns=["sample_id", "volume_id", "patient_id"])
            rows += list(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))
        return sorted(rows)

    plain, pseudo = ids(built / "shards"), ids(a)
    h = lambda p, key=b"key-one": hmac.new(key, p.encode(), hashlib.sha256).hexdigest()[:16]  # noqa: E731
    expected = sorted((h(p) + s[len(p) :], h(p) + v[len(p) :], h(p)) for s, v, p in plain)
    assert pseudo == expected  # HMAC-SHA256 of the patient id; the rest of each id kept, so joins still work
    assert len({p for _, _, p in pseudo}) == len(patients)

    # the same key: the same bytes (a fresh directory), and a re-run does nothing
    b = tmp_path / "b"
    build_shards(store, small_sample, b, recipe)
    assert (a / MANIFEST).read_bytes() == (b / MANIFEST).read_bytes()
    assert build_shards(store, small_sample, b, recipe)["up_to_date"] is True
    # another key: other ids, and shards made with the first key are not "up to date"
    monkeypatch.setenv(KEY_ENV, "key-two")
    rep = build_shards(store, small_sample, b, recipe)
    assert rep["up_to_date"] is False
    other = ids(b)
    assert {p for _, _, p in other}.isdisjoint({p for _, _, p in pseudo})
    assert sorted(p for _, _, p in other) == sorted(h(p, b"key-two") for _, _, p in plain)

    card = (a / "README.md").read_text()
    assert "keyed hashes" in card and not any(p in card for p in patients)

    # `kneeprep export` of the pseudonymized shards: NIfTI (gunzipped and searched), CSVs, items, reports
    ex = tmp_path / "export"
    res = CliRunner().invoke(cli, ["export", str(a), str(ex), "--workers", "0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(list(ex.rglob("*.nii.gz"))) == 5 and (ex / "split_files" / "train_split.csv").is_file()
    assert hits(ex, sorted(patients) + sorted(set(PHI_MARKERS.values()))) == {}
    assert {r["patient_id"] for r in csv.DictReader((ex / "split_files" / "train_split.csv").open())} <= {
        p for _, _, p in pseudo
    }


def test_rejections_in_the_shards_report_are_pseudonymized(
    small_sample, built, pseudo_recipe, tmp_path, monkeypatch
):
    ann = tmp_path / "ann"
    ann.mkdir()
    for name in ("questions.json",):
        (ann / name).write_bytes((small_sample / name).read_bytes())
    (ann / "split_files").mkdir()
    for f in (small_sample / "split_files").iterdir():
        (ann / "split_files" / f.name).write_bytes(f.read_bytes())
    lines = (small_sample / "quintuples.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    pid = rec["volume_id"].split("_")[0]
    ghost = f"{pid}_12M_20991231_99999999_{rec['volume_id'][-1]}"  # a later visit of a real patient: not converted
    rec |= {"volume_id": ghost, "sample_id": f"{ghost}_{rec['question_id']}"}
    (ann / "quintuples.jsonl").write_text("\n".join([*lines, json.dumps(rec)]) + "\n")

    monkeypatch.setenv(KEY_ENV, "key-one")
    out = tmp_path / "shards"
    rep = build_shards(built / "volumes.zarr", ann, out, load_recipe(pseudo_recipe))
    assert rep["rejected"] == {"volume_missing": 1}
    (item,) = rep["rejected_items"]
    pseudo = Pseudonymizer(b"key-one")
    assert item["sample_id"] == pseudo.prefixed(rec["sample_id"], pid)
    assert pseudo.patient(pid) in item["message"]
    assert hits(out, sorted(real_patients(small_sample))) == {}


def test_a_missing_key_is_a_clear_error_before_any_work(
    small_sample, built, pseudo_recipe, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RecipeError, match=f"{KEY_ENV} is not set"):
        build_shards(built / "volumes.zarr", small_sample, tmp_path / "s", load_recipe(pseudo_recipe))
    assert not (tmp_path / "s").exists()
    monkeypatch.setenv(KEY_ENV, "")
    args = ["rebuild", "--recipe", str(pseudo_recipe), "--raw", str(small_sample / "raw"), "--annotations",
            str(small_sample), "--masks", str(small_sample), "--out", str(tmp_path / "out"), "--workers", "0"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert (
        exit_.value.code == 1
        and f"error: privacy.pseudonymize_ids is on but the key variable {KEY_ENV}" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()  # failed before converting anything
    with pytest.raises(RecipeError):
        Pseudonymizer.from_recipe(load_recipe(pseudo_recipe), environ={})
    assert Pseudonymizer.from_recipe(load_recipe(RECIPE), environ={}).patient("9027422") == "9027422"
