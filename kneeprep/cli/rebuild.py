"""``kneeprep rebuild``: scan → convert → boxes → shards → validate in one command."""

from __future__ import annotations

import click

from kneeprep.cli import RECIPE, DirOrURL, break_lock_option, dask_options

_DIR = click.Path(exists=True, file_okay=False)


@click.command()
@click.option(
    "--recipe",
    "recipe_file",
    type=RECIPE,
    required=True,
    help="Recipe: a packaged name (3dreasonknee, m3d-32x256x256; `kneeprep recipe list`) or a TOML file.",
)
@click.option(
    "--raw",
    type=DirOrURL(exists=True),
    required=True,
    help="Raw DICOM tree (OAI layout or any folder of DICOM files), or a URL (s3://bucket/prefix): mirrored "
    "into $KNEEPREP_STAGE_DIR, each file with its object's modification time, only changed objects downloaded.",
)
@click.option(
    "--annotations",
    type=_DIR,
    required=True,
    help="Annotation directory: split_files/*.csv, questions.json, quintuples.jsonl or training items.",
)
@click.option(
    "--masks",
    type=_DIR,
    default=None,
    help="Directory the split CSVs' label_filepath is resolved against when not under --annotations.",
)
@click.option(
    "--out",
    type=DirOrURL(),
    required=True,
    help="Output directory: volumes.zarr, shards/, report.json; or a URL (s3://bucket/prefix, credentials and "
    "endpoint from the AWS environment): staged in $KNEEPREP_STAGE_DIR (default ~/.cache/kneeprep/stage) and "
    "published there, each volume and the shards by a completion record written last, under a lock object.",
)
@break_lock_option
@click.option(
    "--verify",
    is_flag=True,
    help="Also re-hash the input bytes of volumes whose input files look unchanged (names, sizes, mtimes): "
    "catches files edited in place with their mtime restored; reads every input file (docs/DESIGN.md, Resume).",
)
@dask_options
@click.option(
    "--progress/--no-progress", default=True, help="Show progress bars on stderr (--no-progress: logs, CI)."
)
def rebuild(recipe_file, raw, annotations, masks, out, break_lock, verify, workers, scheduler, progress):
    """Rebuild the whole dataset from RAW with one recipe: scan, convert, boxes, shards, validate, card.

    \b
    Writes OUT/volumes.zarr (Zarr v3 volumes + labels + boxes, an OME-Zarr collection), beside it
    OUT/volumes.zarr.kneeprep (convert report, boxes.parquet), OUT/shards (Parquet shards, manifest.json,
    README.md dataset card) and OUT/report.json (every stage's summary and wall time).

    Resumable: a re-run skips volumes whose inputs (names, sizes, mtimes; --verify: bytes) and convert
    recipe are unchanged, removes volumes whose series vanished or now fail QC, recomputes boxes only
    when [labels]/[boxes] changed, and rewrites shards only when annotations, volumes or the shard
    settings changed. Interrupt it at any time: nothing half-written is left visible.

    Exit code 0 when every stage succeeded; 1 when some series failed, a volume was removed, no series was converted or left
    unchanged (none found, or every one refused), a quintuple was rejected for an error, or validation
    found a problem (all listed in the reports).
    """
    if workers is not None and scheduler:
        raise click.UsageError("--workers and --scheduler exclude each other")
    from kneeprep.cli.progress import bars
    from kneeprep.recipe import load_recipe
    from kneeprep.stages.rebuild import REPORT
    from kneeprep.stages.rebuild import rebuild as run

    recipe = load_recipe(recipe_file)
    click.echo(f"recipe {recipe.name!r} ({recipe.hash}) from {recipe_file}")
    with bars(progress) as p:
        rep = run(
            recipe, raw, annotations, out, masks=masks, workers=workers, scheduler=scheduler, progress=p,
            echo=click.echo, verify=verify, break_lock=break_lock,
        )  # fmt: skip
    c = rep.stages["convert"]["counts"]
    sh = rep.stages["shards"]
    click.echo("")
    click.echo("── summary")
    click.echo(
        f"  volumes     {c.get('written', 0)} written, {c.get('skipped', 0)} skipped, {c.get('failed', 0)} failed"
        + (f", {c['removed']} removed" if c.get("removed") else "")
    )
    reasons = {k: n for k, n in rep.stages["convert"]["by_kind"].items() if not k.startswith("written")}
    if reasons:
        click.echo("              by reason: " + ", ".join(f"{k} {n}" for k, n in reasons.items()))
    q = sh.get("quintuples", {})
    click.echo("  quintuples  " + ", ".join(f"{s} {n}" for s, n in q.items()) + f" (total {sum(q.values())})")
    click.echo(f"  shards      {sh.get('shards', 0)} files, {sh.get('bytes', 0) / 2**20:.1f} MiB")
    click.echo(
        "  seconds     "
        + ", ".join(
            f"{k.replace('_', ' ')} {v:.1f}" + (" more" if k == "convert" else "")
            for k, v in rep.seconds.items()
        )
        + "  (series convert while the scan runs)"
    )
    if rep.nothing_converted:
        click.secho(f"  error       {rep.nothing_converted}", fg="red")
    if rep.did_nothing:
        click.echo("  nothing to do: every output was up to date")
    click.echo(f"  report      {out}/{REPORT}")
    click.secho(
        "  status      " + ("ok" if rep.ok else "FAILED (see the reports)"), fg="green" if rep.ok else "red"
    )
    if not rep.ok:
        raise SystemExit(1)
