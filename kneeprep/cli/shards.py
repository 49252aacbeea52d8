"""``kneeprep shards STORE ANNOTATIONS SHARDS`` and ``kneeprep validate SHARDS``."""

from __future__ import annotations

import click

from kneeprep.cli import RECIPE, DirOrURL, break_lock_option, dask_options


@click.command()
@click.argument("store", type=DirOrURL(exists=True))
@click.argument("annotations", type=click.Path(exists=True, file_okay=False))
@click.argument("shards_dir", metavar="SHARDS", type=DirOrURL())
@click.option(
    "--recipe",
    "recipe_file",
    type=RECIPE,
    default=None,
    help="Recipe, a TOML file or a packaged name ([questions], [shards], [splits], [privacy] are used; "
    "default: built-in defaults).",
)
@click.option("--force", is_flag=True, help="Rewrite the shards even when inputs and recipe are unchanged.")
@dask_options
@break_lock_option
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (shards) on stderr.")
def shards(store, annotations, shards_dir, recipe_file, force, break_lock, workers, scheduler, progress):
    """Join the volumes of STORE (a volumes.zarr) with the annotations in ANNOTATIONS into Parquet shards
    under SHARDS, in the Hugging Face Hub layout (format in docs/SHARDS.md):

    \b
      SHARDS/data/<split>-NNNNN-of-NNNNN.parquet      quintuples (config "quintuples")
      SHARDS/_volumes/<split>-NNNNN-of-NNNNN.parquet  one row per volume (config "volumes")
      SHARDS/README.md                                dataset card with the Hub YAML block (configs, features)
      SHARDS/manifest.json, SHARDS/report.json        kneeprep's (written last / the run's summary)

    Splits in file names are Hugging Face's: train, validation (kneeprep's "val"), test. Shard boundaries
    are planned from the volumes' uncompressed sizes ([shards] target_bytes), then each shard is one task on
    the workers (--workers / --scheduler); the files are byte-identical however they run.

    Prints quintuples per split, rejections by reason, shards and bytes; the full list of rejected
    quintuples is in SHARDS/report.json. A re-run with the same inputs and shards-stage recipe does nothing.

    STORE and SHARDS may be URLs (s3://bucket/prefix; credentials and endpoint from the AWS environment):
    the store is read from its published volumes, the shards are built in a local staging folder
    ($KNEEPREP_STAGE_DIR) and published with the manifest written last, under a lock object (--break-lock).

    Exit code 1 when a quintuple was rejected for an error (volume missing or failed, bad annotation,
    unknown question, volume in no split); rejections of kind `no_box` (the question's region has no voxels
    in that volume's mask) are facts of the data and keep exit code 0.
    """
    from kneeprep.cli.progress import bars
    from kneeprep.formats.shard_schema import REPORT
    from kneeprep.recipe import load_recipe
    from kneeprep.remote import local_or_staged_input, local_or_staged_output
    from kneeprep.stages.shards import build_shards

    if workers is not None and scheduler:
        raise click.UsageError("--workers and --scheduler exclude each other")
    recipe = load_recipe(recipe_file)
    with (
        bars(progress) as p,
        local_or_staged_input(store) as local_store,
        local_or_staged_output(
            shards_dir, what="shards directory", break_lock=break_lock, echo=click.echo
        ) as out,
    ):
        r = build_shards(
            local_store,
            annotations,
            out,
            recipe,
            force=force,
            workers=workers,
            scheduler=scheduler,
            progress=p,
        )
    if r.get("up_to_date"):
        click.echo(
            f"shards in {shards_dir} are up to date (same inputs, shards recipe hash {r.get('recipe_hash', '?')}): "
            "nothing to do (--force rewrites them)"
        )
    q = r.get("quintuples", {})
    click.echo(
        "quintuples: " + ", ".join(f"{s} {n}" for s, n in q.items()) + f" (total {sum(q.values())})"
        f"; volumes: " + ", ".join(f"{s} {n}" for s, n in r.get("volumes", {}).items())
    )
    rej = r.get("rejected", {})
    if rej:
        click.echo(f"rejected: {sum(rej.values())} (" + ", ".join(f"{k} {n}" for k, n in rej.items()) + ")")
        errors = [x for x in r.get("rejected_items", []) if x["reason_kind"] != "no_box"]
        for x in errors[:10]:
            click.secho(f"  {x['sample_id']} [{x['reason_kind']}]: {x['message']}", fg="red")
        if len(errors) > 10:
            click.echo(f"  ... {len(errors) - 10} more in {shards_dir}/{REPORT}")
    else:
        click.echo("rejected: 0")
    if r.get("prompt_mismatches"):
        click.secho(
            f"prompts: {r['prompt_mismatches']} records carry a prompt that differs from questions.json; the "
            f"record's prompt is written (first: {r['prompt_mismatch_examples'][0]['sample_id']}; all counted "
            f"in {shards_dir}/{REPORT})",
            fg="yellow",
        )
    click.echo(
        f"shards: {r.get('shards', 0)} files, {r.get('bytes', 0) / 2**20:.1f} MiB ({r.get('codec', '?')}); "
        f"report {shards_dir}/{REPORT}"
    )
    if r.get("errors", 0):
        raise SystemExit(1)


@click.command()
@click.argument("shards_dir", metavar="SHARDS|STORE", type=DirOrURL(exists=True))
@click.option(
    "--no-decode", is_flag=True, help="Skip reading the voxel bytes (checksums still read every byte)."
)
@dask_options
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (shard files) on stderr.")
def validate(shards_dir, no_decode, workers, scheduler, progress):
    """Check SHARDS against its manifest: schema version, checksums, row counts, missing or extra shards,
    every box inside its volume, every volume decodable to its shape and dtype, the volumes table equal to
    the quintuples' volumes, no patient in two splits. One task per shard (--workers / --scheduler).

    Given a volume store (a .zarr folder) instead: check its boxes table against the volumes (every
    volume's rows as its attrs give them, no row of a volume not in the store).

    SHARDS|STORE may be a URL (s3://bucket/prefix): what is published there (the manifest's shards, the
    volumes with their completion record) is fetched into a local staging folder ($KNEEPREP_STAGE_DIR) and
    checked there.

    Prints every problem found; exit code 1 if there is any.
    """
    from kneeprep.remote import local_or_staged_input

    with local_or_staged_input(shards_dir) as local:
        _validate(str(local), shards_dir, no_decode, workers, scheduler, progress)


def _validate(shards_dir, shown, no_decode, workers, scheduler, progress):
    from kneeprep.cli.progress import bars
    from kneeprep.formats.shard_reader import read_manifest
    from kneeprep.stages.validate import validate_shards
    from kneeprep.stages.validate_store import is_store, validate_store

    def echo_problem(p):
        click.secho(str(p).replace(shards_dir, shown), fg="red")

    if is_store(shards_dir):
        problems = validate_store(shards_dir)
        for p in problems:
            echo_problem(p)
        if problems:
            click.echo(f"{len(problems)} problem(s) in {shown}")
            raise SystemExit(1)
        click.echo(f"{shown}: OK (boxes table matches the volumes)")
        return

    if workers is not None and scheduler:
        raise click.UsageError("--workers and --scheduler exclude each other")
    with bars(progress) as p:
        problems = validate_shards(
            shards_dir, decode=not no_decode, workers=workers, scheduler=scheduler, progress=p
        )
    for p in problems:
        echo_problem(p)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {shown}")
        raise SystemExit(1)
    m = read_manifest(shards_dir)
    rows = sum(e["rows"] for e in m["shards"])
    click.echo(f"{shown}: OK ({len(m['shards'])} shards, {rows} quintuples, schema v{m['schema_version']})")
