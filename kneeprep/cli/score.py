"""``kneeprep score PREDICTIONS SHARDS``: score model predictions against the shards' quintuples."""

from __future__ import annotations

import click

from kneeprep.cli import DirOrURL
from kneeprep.files import write_text

TRUTH_COLUMNS = (
    "sample_id",
    "question_id",
    "question_type",
    "question_region",
    "box_voxels",
    "severity",
    "split",
)


def truth_from_row(row: dict):
    """A shard row (dict from ``kneeprep.formats.shard_reader.iter_quintuples``) as a :class:`kneeprep.stages.score.TruthRecord`.
    The per-region tables group by the question's box region, else its MOAKS region, else "whole knee"."""
    from kneeprep.moaks.anatomy import QUESTIONS
    from kneeprep.moaks.severity import severity_from_json
    from kneeprep.stages.score import TruthRecord

    qid = str(row["question_id"])
    q = QUESTIONS.get(qid)
    box = row.get("box_voxels")
    return TruthRecord(
        sample_id=row["sample_id"],
        question_id=qid,
        finding=q.finding if q else str(row.get("question_type") or ""),
        region=row.get("question_region") or (q.region if q else "") or "whole knee",
        severity=severity_from_json(row["severity"]),
        box=tuple(int(v) for v in box) if box is not None else None,
    )


@click.command("score")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False))
@click.argument("shards", type=DirOrURL(exists=True))
@click.option(
    "--split",
    default="test",
    show_default=True,
    help="Split of the shards to score against ('all' for every split).",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the JSON report here.")
def score(predictions: str, shards: str, split: str, out: str | None) -> None:
    """Score PREDICTIONS (JSON object keyed by sample id, or JSONL) against the quintuples in SHARDS.

    \b
    Sample id: <patient_id>_<time>_<study_folder>_<series_folder>_<knee_side>_<question_id>.
    A prediction is the model's answer (text with JSON, possibly fenced or after "Final diagnosis:", or an
    object), optionally with a box under "box"/"bbox": [start_slice, end_slice, x_min, x_max, y_min, y_max]
    (inclusive) or {"voxels": [z0, y0, x0, z1, y1, x1]} (half-open). The published zero-shot scripts'
    result files are read as they are: {sample_id: {"question": ..., "<model>_result": answer, ...}}.
    docs/FORMATS.md has the details.

    Prints accuracy per finding family and region, and 3D IoU per region. Exit code 1 when lines of the
    predictions file could not be read (they are listed in the report); wrong or unparseable answers are
    scores, not failures. SHARDS may be a URL (s3://bucket/prefix): its published shards are fetched into a
    local staging folder ($KNEEPREP_STAGE_DIR) first.
    """
    import json

    from kneeprep.formats.shard_reader import iter_quintuples
    from kneeprep.remote import local_or_staged_input
    from kneeprep.stages.score import read_predictions
    from kneeprep.stages.score import score as score_fn

    preds, errors = read_predictions(predictions)
    with local_or_staged_input(shards) as local:
        rows = iter_quintuples(local, split=None if split == "all" else split, columns=list(TRUTH_COLUMNS))
        report = score_fn(preds, (truth_from_row(r) for r in rows))
    if report.truth == 0:
        raise click.UsageError(f"no quintuples of split {split!r} in {shards}")
    data = {"split": split, "predictions_file": str(predictions), "shards": str(shards)} | report.to_json()
    data["prediction_errors"] = [{"source": s, "kind": k, "message": m} for s, k, m in errors]
    click.echo(report.format_table())
    for s, k, m in errors[:20]:
        click.echo(f"{s}: {k}: {m}", err=True)
    if out:
        p = write_text(out, json.dumps(data, indent=2) + "\n")
        click.echo(f"report: {p}")
    if errors:
        raise click.exceptions.Exit(1)
