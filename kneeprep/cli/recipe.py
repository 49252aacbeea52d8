"""``kneeprep recipe list|show|check``: the packaged recipes; look at and validate recipes."""

from __future__ import annotations

import click

from kneeprep.cli import RECIPE


@click.group()
def recipe():
    """List the packaged recipes; show or check a recipe (TOML: every choice a build makes).

    A recipe is a TOML file's path or a packaged recipe's name (`kneeprep recipe list`), wherever a command
    takes one. It has the sections [recipe], [select], [qc], [geometry], [intensity], [masks], [labels],
    [boxes], [questions], [shards], [splits], [privacy]; every key is optional. The packaged files are
    commented examples.
    """


@recipe.command("list")
def list_():
    """List the packaged recipes: name, description and file (copy the file to make your own)."""
    from kneeprep.recipe import load_recipe
    from kneeprep.recipes import names, packaged

    for name in names():
        r = load_recipe(packaged(name))
        click.echo(f"{name}\t{r.description}\t{packaged(name)}")


@recipe.command()
@click.argument("file", metavar="RECIPE", type=RECIPE, required=False)
def show(file):
    """Print RECIPE (a file or a packaged name) resolved, all defaults filled in, as TOML, with its hashes.

    Without RECIPE, print the defaults.
    """
    from kneeprep.recipe import load_recipe

    r = load_recipe(file)
    click.echo(f"# recipe {r.name!r}  hash {r.hash}")
    for stage in r.STAGES:
        click.echo(f"#   {stage} stage hash {r.stage_hash(stage)}  (sections: {', '.join(r.STAGES[stage])})")
    click.echo(r.to_toml())


@recipe.command()
@click.argument("files", metavar="RECIPE...", type=RECIPE, nargs=-1, required=True)
def check(files):
    """Validate recipes (files or packaged names): unknown keys and bad values are reported with the key
    and the reason.

    Exit code 0 when every file is valid, 1 otherwise.
    """
    from kneeprep.errors import KneeprepError
    from kneeprep.recipe import load_recipe

    bad = 0
    for f in files:
        try:
            r = load_recipe(f)
        except KneeprepError as e:
            bad += 1
            for line in getattr(e, "problems", [str(e)]):
                click.secho(f"FAIL {line}", fg="red")
        else:
            boxed = sum(v is not None for v in r.questions.values())
            click.echo(
                f"ok   {f}: recipe {r.name!r} hash {r.hash}; {len(r.labels.map)} labels, "
                f"{len(r.labels.region_labels())} regions, {boxed}/{len(r.questions)} questions with a box region"
            )
    if bad:
        raise SystemExit(1)
