"""Plan and write an OAI-like sample: raw DICOM tree, masks, annotations and ground truth.

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
DESS is a volume. Planning (:func:`plan_sample`) is cheap and pure; :func:`write_sample` renders and writes.
Everything derives from the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import csv
import json
import math
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
from kneeprep.synth.dicom_writer import make_uid, write_series
from kneeprep.synth.findings import KneeTargets, draw_targets, effusion_size, meniscus_shifts, place_and_grade
from kneeprep.synth.phantom import Anatomy, Canvas, KneeFrame, paint_anatomy, synthesize_image

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
FIELD_OF_VIEW_MM = 140.0
#: size -> (slices, rows, columns, slice spacing mm). "full" is the OAI DESS protocol (FOV 140 mm).
GRIDS = {"full": (160, 384, 384, 0.7), "small": (40, 96, 96, 2.8)}
#: slices of the DESS between two coronal reformat slices (full: 1.46 mm, like OAI's 1.5 mm MPR)
MPR_STEP = {"full": 4, "small": 1}
LOCALIZER_PIXELS = {"full": 256, "small": 64}

#: DICOM keyword -> a marker string that occurs in that identifying element of every file the sample writes.
#: Privacy checks grep outputs for these.
PHI_MARKERS: dict[str, str] = {
    "PatientName": "PHINAME",
    "PatientBirthDate": "19440229",
    "PatientAddress": "PHIADDRESS",
    "AccessionNumber": "PHIACC",
    "OtherPatientIDs": "PHIMRN",
    "InstitutionName": "PHIINSTITUTE",
    "InstitutionAddress": "PHIADDRESS",
    "ReferringPhysicianName": "PHIDOCTOR",
    "OperatorsName": "PHIOPERATOR",
    "StationName": "PHISTATION",
}

DESS_TAGS = {
    "Manufacturer": "SIEMENS",
    "ManufacturerModelName": "Trio",
    "MagneticFieldStrength": 3,
    "ScanningSequence": "GR",
    "SequenceVariant": "SP",
    "ScanOptions": "PFP",
    "MRAcquisitionType": "3D",
    "SequenceName": "*de3d1",
    "RepetitionTime": "16.32",
    "EchoTime": "4.71",
    "FlipAngle": "25",
    "NumberOfAverages": "1",
    "ImagingFrequency": "123.2",
    "EchoTrainLength": 1,
    "PixelBandwidth": "185",
    "ReceiveCoilName": "QKnee",
    "TransmitCoilName": "QKnee",
    "BodyPartExamined": "KNEE",
    "PatientPosition": "FFS",
    "SoftwareVersions": "syngo MR 2004V 4VA21A",
}


@dataclass(frozen=True)
class KneePlan:
    side: int  # 1 right, 2 left
    series: dict[str, str]  # kind ("LOCALIZER", "DESS", "COR_MPR") -> 8-digit series folder
    centre_lps: tuple[float, float, float]
    obliquity_deg: tuple[float, float]  # (about S, about A)
    study_time: str
    targets: KneeTargets

    @property
    def side_name(self) -> str:
        return "RIGHT" if self.side == 1 else "LEFT"


@dataclass(frozen=True)
class PatientPlan:
    index: int
    patient_id: str
    study_date: str
    barcode: str
    scale: float
    split: str
    knees: tuple[KneePlan, ...]


@dataclass(frozen=True)
class SamplePlan:
    size: str
    seed: int
    patients: tuple[PatientPlan, ...]

    @property
    def n_series(self) -> int:
        return sum(len(k.series) for p in self.patients for k in p.knees)


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


# ----------------------------------------------------------------------------------------------------------
# Planning


def plan_sample(patients: int = 2, size: str = "full", seed: int = 0) -> SamplePlan:
    """Choose patients, knees, series folders, positions, obliquities, splits and findings from ``seed``.

    With two or more patients at least one right and one left knee exist, and the first left knee is
    clearly oblique (5-8 degrees about the superior axis). With three or more, every split has a patient.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if size not in GRIDS:
        raise ValueError(f"size must be one of {sorted(GRIDS)}, got {size!r}")
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(9_000_000, 10_000_000), size=patients, replace=False)
    options = [(1,), (2,), (1, 2)]
    sides = [options[int(rng.choice(3, p=[0.3, 0.3, 0.4]))] for _ in range(patients)]
    if patients >= 2:
        if not any(1 in s for s in sides):
            sides[0] = tuple(sorted(set(sides[0]) | {1}))
        if not any(2 in s for s in sides):
            sides[1] = tuple(sorted(set(sides[1]) | {2}))
    splits = _assign_splits(patients, rng)
    series_base = rng.choice(np.arange(10_000_000, 99_000_000, 1000), size=patients, replace=False)
    out = []
    oblique_left_done = False
    first_knee = True
    for i in range(patients):
        days = int(rng.integers(0, 2 * 365))
        date = np.datetime64("2004-03-01") + np.timedelta64(days, "D")
        knees = []
        for n, side in enumerate(sides[i]):
            yaw = float(rng.uniform(-4.0, 4.0))
            if side == 2 and not oblique_left_done:
                yaw = float(rng.choice([-1.0, 1.0]) * rng.uniform(5.0, 8.0))
                oblique_left_done = True
            tilt = float(rng.uniform(-2.0, 2.0))
            x = (-82.0 if side == 1 else 82.0) + float(rng.normal(0, 4))
            centre = (round(x, 3), round(float(rng.normal(15, 5)), 3), round(float(rng.normal(-5, 10)), 3))
            base = int(series_base[i]) + 100 * n
            folders = {
                kind: f"{base + k * 7 + 3:08d}" for k, kind in enumerate(("LOCALIZER", "DESS", "COR_MPR"))
            }
            hh, mm = 9 + 2 * n + int(rng.integers(0, 2)), int(rng.integers(0, 60))
            knees.append(
                KneePlan(
                    side=side,
                    series=folders,
                    centre_lps=centre,
                    obliquity_deg=(round(yaw, 3), round(tilt, 3)),
                    study_time=f"{hh:02d}{mm:02d}00",
                    targets=draw_targets(rng, at_least_one_lesion=first_knee),
                )
            )
            first_knee = False
        out.append(
            PatientPlan(
                index=i,
                patient_id=str(int(ids[i])),
                study_date=str(date).replace("-", ""),
                barcode=f"0166{int(rng.integers(0, 10**8)):08d}",
                scale=round(float(rng.uniform(0.93, 1.07)), 4),
                split=splits[i],
                knees=tuple(knees),
            )
        )
    return SamplePlan(size=size, seed=seed, patients=tuple(out))


def _assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """Split labels by patient: 70/15/15 with every split non-empty from 3 patients on."""
    if n == 1:
        return ["train"]
    if n == 2:
        labels = ["train", "test"]
    else:
        n_val = max(1, round(0.15 * n))
        n_test = max(1, round(0.15 * n))
        labels = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return [labels[i] for i in rng.permutation(n)]


# ----------------------------------------------------------------------------------------------------------
# Geometry


def _rotation(yaw_deg: float, tilt_deg: float) -> np.ndarray:
    a, b = math.radians(yaw_deg), math.radians(tilt_deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    return rz @ ry


def _grid(shape, spacing, directions, centre) -> Geometry:
    """A grid of ``shape`` centred on ``centre`` with unit ``directions`` (columns: array axes 0, 1, 2)."""
    a = np.eye(4)
    a[:3, :3] = directions * np.asarray(spacing)[None, :]
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Geometry(tuple(shape), tuple(spacing), a)


#: unit directions of array axes 0, 1, 2 for the sagittal DESS before obliquity: slices toward R, rows
#: toward I, columns toward P (ITK code "PIR"; row x column = R, so it is right-handed).
SAGITTAL_PIR = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T


def dess_geometry(size: str, centre_lps, obliquity_deg=(0.0, 0.0)) -> Geometry:
    """The sagittal DESS grid of ``size`` centred on ``centre_lps``, rotated by ``(about S, about A)`` degrees."""
    n, rows, cols, dz = GRIDS[size]
    px = FIELD_OF_VIEW_MM / rows
    return _grid(
        (n, rows, cols),
        (dz, px, FIELD_OF_VIEW_MM / cols),
        _rotation(*obliquity_deg) @ SAGITTAL_PIR,
        centre_lps,
    )


def coronal_reformat(array: np.ndarray, geometry: Geometry, step: int) -> tuple[np.ndarray, Geometry]:
    """A coronal MPR of a "PIR" sagittal volume without resampling: every ``step``-th column becomes a slice,
    rows stay, the sagittal slices become columns in reverse order (toward L). Right-handed, same frame."""
    n0 = array.shape[0]
    cor = np.ascontiguousarray(array[::-1, :, ::step].transpose(2, 1, 0))
    t = np.array([[0, 0, -1, n0 - 1], [0, 1, 0, 0], [step, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    a = geometry.affine_lps @ t
    return cor, Geometry(cor.shape, tuple(np.linalg.norm(a[:3, :3], axis=0)), a)


# ----------------------------------------------------------------------------------------------------------
# Writing


def _identity_tags(patient: PatientPlan, knee: KneePlan, plan: SamplePlan) -> dict:
    m = PHI_MARKERS
    n = patient.index + 1
    return {
        "PatientName": f"{m['PatientName']}^SYNTH{n:03d}",
        "PatientID": patient.patient_id,
        "PatientBirthDate": m["PatientBirthDate"],
        "PatientSex": "F" if patient.index % 2 else "M",
        "PatientAge": f"{55 + patient.index % 20:03d}Y",
        "PatientWeight": str(60 + (patient.index * 7) % 40),
        "PatientAddress": f"{10 + n} {m['PatientAddress']} Lane, Springfield",
        "OtherPatientIDs": f"{m['OtherPatientIDs']}{patient.patient_id[::-1]}",
        "AccessionNumber": f"{m['AccessionNumber']}{n:03d}{knee.side}",
        "InstitutionName": f"{m['InstitutionName']} Imaging Center",
        "InstitutionAddress": f"1 {m['InstitutionAddress']} Plaza, Springfield",
        "ReferringPhysicianName": f"{m['ReferringPhysicianName']}^ALICE",
        "OperatorsName": f"{m['OperatorsName']}^BOB",
        "StationName": f"{m['StationName']}1",
        "StudyDate": patient.study_date,
        "SeriesDate": patient.study_date,
        "AcquisitionDate": patient.study_date,
        "ContentDate": patient.study_date,
        "StudyTime": knee.study_time,
        "StudyID": f"{n}{knee.side}",
        "StudyDescription": f"OAI^MR^ENROLLMENT^{knee.side_name}",
        "Laterality": "R" if knee.side == 1 else "L",
    }


def _uids(plan: SamplePlan, patient: PatientPlan, knee: KneePlan, kind: str) -> dict:
    key = ("kneeprep-synth", plan.seed, plan.size, patient.patient_id, knee.side)
    return {
        "study_uid": make_uid(*key, "study"),
        "frame_uid": make_uid(*key, "frame"),
        "series_uid": make_uid(*key, kind, "series"),
    }


def _localizer(anatomy: Anatomy, frame: KneeFrame, size: str, rng: np.random.Generator):
    """Three single-slice planes (sagittal, coronal, axial) through the knee centre, as one array plus the
    per-slice geometry overrides for :func:`write_series`."""
    n = LOCALIZER_PIXELS[size]
    fov = 200.0
    px = fov / n
    planes = {  # array axes 0 (normal), 1 (rows), 2 (columns) unit directions
        "sagittal": SAGITTAL_PIR,
        "coronal": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]).T,
        "axial": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T,
    }
    slices, geoms = [], []
    for dirs in planes.values():
        g = _grid((1, n, n), (5.0, px, px), dirs, frame.centre_lps)
        canvas = Canvas(g, frame)
        paint_anatomy(canvas, anatomy, effusion_size=0.2, extrusion_mp={"medial": (0, 0), "lateral": (0, 0)})
        slices.append(synthesize_image(canvas.tissue, rng)[0])
        geoms.append(g)
    slice_tags = []
    for g in geoms:
        a = g.affine_lps
        iop = [*(a[:3, 2] / px).tolist(), *(a[:3, 1] / px).tolist()]
        slice_tags.append(
            {
                "ImageOrientationPatient": [f"{v:.8g}" for v in iop],
                "ImagePositionPatient": [f"{v:.8g}" for v in a[:3, 3].tolist()],
                "SliceLocation": None,
            }
        )
    stack = np.stack(slices)
    return stack, Geometry(stack.shape, geoms[0].spacing, geoms[0].affine_lps), slice_tags


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
            ident = _identity_tags(patient, knee, plan)
            study_dir = release / patient.patient_id / patient.study_date

            # Localizer (3 planes) -- a series a DESS recipe must skip.
            loc_array, loc_geometry, loc_slice_tags = _localizer(anatomy, frame, plan.size, rng)
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
                **_uids(plan, patient, knee, "LOCALIZER"),
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
            dess_uids = _uids(plan, patient, knee, "DESS")
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
                **_uids(plan, patient, knee, "COR_MPR")
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
