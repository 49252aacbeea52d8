"""``kneeprep scan RAW``: inventory the DICOM series under a raw tree, with a QC verdict per series."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from kneeprep.cli import RECIPE, DirOrURL, dask_options
from kneeprep.stages.scan import InventoryParts, series_row, write_table


def _out_path(ctx, param, value):
    if value is not None and Path(value).suffix not in (".parquet", ".csv"):
        raise click.BadParameter(f"expected a .parquet or .csv file name, got {value!r}")
    return Path(value) if value is not None else None


@click.command("scan")
@click.argument("raw", type=DirOrURL(exists=True))
@click.option(
    "--out",
    "-o",
    callback=_out_path,
    metavar="FILE.parquet|FILE.csv",
    help="Also write one row per series here (written whole at the end; while the scan runs, each task's "
    "provisional rows are a file in FILE.partial/, removed at the end).",
)
@click.option("--recipe", "recipe_path", type=RECIPE,
              help="Recipe (file or packaged name) whose [qc] tolerances to use (default: built-in defaults).")  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary, not the per-series table.")
@dask_options
@click.option(
    "--progress/--no-progress", default=True, help="Show a progress bar (parts of the tree read) on stderr."
)
def scan(
    raw: str, out: Path | None, recipe_path: Path | None, quiet: bool, workers, scheduler, progress: bool
) -> None:
    """Inventory the DICOM series under RAW, reading headers only. RAW may be a URL (s3://bucket/prefix):
    mirrored into $KNEEPREP_STAGE_DIR first, only changed objects downloaded.

    Any layout works (extensionless files included); the OAI layout
    <visit>/<release>/<patient>/<YYYYMMDD>/<series>/<files> gives the volume ids, other trees get ids from
    PatientID, the visit tag, StudyDate and SeriesNumber. Each series gets a QC verdict -- ok, warn, fail or
    unsupported -- with reasons: missing or duplicate slices, irregular spacing, inconsistent orientation,
    pixel spacing or size, truncated or unreadable files, too few slices; mosaics, enhanced multi-frame
    objects, single images and non-image objects are "unsupported". Tolerances come from the recipe's [qc].

    The headers are read by Dask tasks, about one per patient folder (docs/SCALING.md); the result is the
    same with any --workers or --scheduler.

    Prints a table and a summary. QC failures are information: the exit code is 0 whenever the scan ran,
    1 on an error (unreadable RAW, unwritable --out).
    """
    from kneeprep.cli.progress import bars
    from kneeprep.dicom import scan_tree
    from kneeprep.formats.report import ticker
    from kneeprep.formats.urls import is_url
    from kneeprep.parallel import executor
    from kneeprep.recipe import load_recipe
    from kneeprep.remote import local_or_staged_input, named_by_url

    recipe = load_recipe(recipe_path)
    with (
        local_or_staged_input(raw, raw=True, echo=click.echo) as tree,
        InventoryParts(out) if out is not None else contextlib.nullcontext() as parts,
    ):

        def rows_of(series) -> list[dict]:
            rows = [series_row(s) for s in series]
            if is_url(raw):  # the staging copy's paths named by the URL's objects
                for r in rows:
                    r["first_file"] = named_by_url(r["first_file"], tree, raw)
            return rows

        # while the scan runs, each task's rows land in OUT.partial/ (a dataset readers can open meanwhile)
        on_part = (lambda i, series: parts.add(i, rows_of(series))) if parts is not None else None
        with bars(progress) as p, executor(workers, scheduler) as ex:
            result = scan_tree(tree, recipe.qc, ticker(p, "scan"), on_part=on_part, executor=ex)
        rows = rows_of(result.series)
        if out is not None:  # the final table, whole; then OUT.partial/ goes
            write_table(rows, out)
    if not quiet:
        _print_table(rows)
    counts = result.by_status()
    click.echo(
        f"{len(result.series)} series in {result.n_files} files: "
        + ", ".join(f"{counts[k]} {k}" for k in ("ok", "warn", "fail", "unsupported"))
        + f"; {result.non_dicom_skipped} non-DICOM file(s) skipped; {len(result.unreadable)} unreadable"
    )
    for path, reason in result.unreadable[:10]:
        click.echo(f"  unreadable: {path}: {reason}")
    if len(result.unreadable) > 10:
        click.echo(f"  ... and {len(result.unreadable) - 10} more unreadable files")
    if out is not None:
        click.echo(f"wrote {out} ({len(rows)} rows)")


def _print_table(rows: list[dict]) -> None:
    head = (
        "volume id",
        "patient",
        "visit",
        "side",
        "description",
        "files",
        "size",
        "spacing mm",
        "orient",
        "qc",
    )
    lines = [
        (
            r["volume_id"], r["patient_id"], r["time"], str(r["knee_side"]), r["description"][:24], str(r["n_files"]),
            f"{r['rows']}x{r['cols']}x{r['n_slices']}", r["spacing_mm"] or "-", r["orientation_code"] or "-",
            r["qc_status"] + (": " + r["qc_reasons"].split(" | ")[0][:90] if r["qc_reasons"] else ""),
        )
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    for line in (head, *lines):
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(line[:-1], widths[:-1], strict=True)) + "  " + line[-1]
        )
