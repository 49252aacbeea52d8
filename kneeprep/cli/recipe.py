"""``kneeprep recipe show|check``: look at and validate recipe files."""

from __future__ import annotations

import click

_FILE = click.Path(exists=True, dir_okay=False)


@click.group()
def recipe():
    """Show or check a recipe (TOML: every choice a build makes).

    A recipe has the sections [recipe], [select], [qc], [geometry], [intensity], [masks], [labels],
    [boxes], [questions], [shards], [splits], [privacy]; every key is optional. See recipes/*.toml for
    commented examples.
    """


@recipe.command()
@click.argument("file", type=_FILE, required=False)
def show(file):
    """Print the resolved recipe FILE (all defaults filled in) as TOML, with its hashes.

    Without FILE, print the defaults.
    """
    from kneeprep.recipe import load_recipe

    r = load_recipe(file)
    click.echo(f"# recipe {r.name!r}  hash {r.hash}")
    for stage in r.STAGES:
        click.echo(f"#   {stage} stage hash {r.stage_hash(stage)}  (sections: {', '.join(r.STAGES[stage])})")
    click.echo(r.to_toml())


@recipe.command()
@click.argument("files", type=_FILE, nargs=-1, required=True)
def check(files):
    """Validate recipe FILES: unknown keys and bad values are reported with the key and the reason.

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
