"""``kneeprep convert RAW OUT.zarr``: selected DICOM series -> normalized Zarr v3 volumes (+ masks, boxes)."""

from __future__ import annotations

import click

from kneeprep.cli import RECIPE, DirOrURL, break_lock_option, dask_options


@click.command()
@click.argument("raw", type=DirOrURL(exists=True))
@click.argument("out", type=DirOrURL())
@click.option(
    "--recipe",
    "recipe_file",
    type=RECIPE,
    default=None,
    help="Recipe: a TOML file or a packaged name, e.g. 3dreasonknee ([select], [geometry], [intensity], "
    "[masks], [labels] ...); default: built-in defaults.",
)
@click.option(
    "--annotations",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Annotation directory with split_files/*.csv; their label_filepath names each volume's mask.",
)
@click.option(
    "--masks",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory to look for masks in (label_filepath relative to it, or its base name), or the base "
    "of the recipe's masks.pattern.",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Also re-hash the input bytes of volumes whose input files look unchanged (names, sizes, mtimes): "
    "catches files edited in place with their mtime restored; reads every input file (docs/DESIGN.md, Resume).",
)
@dask_options
@break_lock_option
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
@click.pass_context
def convert(ctx, raw, out, recipe_file, annotations, masks, verify, break_lock, workers, scheduler, progress):
    """Convert the DICOM series under RAW selected by the recipe into the volume store OUT (a .zarr folder).

    \b
    Each series is converted as soon as the scan has read its folder (the scan of the rest of the tree
    goes on meanwhile; while more series wait than the workers can take, up to 4 go in one task); a
    series that fails is recorded and the others go on. A re-run skips volumes whose inputs and convert
    settings are unchanged (file names, sizes and mtimes; with --verify their bytes too) and redoes the
    others; it removes the volumes of RAW whose series are gone, now fail QC or are no longer selected
    (listed as "removed"). An interrupted run leaves no half-written volume visible. Progress bars show
    the scan (parts of the tree) and the conversions (series). OUT is an OME-Zarr collection; the run
    report is written beside it, to OUT.kneeprep/report.json, and summarized here. Exit code 1 if any
    series failed, a volume was removed, or if no series was written or left unchanged (none found, or
    every one refused or not selected).

    OUT may be a URL (s3://bucket/prefix/volumes.zarr; credentials and endpoint from the AWS environment):
    the store is built in a local staging folder ($KNEEPREP_STAGE_DIR) and published there -- each volume
    uploaded by its task as soon as written, complete only once its group's zarr.json (written last) is
    there -- under a lock object in OUT.kneeprep (--break-lock). RAW may be a URL too: mirrored into the
    staging folder, each file with its object's modification time, only changed objects downloaded.
    """
    from kneeprep.cli.progress import bars
    from kneeprep.formats.store import report_path
    from kneeprep.formats.urls import is_url
    from kneeprep.recipe import load_recipe
    from kneeprep.remote import local_or_staged_input, local_or_staged_output
    from kneeprep.stages.convert import run_convert

    recipe = load_recipe(recipe_file)
    staged = local_or_staged_output(out, what="store", store=True, break_lock=break_lock, echo=click.echo)
    with (
        bars(progress) as p,
        staged as local,
        local_or_staged_input(raw, raw=True, echo=click.echo) as raw_dir,
    ):
        report = run_convert(
            raw_dir, local, recipe, annotations=annotations, masks=masks, workers=workers, scheduler=scheduler,
            progress=p, verify=verify, raw_id=raw if is_url(raw) else None,
        )  # fmt: skip
    click.echo(report.table())
    where = f"{out}.kneeprep/report.json" if is_url(out) else click.format_filename(str(report_path(local)))
    click.echo(f"report: {where}")
    if report.nothing_usable:
        click.secho(f"error: {report.nothing_usable}", fg="red", err=True)
    if report.removed:
        click.secho(
            f"error: {len(report.removed)} volume(s) of an earlier run removed (see the table)",
            fg="red",
            err=True,
        )
    if report.failed or report.removed or report.nothing_usable:
        ctx.exit(1)
