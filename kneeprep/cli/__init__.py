"""The ``kneeprep`` command line: a thin click group whose commands load lazily.

Each command lives in its own module under ``kneeprep.cli`` and imports heavy libraries (SimpleITK, dask,
zarr, pyarrow) inside its body, so ``kneeprep --help`` is instant. Errors become exit codes in one place:

* 0 -- everything asked for was done;
* 1 -- a :class:`~kneeprep.errors.KneeprepError` stopped the command, the system refused a path (one line
  naming it: a file where a folder must be, no permission, disk full), or some items (series, volumes,
  quintuples, shards) failed and are listed in the run report;
* 2 -- misuse: bad options or arguments (click's own code);
* 130 -- interrupted with Ctrl-C (nothing half-written is left visible).
"""

from __future__ import annotations

import importlib
import sys

import click

from kneeprep import __version__

#: command name -> (module under kneeprep.cli, attribute, one-line help shown by `kneeprep --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("synth", "synth", "Generate an OAI-like sample: DICOM tree, masks and annotations."),
    "scan": ("scan", "scan", "Inventory the DICOM series of a raw tree, with a QC verdict per series."),
    "convert": (
        "convert",
        "convert",
        "Convert selected DICOM series to normalized Zarr v3 volumes (+ masks, boxes).",
    ),
    "boxes": ("boxes", "boxes", "Recompute the 3D boxes of a volume store from its labels."),
    "shards": ("shards", "shards", "Join volumes, boxes and annotations into Parquet shards of quintuples."),
    "validate": (
        "shards",
        "validate",
        "Check shards against their manifest (schema, checksums, boxes, volumes), or a store's boxes table.",
    ),
    "rebuild": ("rebuild", "rebuild", "Run the whole recipe: scan, convert, boxes, shards, validate."),
    "recipe": ("recipe", "recipe", "List the packaged recipes; show or check a recipe (file or name)."),
    "preview": ("preview", "preview", "Draw mid-planes of a volume with its mask outline and box (PNG)."),
    "export": ("export", "export", "Export volumes and annotations to the published 3DReasonKnee layout."),
    "score": ("score", "score", "Score model predictions the ReasonKnee-Bench way (grades and 3D IoU)."),
}


def dask_options(f):
    """``--workers`` and ``--scheduler``, the same on every command that runs one task per item."""
    f = click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="Run on an existing Dask cluster (e.g. tcp://host:8786) instead of local processes; its workers "
        'must see the same paths (docs/SCALING.md, "Workers on an existing cluster").',
    )(f)
    return click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=None,
        help="Local Dask worker processes (default: one per core); 0 runs in this process without Dask.",
    )(f)


class RecipeType(click.ParamType):
    """A recipe option or argument: a TOML file's path, or a packaged recipe's name (``3dreasonknee``).

    Converts to the file's path; an unknown name or a missing file is a usage error (exit 2), one line
    naming the value and the packaged names."""

    name = "recipe"

    def convert(self, value, param, ctx):
        from kneeprep.errors import InputNotFoundError
        from kneeprep.recipes import resolve

        try:
            return resolve(value)
        except InputNotFoundError as e:
            self.fail(str(e), param, ctx)


RECIPE = RecipeType()


class DirOrURL(click.ParamType):
    """A local directory (checked like ``click.Path(file_okay=False, exists=exists)``) or a URL
    (``s3://bucket/prefix``, ``memory://...``; ``file://`` is a local path), passed on as a string."""

    name = "dir_or_url"

    def __init__(self, exists: bool = False):
        self.exists = exists
        self._path = click.Path(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        value = str(value)
        if "://" in value and not value.startswith("file://"):
            return value
        if value.startswith("file://"):
            from urllib.parse import unquote, urlsplit

            value = unquote(urlsplit(value).path)
        return self._path.convert(value, param, ctx)


def break_lock_option(f):
    """``--break-lock`` for the commands that write to a URL."""
    return click.option(
        "--break-lock",
        is_flag=True,
        help="Output at a URL only: clear another run's lock object first (only once you know that run is "
        "gone; a lock left by a dead process of this host is taken over without it).",
    )(f)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def format_commands(self, ctx, formatter):
        # Short help from the table above: listing commands must not import them.
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="kneeprep")
def cli():
    """kneeprep: rebuild 3DReasonKnee-style training data from raw OAI knee MRI.

    \b
    Typical flow (or all of it at once with `kneeprep rebuild`):
      kneeprep synth sample/                       # an OAI-like sample, if you have no OAI data
      kneeprep scan sample/raw                     # what series are there, and are they sound?
      kneeprep convert sample/raw out/volumes.zarr --recipe 3dreasonknee
      kneeprep shards out/volumes.zarr sample out/shards
      kneeprep validate out/shards

    Exit codes: 0 all done; 1 an error, or some items failed (see the run report); 2 bad usage;
    130 interrupted. Run `kneeprep COMMAND --help` for each command.
    """


def main(argv: list[str] | None = None) -> None:
    from kneeprep.errors import KneeprepError

    try:
        # without standalone mode click *returns* the code of ctx.exit(n) / raise Exit(n) instead of raising
        code = cli.main(args=argv, prog_name="kneeprep", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted: partial outputs were discarded; re-run to resume.", err=True)
        sys.exit(130)
    except KneeprepError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(1)
    except OSError as e:
        # a path the system refused: a file where a folder must be, no permission, disk full
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        click.secho(f"error: {where + ': ' if where else ''}{e.strerror or e}", fg="red", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)
