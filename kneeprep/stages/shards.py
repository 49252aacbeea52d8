"""The shards stage: store + annotation directory -> shards (what ``kneeprep shards`` and ``rebuild`` run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kneeprep.errors import InputNotFoundError, ValidationError
from kneeprep.files import sha256_file, write_json
from kneeprep.formats.annotations import read_annotations
from kneeprep.formats.card import CARD, write_card
from kneeprep.formats.quintuples import BENIGN_KINDS, build_quintuples
from kneeprep.formats.shard_reader import read_manifest
from kneeprep.formats.shard_schema import REPORT, SCHEMA_VERSION
from kneeprep.formats.shard_writer import write_shards
from kneeprep.formats.splits import SPLITS
from kneeprep.formats.store import list_volumes, read_volume, read_volume_attrs
from kneeprep.formats.volume_attrs import VolumeAttrs
from kneeprep.privacy import Pseudonymizer
from kneeprep.publish import publisher_for
from kneeprep.stages.harness import Progress, Stage


def inputs_hash(
    store: str | os.PathLike,
    annotations_dir: str | os.PathLike,
    volume_ids: Iterable[str],
    attrs: Mapping[str, VolumeAttrs],
) -> str:
    """Fingerprint of the shards stage's inputs: every annotation file's bytes and every volume's attrs (which
    carry the content hash of its sources and the convert/boxes recipe hashes)."""
    h = hashlib.sha256()
    d = Path(annotations_dir)
    files = sorted(
        [*d.glob("split_files/*.csv"), *d.glob("*_split.csv"), *d.glob("*.json"), *d.glob("*.jsonl")]
    )
    for f in files:
        h.update(f"{f.relative_to(d).as_posix()}\0{sha256_file(f)}\n".encode())
    for vid in sorted(volume_ids):
        h.update(
            f"{vid}\0".encode()
            + json.dumps(attrs[vid].to_json(copy=False), sort_keys=True, default=str).encode()
            + b"\n"
        )
    return h.hexdigest()[:16]


def up_to_date(out_dir: str | os.PathLike, recipe_hash: str, in_hash: str) -> bool:
    """True when ``out_dir`` holds complete shards made from the same inputs with the same shards-stage recipe
    (manifest hashes equal and every listed file present with its size; ``kneeprep validate`` checks more)."""
    try:
        m = read_manifest(out_dir)
    except (InputNotFoundError, ValidationError):
        return False
    if m.get("schema_version") != SCHEMA_VERSION:  # the layout before version 3: rewritten as the Hub layout
        return False
    if m.get("recipe_hash") != recipe_hash or m.get("inputs_hash") != in_hash:
        return False
    d = Path(out_dir)
    return all(
        (d / e[k]).is_file() and (d / e[k]).stat().st_size == e[n]
        for e in m["shards"]
        for k, n in (("path", "bytes"), ("volumes_path", "volumes_bytes"))
    )


@dataclasses.dataclass(frozen=True)
class StoreVolumes:
    """``read_volume`` for the shard tasks: a published volume id -> the store's (image, geometry). Picklable
    (a path and a dict), so Dask workers read their shard's volumes from the store themselves."""

    store: str
    real: dict[str, str] = dataclasses.field(default_factory=dict)  # published (pseudonymized) id -> store id

    def __call__(self, vid: str):
        return read_volume(self.store, self.real.get(vid, vid))


def build_shards(
    store,
    annotations_dir,
    out_dir,
    recipe,
    *,
    force: bool = False,
    workers: int | None = 0,
    scheduler: str | None = None,
    progress: Progress | None = None,
    executor=None,
) -> dict[str, Any]:
    """Run the shards stage and return its report (also written to ``out_dir/report.json``).

    Reads the annotation directory and every complete volume's attrs, joins them
    (:func:`kneeprep.formats.quintuples.build_quintuples`), plans the shards from the volumes' sizes and writes
    each as one task on the stage's executor (``workers``/``scheduler``: :mod:`kneeprep.parallel`; ``0`` runs
    them in this process), then the manifest. Does nothing when the inputs and the shards-stage recipe hash
    match the existing manifest (``report["up_to_date"]``), unless ``force``. ``report["errors"]`` counts
    rejections other than :data:`~kneeprep.formats.quintuples.BENIGN_KINDS`.
    """
    t0 = time.perf_counter()
    pseudo = Pseudonymizer.from_recipe(recipe)  # a missing key fails before any work
    out = Path(out_dir)
    # one writer per shards directory: two runs at once wrote the same .partial files and deleted each
    # other's (a corrupt shard, issue 19); the second now stops before any work
    # the shards stage writes its own report.json (format: docs/SHARDS.md)
    with Stage(
        "shards", out, what="shards directory", partials=("*", "*/*"), report_name=None, progress=progress,
        workers=workers, scheduler=scheduler, executor=executor,
    ) as st:  # fmt: skip
        return _build_shards(store, annotations_dir, out, recipe, pseudo, force, t0, st)


def _build_shards(
    store, annotations_dir, out: Path, recipe, pseudo, force: bool, t0: float, st: Stage
) -> dict[str, Any]:
    annotations = read_annotations(annotations_dir)
    vids = list_volumes(store)
    attrs = {v: read_volume_attrs(store, v) for v in vids}
    rhash = recipe.stage_hash("shards")
    ihash = inputs_hash(store, annotations_dir, vids, attrs)
    if pseudo.enabled:  # shards pseudonymized with another key are not up to date
        ihash = hashlib.sha256(f"{ihash}\0{pseudo.fingerprint}".encode()).hexdigest()[:16]
    if not force and up_to_date(out, rhash, ihash):
        if not (out / CARD).is_file():
            write_card(out, recipe)
        previous = json.loads((out / REPORT).read_text()) if (out / REPORT).is_file() else {}
        return previous | {"up_to_date": True, "seconds": round(time.perf_counter() - t0, 3)}
    quintuples, rejected = build_quintuples(annotations, attrs, recipe)
    real_volume: dict[str, str] = {}  # published (pseudonymized) volume id -> store volume id
    if pseudo.enabled:
        real_volume = {pseudo.prefixed(q.volume_id, q.patient_id): q.volume_id for q in quintuples}
        quintuples = [pseudo.quintuple(q) for q in quintuples]
        rejected = _pseudonymize_rejections(rejected, pseudo, annotations, attrs)
    nbytes = {v: attrs[real_volume.get(v, v)].nbytes for v in {q.volume_id for q in quintuples}}
    manifest = write_shards(
        quintuples,
        StoreVolumes(str(store), real_volume),
        out,
        recipe,
        inputs_hash=ihash,
        nbytes=nbytes,
        executor=st.executor() if quintuples else None,  # no cluster for nothing to write
        progress=st.progress,
        publish=publisher_for(out),
    )
    mismatched = prompt_mismatches(annotations)
    by_kind: dict[str, int] = {}
    for r in rejected:
        by_kind[r.reason_kind] = by_kind.get(r.reason_kind, 0) + 1
    report = {
        "up_to_date": False,
        "recipe_name": recipe.name,
        "recipe_hash": rhash,
        "inputs_hash": ihash,
        "annotations": len(annotations.records) + len(annotations.errors),
        "quintuples": {s: manifest["splits"][s]["rows"] for s in SPLITS},
        "volumes": {s: manifest["splits"][s]["volumes"] for s in SPLITS},
        "rejected": dict(sorted(by_kind.items())),
        "errors": sum(n for k, n in by_kind.items() if k not in BENIGN_KINDS),
        "shards": len(manifest["shards"]),
        "bytes": sum(e["bytes"] for e in manifest["shards"]),
        "codec": recipe.shards.codec,
        "seconds": round(time.perf_counter() - t0, 3),
        "workers": st.workers,
        "scheduler": st.scheduler,
        "rejected_items": [r.to_json() for r in rejected],
        # the rule: a record's own prompt wins; the bank (questions.json) fills in records without one
        "prompt_rule": "record",
        "prompt_mismatches": len(mismatched),
        "prompt_mismatch_examples": mismatched[:5],
    }
    write_json(out / REPORT, report)
    write_card(out, recipe)  # the Hub's YAML block: datasets.load_dataset(out) reads the configs
    return report


def prompt_mismatches(annotations) -> list[dict[str, str]]:
    """Records whose own prompt differs from the question bank's prompt for their question id (the record's
    is the one written: docs/SHARDS.md, "The join"), in record order."""
    bank = dict(annotations.questions)
    return [
        {"sample_id": r.sample_id, "question_id": r.question_id}
        for r in annotations.records
        if r.question and r.question_id in bank and bank[r.question_id] and r.question != bank[r.question_id]
    ]


def _pseudonymize_rejections(rejected, pseudo, annotations, attrs) -> list:
    """Rejections with every known patient id (store, annotations, split CSVs) replaced in ids and messages."""
    patients = {str(a.patient_id or "") for a in attrs.values()}
    patients |= {r.volume_id.split("_", 1)[0] for r in annotations.records if r.volume_id}
    patients |= {str(r.patient_id) for r in annotations.splits}
    return [
        dataclasses.replace(
            r, sample_id=pseudo.text(r.sample_id, patients), message=pseudo.text(r.message, patients)
        )
        for r in rejected
    ]
