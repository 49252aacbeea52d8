"""``kneeprep synth``: write an OAI-like sample (DICOM tree, masks, annotations, ground truth)."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, writable=True, path_type=Path))
@click.option(
    "--patients", type=click.IntRange(min=1), default=2, show_default=True, help="Number of patients."
)
@click.option(
    "--size",
    type=click.Choice(["full", "small"]),
    default="full",
    show_default=True,
    help="full: OAI DESS protocol, 160 x 384 x 384 (0.7 x 0.3646 x 0.3646 mm); small: 40 x 96 x 96, same FOV.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--force", is_flag=True, help="Write into a non-empty OUT (files of the same names are overwritten)."
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar (series) on stderr.")
def synth(out: Path, patients: int, size: str, seed: int, force: bool, progress: bool) -> None:
    """Generate an OAI-like sample of knee MRI under OUT (an empty or new directory; --force for another).

    \b
    Layout:
      raw/00m/0.C.2/<patient>/<YYYYMMDD>/<series>/001, 002, ...  extensionless DICOM (MR Image Storage)
      raw/00m/0.C.2/contents.0C2.csv   Folder,ParticipantID,StudyDate,Barcode,StudyDescription,SeriesDescription
      masks/knee_NNN.nii.gz            label map per DESS series (RAS NIfTI), masks/labels.json
      split_files/{train,val,test}_split.csv   published 3DReasonKnee columns, split by patient
      questions.json                   the 69-question bank
      quintuples.jsonl                 one line per (volume, question): reasoning + answer JSON
      truth.json                       grids, label centroids, lesions and grades as placed

    Per knee: a 3-plane localizer, the sagittal 3D DESS (SAG_3D_DESS_RIGHT|LEFT, the only volume) and a
    coronal MPR reformat (COR_MPR_RIGHT|LEFT). Headers carry fake identifying data (see
    kneeprep.synth.PHI_MARKERS) so privacy checks have something to find.
    """
    from kneeprep.synth import plan_sample, write_sample

    if out.is_dir() and any(out.iterdir()) and not force:
        raise click.UsageError(f"{out}: not empty (pass --force to write the sample into it anyway)")
    plan = plan_sample(patients, size, seed)
    start = time.perf_counter()
    from kneeprep.cli.progress import bars

    with bars(progress) as p:
        done = [0]

        def step(label: str) -> None:
            done[0] += 1
            if p is not None:
                p("writing series", done[0], plan.n_series, label)

        summary = write_sample(plan, out, progress=step, force=force)
    seconds = time.perf_counter() - start
    click.echo(
        f"wrote {summary.series} series ({summary.files} files) for {len(summary.patient_ids)} patients, "
        f"{len(summary.volume_ids)} DESS volumes, {summary.quintuples} quintuples, {summary.lesions} lesions "
        f"in {seconds:.1f} s"
    )
    click.echo("splits: " + ", ".join(f"{k} {v}" for k, v in summary.splits.items()) + " volumes")
    click.echo(f"sample: {summary.root}")
