"""Write an OAI-like sample: raw DICOM tree, masks, annotations and ground truth.

Layout written under ``OUT`` (``docs/DESIGN.md``, "Annotation directory")::

    raw/00m/0.C.2/<patient 7 digits>/<YYYYMMDD>/<8-digit series>/001, 002, ...   extensionless DICOM
    raw/00m/0.C.2/contents.0C2.csv        Folder,ParticipantID,StudyDate,Barcode,StudyDescription,SeriesDescription
    masks/knee_NNN.nii.gz                 one label map per DESS series (RAS, NIfTI's own voxel order)
    masks/labels.json                     {"1": "patella medial", ...}  (kneeprep.moaks.anatomy.SAMPLE_LABELS)
    split_files/{train,val,test}_split.csv   the published columns; paths relative to OUT
    questions.json                        {"1": prompt, ..., "69": prompt}
    quintuples.jsonl                      kneeprep JSONL, one line per (volume, question)
    truth.json                            {"kneeprep_synth": {...}, "volumes": {volume_id: {...}}}

Per knee the study holds a 3-plane localizer, the sagittal 3D DESS and a coronal MPR reformat of it; only the
DESS is a volume. Planning (:func:`kneeprep.synth.plan.plan_sample`) is cheap and pure; :func:`write_sample`
renders and writes. Everything derives from the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from kneeprep import __version__
from kneeprep.errors import StoreError
from kneeprep.files import atomic_path, write_text
from kneeprep.formats.splits import SPLITS, make_volume_id, visit_to_time, write_split_csv
from kneeprep.geometry import Geometry, lps_to_ras
from kneeprep.moaks.anatomy import SAMPLE_LABELS
from kneeprep.synth import answers as qa
from kneeprep.synth.canvas import Canvas
from kneeprep.synth.dicom_tags import DESS_TAGS, identity_tags, series_uids
from kneeprep.synth.dicom_writer import write_series
from kneeprep.synth.findings import place_and_grade
from kneeprep.synth.grids import GRIDS, MPR_STEP, coronal_reformat, dess_geometry, localizer
from kneeprep.synth.image import synthesize_image
from kneeprep.synth.knee import Anatomy
from kneeprep.synth.phantom import paint_anatomy
from kneeprep.synth.plan import KneePlan, PatientPlan, SamplePlan
from kneeprep.synth.shapes import KneeFrame
from kneeprep.synth.targets import effusion_size, meniscus_shifts

VISIT = "00m"
RELEASE = "0.C.2"
CONTENTS_NAME = "contents.0C2.csv"
CONTENTS_COLUMNS = (
    "Folder",
    "ParticipantID",
    "StudyDate",
    "Barcode",
    "StudyDescription",
    "SeriesDescription",
)


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`write_sample` wrote."""

    root: Path
    size: str
    seed: int
    patient_ids: tuple[str, ...]
    volume_ids: tuple[str, ...]
    splits: dict[str, int]  # split -> volumes
    series: int
    files: int
    quintuples: int
    lesions: int


def _label_stats(labels: np.ndarray, geometry: Geometry) -> dict:
    """Per label: voxel count and centroid in LPS mm (accumulated slab by slab)."""
    nlab = 256
    counts = np.zeros(nlab)
    sums = np.zeros((nlab, 3))
    nz, ny, nx = labels.shape
    jj, kk = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64), indexing="ij")
    for i in range(nz):
        lab = labels[i].ravel()
        c = np.bincount(lab, minlength=nlab)
        counts += c
        sums[:, 0] += c * i
        sums[:, 1] += np.bincount(lab, weights=jj.ravel(), minlength=nlab)
        sums[:, 2] += np.bincount(lab, weights=kk.ravel(), minlength=nlab)
    out = {}
    for value, name in SAMPLE_LABELS.items():
        n = int(counts[value])
        centroid = geometry.index_to_world(sums[value] / n).round(4).tolist() if n else None
        out[str(value)] = {"name": name, "voxels": n, "centroid_lps": centroid}
    return out


def write_mask(labels: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a label map as NIfTI in NIfTI's own convention, not as a copy of the DICOM array: the image is
    reoriented with ``SimpleITK.DICOMOrient(image, "RAS")`` (ITK axis 0 toward Right, 1 toward Anterior, 2
    toward Superior), so its NIfTI affine is close to a positive diagonal; the affine carries the exact
    (oblique) world position. Written to a ``.partial`` name, then renamed."""
    image = sitk.GetImageFromArray(labels)
    geometry.apply_to_sitk(image)
    image = sitk.DICOMOrient(image, "RAS")
    with atomic_path(path, fsync=False) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def write_sample(
    plan: SamplePlan,
    out: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> SampleSummary:
    """Render and write ``plan`` under ``out`` (see the module docstring). ``progress(label)`` is called after
    each series. Raises :class:`~kneeprep.errors.StoreError` when ``out`` already holds a sample, unless
    ``force`` (files of the same names are then overwritten)."""
    root = Path(out)
    if not force and ((root / "raw").exists() or (root / "truth.json").exists()):
        raise StoreError(
            f"{root}: already holds a sample (raw/ or truth.json exists); choose an empty directory"
        )
    release = root / "raw" / VISIT / RELEASE
    time = visit_to_time(VISIT)
    contents_rows, split_rows = [], {s: [] for s in SPLITS}
    truth_volumes: dict[str, dict] = {}
    bank = qa.question_bank()
    quintuples: list[dict] = []
    n_files = n_series = n_lesions = 0
    mask_no = 0
    volume_ids = []

    for patient in plan.patients:
        anatomy = Anatomy(scale=patient.scale)
        for knee in patient.knees:
            rng = np.random.default_rng([plan.seed, patient.index, knee.side, 7])
            frame = KneeFrame(knee.centre_lps, knee.side)
            ident = identity_tags(patient, knee, plan)
            study_dir = release / patient.patient_id / patient.study_date

            # Localizer (3 planes) -- a series a DESS recipe must skip.
            loc_array, loc_geometry, loc_slice_tags = localizer(anatomy, frame, plan.size, rng)
            tags = (
                ident
                | DESS_TAGS
                | {
                    "SeriesDescription": "LOCALIZER",
                    "ProtocolName": "LOCALIZER",
                    "SeriesNumber": 1,
                    "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"],
                    "MRAcquisitionType": "2D",
                    "SequenceName": "*fl2d1",
                    "RepetitionTime": "8.6",
                    "EchoTime": "4.0",
                    "FlipAngle": "20",
                }
            )
            files = write_series(
                loc_array,
                loc_geometry,
                study_dir / knee.series["LOCALIZER"],
                tags=tags,
                slice_tags=loc_slice_tags,
                **series_uids(plan, patient, knee, "LOCALIZER"),
            )
            n_files += len(files)
            contents_rows.append(_contents_row(patient, knee, "LOCALIZER", "LOCALIZER"))
            n_series += 1
            if progress:
                progress(f"{patient.patient_id} {knee.side_name} localizer")

            # The sagittal 3D DESS with its lesions.
            geometry = dess_geometry(plan.size, knee.centre_lps, knee.obliquity_deg)
            canvas = Canvas(geometry, frame)
            paint_anatomy(
                canvas,
                anatomy,
                effusion_size=effusion_size(knee.targets.effusion, anatomy),
                extrusion_mp=meniscus_shifts(knee.targets, anatomy),
            )
            grades, lesions = place_and_grade(canvas, anatomy, knee.targets, rng)
            image = synthesize_image(canvas.tissue, rng)
            description = f"SAG_3D_DESS_{knee.side_name}"
            dess_uids = series_uids(plan, patient, knee, "DESS")
            tags = (
                ident
                | DESS_TAGS
                | {
                    "SeriesDescription": description,
                    "ProtocolName": description,
                    "SeriesNumber": 2,
                    "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
                }
            )
            series_dir = study_dir / knee.series["DESS"]
            files = write_series(image, geometry, series_dir, tags=tags, **dess_uids)
            n_files += len(files)
            n_series += 1
            contents_rows.append(_contents_row(patient, knee, "DESS", description))

            mask_no += 1
            mask_rel = f"masks/knee_{mask_no:03d}.nii.gz"
            write_mask(canvas.labels, geometry, root / mask_rel)
            vid = make_volume_id(patient.patient_id, time, patient.study_date, knee.series["DESS"], knee.side)
            volume_ids.append(vid)
            rel_series = series_dir.relative_to(root).as_posix()
            split_rows[patient.split].append(
                {
                    "patient_id": patient.patient_id,
                    "time": time,
                    "study_folder": patient.study_date,
                    "series_folder": knee.series["DESS"],
                    "knee_side": knee.side,
                    "path": rel_series,
                    "image_filepath": f"images/{patient.patient_id}/{time}/{patient.study_date}_{knee.series['DESS']}"
                    f"_{knee.side}.nii.gz",
                    "label_filepath": mask_rel,
                }
            )
            measures = {les["question_id"]: les for les in lesions}
            quintuples += qa.quintuple_records(vid, grades, measures, bank, rng)
            n_lesions += len(lesions)
            truth_volumes[vid] = {
                "patient_id": patient.patient_id,
                "knee_side": knee.side,
                "split": patient.split,
                "path": rel_series,
                "mask": mask_rel,
                "series_instance_uid": dess_uids["series_uid"],
                "obliquity_deg": list(knee.obliquity_deg),
                "grid": geometry.to_json(),
                "affine_ras": lps_to_ras(geometry.affine_lps).tolist(),
                "knee_frame": {
                    "centre_lps": list(knee.centre_lps),
                    "medial_direction_lps": [1.0 if knee.side == 1 else -1.0, 0.0, 0.0],
                    "scale": patient.scale,
                },
                "labels": _label_stats(canvas.labels, geometry),
                "lesions": lesions,
                "grades": grades,
                "targets": knee.targets.to_json(),
            }
            if progress:
                progress(f"{patient.patient_id} {knee.side_name} DESS")

            # Coronal MPR reformat of the DESS -- another series to skip.
            cor, cor_geometry = coronal_reformat(image, geometry, MPR_STEP[plan.size])
            cor_description = f"COR_MPR_{knee.side_name}"
            tags = (
                ident
                | DESS_TAGS
                | {
                    "SeriesDescription": cor_description,
                    "ProtocolName": description,
                    "SeriesNumber": 3,
                    "ImageType": ["DERIVED", "SECONDARY", "MPR", "NORM"],
                    "MRAcquisitionType": "3D",
                }
            )
            files = write_series(
                cor,
                cor_geometry,
                study_dir / knee.series["COR_MPR"],
                tags=tags,
                **series_uids(plan, patient, knee, "COR_MPR")
                | {"study_uid": dess_uids["study_uid"], "frame_uid": dess_uids["frame_uid"]},
            )
            n_files += len(files)
            n_series += 1
            contents_rows.append(_contents_row(patient, knee, "COR_MPR", cor_description))
            if progress:
                progress(f"{patient.patient_id} {knee.side_name} coronal MPR")

    _write_csv(release / CONTENTS_NAME, CONTENTS_COLUMNS, contents_rows)
    _write_json(root / "masks" / "labels.json", {str(k): v for k, v in SAMPLE_LABELS.items()})
    for split in SPLITS:
        write_split_csv(root / "split_files" / f"{split}_split.csv", split_rows[split])
    _write_json(root / "questions.json", bank)
    _write_text(root / "quintuples.jsonl", "".join(json.dumps(r, sort_keys=False) + "\n" for r in quintuples))
    _write_json(
        root / "truth.json",
        {
            "kneeprep_synth": {
                "kneeprep_version": __version__,
                "seed": plan.seed,
                "size": plan.size,
                "patients": len(plan.patients),
                "grid": list(GRIDS[plan.size]),
            },
            "volumes": truth_volumes,
        },
    )
    return SampleSummary(
        root=root,
        size=plan.size,
        seed=plan.seed,
        patient_ids=tuple(p.patient_id for p in plan.patients),
        volume_ids=tuple(volume_ids),
        splits={s: len(split_rows[s]) for s in SPLITS},
        series=n_series,
        files=n_files,
        quintuples=len(quintuples),
        lesions=n_lesions,
    )


def _contents_row(patient: PatientPlan, knee: KneePlan, kind: str, description: str) -> dict:
    return {
        "Folder": f"{RELEASE}/{patient.patient_id}/{patient.study_date}/{knee.series[kind]}",
        "ParticipantID": patient.patient_id,
        "StudyDate": patient.study_date,
        "Barcode": patient.barcode,
        "StudyDescription": f"OAI^MR^ENROLLMENT^{knee.side_name}",
        "SeriesDescription": description,
    }


def _write_text(path: Path, text: str) -> None:
    write_text(path, text, fsync=False)


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1) + "\n")


def _write_csv(path: Path, columns, rows) -> None:
    with atomic_path(path, fsync=False) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
