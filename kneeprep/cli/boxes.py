"""``kneeprep boxes STORE``: recompute the 3D boxes of a volume store from its stored labels."""

from __future__ import annotations

import click

from kneeprep.cli import RECIPE, dask_options


@click.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--recipe",
    "recipe_file",
    type=RECIPE,
    default=None,
    help="Recipe (TOML file or packaged name) whose [labels] regions and [boxes] margin to use "
    "(default: the built-in defaults).",
)
@dask_options
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (volumes) on stderr.")
def boxes(store, recipe_file, workers, scheduler, progress):
    """Recompute every volume's boxes in STORE (a volumes.zarr) from its labels.

    Updates each volume's `boxes` attrs and `provenance.boxes_hash`, rewrites STORE.kneeprep/boxes.parquet
    (the folder beside the store) and prints a summary. One Dask task per volume (--workers, --scheduler).
    Exit code 1 when some volume could not be processed (listed in the summary).
    """
    from kneeprep.cli.progress import bars
    from kneeprep.recipe import load_recipe
    from kneeprep.stages.boxes import recompute_store_boxes

    recipe = load_recipe(recipe_file)
    with bars(progress) as p:
        s = recompute_store_boxes(store, recipe, progress=p, workers=workers, scheduler=scheduler)
    click.echo(
        f"{s.volumes} volumes: {s.boxes} boxes, {s.empty} empty regions "
        f"(recipe {recipe.name!r}, boxes hash {s.boxes_hash})"
    )
    for vid, u in sorted(s.unknown_labels.items()):
        ids = ", ".join(f"{i} ({c} voxels)" for i, c in sorted(u.items()))
        click.echo(f"  {vid}: unknown labels {ids}")
    for vid, kind, msg in s.failures:
        click.secho(f"  FAIL {vid} [{kind}]: {msg}", fg="red")
    click.echo(f"wrote {s.table}")
    if s.failures:
        raise SystemExit(1)
