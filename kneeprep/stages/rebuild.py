"""``kneeprep rebuild``: the whole recipe, raw tree to validated shards, resumable.

Stages and what each re-run skips:

======== ======================================= ===========================================================
stage    does                                    skips when
======== ======================================= ===========================================================
scan     headers of every file → series + QC     never (headers only, fast)
convert  Dask tasks of 1-4 selected series      inputs (file list, sizes, mtimes, mask; ``verify``: bytes)
                                                 and the recipe's convert sections are unchanged for that
                                                 volume; removes volumes whose series vanished or fail QC
boxes    boxes from the stored labels            the recipe's [labels]/[boxes] hash equals the volume's
                                                 (volumes convert has just written: not even checked)
shards   join + Parquet shards + manifest        inputs hash (annotations, volume attrs) and the recipe's
                                                 shards sections are unchanged
validate checksums, schema, boxes, decodes       the shards were unchanged and validated by the last run
         the store's boxes table vs its volumes  never
card     ``shards/README.md``                    never (cheap)
======== ======================================= ===========================================================

Outputs under ``OUT``: ``volumes.zarr`` (with its own ``report.json`` of the convert stage), ``shards/``
(with ``report.json``, ``manifest.json``, ``README.md``) and ``report.json`` — the rebuild report with every
stage's summary and wall time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kneeprep import __version__
from kneeprep.errors import InputNotFoundError
from kneeprep.files import sha256_file, write_json
from kneeprep.formats.card import write_card
from kneeprep.formats.report import Progress
from kneeprep.formats.shard_reader import read_manifest
from kneeprep.formats.store import attrs_cache
from kneeprep.formats.store import report_path as vstore_report_path
from kneeprep.formats.urls import as_local_or_url
from kneeprep.parallel import executor
from kneeprep.privacy import Pseudonymizer
from kneeprep.recipe import Recipe
from kneeprep.remote import STORE_SIBLING, staged_input, staged_output
from kneeprep.stages.boxes import recompute_store_boxes
from kneeprep.stages.convert import run_convert
from kneeprep.stages.harness import settled_heap
from kneeprep.stages.shards import build_shards
from kneeprep.stages.validate import validate_shards
from kneeprep.stages.validate_store import validate_store

REPORT = "report.json"


@dataclass
class RebuildReport:
    out: str
    recipe_name: str
    recipe_hash: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: wall seconds per stage; ``cluster_start`` is how long the scan's tasks waited for the cluster to come up
    #: (its planning runs meanwhile), ``scan`` the scan's wall after that and ``convert`` the rest of that stage
    #: (series start converting while the scan runs, so conversions are not all inside ``convert``)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def nothing_converted(self) -> str | None:
        """One line when the convert stage left no usable volume (see ``RunReport.nothing_usable``)."""
        return self.stages.get("convert", {}).get("nothing_usable")

    @property
    def ok(self) -> bool:
        c = self.stages.get("convert", {}).get("counts", {})
        return (
            not c.get("failed", 0)
            and not c.get("removed", 0)
            and not self.nothing_converted
            and not self.stages.get("boxes", {}).get("failures")
            and not self.stages.get("shards", {}).get("errors", 0)
            and not self.stages.get("validate", {}).get("problems")
            and not self.stages.get("validate", {}).get("store_problems")
        )

    @property
    def did_nothing(self) -> bool:
        c = self.stages.get("convert", {}).get("counts", {})
        return (
            not c.get("written", 0)
            and not self.stages.get("boxes", {}).get("volumes", 0)
            and bool(self.stages.get("shards", {}).get("up_to_date"))
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "command": "rebuild",
            "kneeprep_version": __version__,
            "out": self.out,
            "recipe_name": self.recipe_name,
            "recipe_hash": self.recipe_hash,
            "ok": self.ok,
            "did_nothing": self.did_nothing,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "stages": self.stages,
        }


def rebuild(
    recipe: Recipe,
    raw: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    *,
    masks: str | os.PathLike | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Progress | None = None,
    echo=print,
    verify: bool = False,
    storage_options: dict[str, Any] | None = None,
    break_lock: bool = False,
    raw_id: str | None = None,
) -> RebuildReport:
    """Run scan → convert → boxes → shards → validate → card; returns (and writes) the rebuild report.

    ``out`` may be a URL (``s3://bucket/prefix``): the run is staged locally and published there, every
    volume and the shards by a completion record written last, under a lock object (:mod:`kneeprep.remote`;
    ``break_lock`` clears another run's lock). ``raw`` may be a URL too: the tree is mirrored into a staging
    folder (:func:`kneeprep.remote.staged_input` ``raw``) and the volumes' sources name the URL (``raw_id``)."""
    out, raw_src = as_local_or_url(out), as_local_or_url(raw)
    if isinstance(out, str):
        with staged_output(
            out,
            what="output",
            storage_options=storage_options,
            break_lock=break_lock,
            echo=echo,
            inner=(("volumes.zarr" + STORE_SIBLING, "volume store"), ("shards", "shards directory")),
        ) as local:
            return rebuild(
                recipe, raw, annotations, local, masks=masks, workers=workers, scheduler=scheduler,
                progress=progress, echo=echo, verify=verify, storage_options=storage_options,
            )  # fmt: skip
    if isinstance(raw_src, str):  # after the output's lock: a refused run downloads nothing
        with staged_input(raw_src, storage_options=storage_options, raw=True, echo=echo) as local_raw:
            return rebuild(
                recipe, local_raw, annotations, out, masks=masks, workers=workers, scheduler=scheduler,
                progress=progress, echo=echo, verify=verify, raw_id=raw_src,
            )  # fmt: skip
    for name, p in (("raw", raw), ("annotations", annotations), ("masks", masks)):
        if p is not None and not Path(p).is_dir():
            raise InputNotFoundError(f"{p}: {name} directory not found")
    Pseudonymizer.from_recipe(recipe)  # a missing privacy key fails now, not after the convert stage
    out.mkdir(parents=True, exist_ok=True)
    # one cluster for every stage: started once, in the background, while the scan is planned; each volume's
    # attrs parsed once for the boxes table, the shards join and validate (attrs_cache); what the stages before
    # made kept out of the garbage collector's walks (settled_heap)
    with executor(workers, scheduler) as ex, attrs_cache(), settled_heap() as settle:
        return _run_stages(
            recipe, raw, annotations, out, masks, ex, progress, echo, workers, scheduler, verify, raw_id,
            settle=settle,
        )  # fmt: skip


def _run_stages(
    recipe, raw, annotations, out: Path, masks, ex, progress, echo, workers, scheduler, verify, raw_id=None,
    settle=lambda: None,
) -> RebuildReport:  # fmt: skip
    store, shards_dir = out / "volumes.zarr", out / "shards"
    previous = _read_json(out / REPORT)
    rep = RebuildReport(str(out), recipe.name, recipe.hash)

    def stage(name: str):
        echo(f"── {name}")
        settle()  # the stages before hold what they made; the garbage collector need not walk it again
        return time.perf_counter()

    t = stage("scan + convert")
    conv = run_convert(
        raw, store, recipe, annotations=annotations, masks=masks, workers=workers, scheduler=scheduler,
        progress=progress, verify=verify, executor=ex, raw_id=raw_id,
    )  # fmt: skip
    cj = conv.to_json()
    rep.seconds["cluster_start"] = cj["context"].get("cluster_start_seconds", 0.0)
    rep.seconds["scan"] = cj["context"].get("scan_seconds", 0.0)
    rep.seconds["convert"] = time.perf_counter() - t - rep.seconds["scan"] - rep.seconds["cluster_start"]
    rep.stages["convert"] = {k: cj[k] for k in ("counts", "by_kind", "item_seconds")} | {
        "failed": [[r.item, r.kind, r.message] for r in conv.failed],
        "removed": [[r.item, r.kind, r.message] for r in conv.removed],
        "nothing_usable": conv.nothing_usable,
        "report": str(vstore_report_path(store)),
    }
    echo(conv.table())

    t = stage("boxes")
    # the volumes convert has just written carry this recipe's boxes: only the others are checked, in tasks
    written = {r.item for r in conv.items if r.status == "written"}
    bs = recompute_store_boxes(
        store, recipe, stale_only=True, current=written, progress=progress, executor=ex
    )
    rep.seconds["boxes"] = time.perf_counter() - t
    rep.stages["boxes"] = bs.to_json()
    echo(
        f"boxes: {bs.volumes} volumes recomputed ({bs.boxes} boxes, {bs.empty} empty regions), "
        f"{bs.unchanged} unchanged, {len(bs.failures)} failed"
    )
    for vid, kind, msg in bs.failures:
        echo(f"  {vid} [{kind}]: {msg}")

    t = stage("shards")
    sh = build_shards(store, annotations, shards_dir, recipe, progress=progress, executor=ex)
    rep.seconds["shards"] = time.perf_counter() - t
    rep.stages["shards"] = {k: v for k, v in sh.items() if k != "rejected_items"} | {
        "report": str(shards_dir / "report.json")
    }
    q = sh.get("quintuples", {})
    echo(
        ("shards up to date (inputs and recipe unchanged); " if sh.get("up_to_date") else "")
        + "quintuples: "
        + ", ".join(f"{s} {n}" for s, n in q.items())
        + f"; rejected: {sum(sh.get('rejected', {}).values())} "
        + (f"({', '.join(f'{k} {n}' for k, n in sh['rejected'].items())})" if sh.get("rejected") else "")
        + f"; {sh.get('shards', 0)} shard files, {sh.get('bytes', 0) / 2**20:.1f} MiB"
    )

    t = stage("validate")
    manifest_sha = _file_sha(shards_dir / "manifest.json")
    last = (previous or {}).get("stages", {}).get("validate", {})
    if sh.get("up_to_date") and last.get("manifest_sha256") == manifest_sha and not last.get("problems"):
        rep.stages["validate"] = last | {"skipped": True}
        echo("validate: skipped (shards unchanged since they were last validated)")
    else:
        problems = validate_shards(shards_dir, progress=progress, executor=ex)
        rep.stages["validate"] = {
            "problems": [str(p) for p in problems],
            "manifest_sha256": manifest_sha,
            "shards": len(read_manifest(shards_dir)["shards"]),
        }
        echo(f"validate: {len(problems)} problem(s)" + "".join(f"\n  {p}" for p in problems[:20]))
    store_problems = [str(p) for p in validate_store(store)]  # the boxes table against the volumes
    rep.stages["validate"]["store_problems"] = store_problems
    if store_problems:
        echo(
            f"validate: {len(store_problems)} store problem(s)"
            + "".join(f"\n  {p}" for p in store_problems[:20])
        )
    rep.seconds["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    card = write_card(shards_dir, recipe, extra={"rebuild_report": str(out / REPORT)})
    rep.stages["card"] = {"path": str(card)}
    rep.seconds["card"] = time.perf_counter() - t
    write_json(out / REPORT, rep.to_json(), sort_keys=False, default=str)
    return rep


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _file_sha(p: Path) -> str | None:
    return sha256_file(p) if p.is_file() else None
