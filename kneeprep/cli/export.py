"""``kneeprep export SHARDS_OR_STORE OUT --layout 3dreasonknee``: NIfTI volumes, split CSVs and training items."""

from __future__ import annotations

import click

from kneeprep.cli import DirOrURL, break_lock_option, dask_options


@click.command()
@click.argument("source", metavar="SHARDS_OR_STORE", type=DirOrURL(exists=True))
@click.argument("out", type=DirOrURL())
@click.option(
    "--layout",
    type=click.Choice(["3dreasonknee"]),
    default="3dreasonknee",
    show_default=True,
    help="Output layout: the published 3DReasonKnee data folder.",
)
@click.option(
    "--store",
    type=DirOrURL(exists=True),
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
@break_lock_option
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.pass_context
def export(
    ctx, source, out, layout, store, label_layer, answer, path_prefix, workers, scheduler, force, break_lock,
    progress,
):  # fmt: skip
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

    SHARDS_OR_STORE, --store and OUT may be URLs (s3://bucket/prefix): inputs are read from what is
    published there, OUT is written in a local staging folder ($KNEEPREP_STAGE_DIR) and published with its
    report.json last, under a lock object (--break-lock).
    """
    import contextlib

    from kneeprep.cli.progress import bars
    from kneeprep.formats.urls import is_url
    from kneeprep.remote import local_or_staged_input, local_or_staged_output
    from kneeprep.stages.export import run_export, summary

    with contextlib.ExitStack() as stack:
        p = stack.enter_context(bars(progress))
        src = stack.enter_context(local_or_staged_input(source))
        st = stack.enter_context(local_or_staged_input(store)) if store else None
        dst = stack.enter_context(
            local_or_staged_output(out, what="export", break_lock=break_lock, echo=click.echo)
        )
        report = run_export(
            src, dst, layout=layout, store=st, label_layer=label_layer, answer=answer,
            path_prefix=path_prefix, workers=workers, scheduler=scheduler, progress=p, force=force,
        )  # fmt: skip
    click.echo(report.table())
    text = summary(report)
    if is_url(out):  # name the published objects, not the staging copy
        text = text.replace(str(dst), out.rstrip("/"))
    click.echo(text)
    if report.failed:
        ctx.exit(1)
