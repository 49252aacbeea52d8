"""``kneeprep export SHARDS_OR_STORE OUT --layout 3dreasonknee``: NIfTI volumes, split CSVs and training items."""

from __future__ import annotations

import click

from kneeprep.cli import dask_options


@click.command()
@click.argument("source", metavar="SHARDS_OR_STORE", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--layout",
    type=click.Choice(["3dreasonknee"]),
    default="3dreasonknee",
    show_default=True,
    help="Output layout: the published 3DReasonKnee data folder.",
)
@click.option(
    "--store",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Volume store (volumes.zarr) the shards were built from: adds masks and raw series paths.",
)
@click.option(
    "--labels",
    "label_layer",
    default=None,
    metavar="NAME",
    help="Label layer exported as mask (default: the volume's first layer).",
)
@click.option(
    "--answer-json",
    "answer",
    type=click.Choice(["original", "canonical"]),
    default="original",
    show_default=True,
    help="Answer JSON of the training items: the annotation's original one, or rebuilt from the "
    "canonical grades in the published spelling.",
)
@click.option(
    "--path-prefix",
    default="",
    metavar="TEXT",
    help="Prefix for every path in the CSVs and items (e.g. ../data/); default: relative to OUT.",
)
@dask_options
@click.option("--force", is_flag=True, help="Rewrite every NIfTI, even those whose source is unchanged.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.pass_context
def export(
    ctx, source, out, layout, store, label_layer, answer, path_prefix, workers, scheduler, force, progress
):
    """Export SHARDS_OR_STORE (a shards directory or a volumes.zarr) to OUT in the published layout, so the
    3DReasonKnee baseline and fine-tuning code runs on it unchanged.

    \b
    OUT/images/<patient>/<time>/<study>_<series>_<side>.nii.gz   sagittal slices on the first axis
    OUT/masks/<same name>                                         label layer (store input, or --store)
    OUT/split_files/{train,val,test}_split.csv                    published columns (shards input)
    OUT/{train,val,test}.json                                     [{image, prompt, answer}] (shards input)
    OUT/questions.json, export_manifest.json, report.json

    From shards: volumes, splits and quintuples (add --store for masks and raw paths). From a store: volumes
    and masks only. One task per volume; a re-run skips volumes whose source is unchanged. Exit code 1 if
    any volume failed (listed in OUT/report.json).
    """
    from kneeprep.cli.progress import bars
    from kneeprep.stages.export import run_export, summary

    with bars(progress) as p:
        report = run_export(
            source, out, layout=layout, store=store, label_layer=label_layer, answer=answer,
            path_prefix=path_prefix, workers=workers, scheduler=scheduler, progress=p, force=force,
        )  # fmt: skip
    click.echo(report.table())
    click.echo(summary(report))
    if report.failed:
        ctx.exit(1)
