"""A privacy corpus (issue 19): every free-text and identifying attribute of DICOM PS3.15's Basic Application
Level Confidentiality Profile that the sample's files can carry gets a distinct planted string; rebuild
(convert -> boxes -> shards -> validate -> card) and export run on it, and every output byte -- raw files,
decoded Parquet values, decompressed Zarr chunks and attrs, gunzipped NIfTI, every JSON / CSV / report / card --
is searched for each planted string. The search finds all of them in the raw tree (positive control).

The attribute list is written out from PS3.15 Annex E, Table E.1-1 (the profile's "X"/"Z"/"D" attributes that
hold text, dates, times or ids), restricted to what pydicom writes with a plain value. PatientID is left as the
OAI participant id: the recipe keeps it by design (docs, README "Privacy"); SeriesDescription keeps its
selectable prefix (the recipe selects on it) with a planted suffix that must not leak.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from test_privacy import contents, hits

from kneeprep.cli import cli
from kneeprep.formats import store

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "kneeprep" / "recipes" / "3dreasonknee.toml"

#: PS3.15 Table E.1-1 attributes (keyword -> planted value); dates/times in their VR's form, unique strings.
PLANTED = {
    "PatientName": "Plantname^Corpus",
    "PatientBirthDate": "19310407",
    "PatientBirthTime": "071531",
    "PatientSex": "O",  # one letter: too short to search for; set so its presence is exercised
    "PatientAge": "093Y",
    "PatientAddress": "PLANT-ADDR 17 Corpus Lane",
    "PatientTelephoneNumbers": "PLANT-TEL-555019",
    "OtherPatientIDs": "PLANT-OTHERPID-31",
    "OtherPatientNames": "Plantother^Name",
    "PatientMotherBirthName": "PLANT-MOTHERNAME",
    "MilitaryRank": "PLANT-RANK",
    "EthnicGroup": "PLANT-ETHNIC",
    "Occupation": "PLANT-OCCUPATION",
    "AdditionalPatientHistory": "PLANT-HISTORY text",
    "PatientComments": "PLANT-PATCOMMENT",
    "InstitutionName": "PLANT-INSTITUTION",
    "InstitutionAddress": "PLANT-INSTADDR 1 Main St",
    "InstitutionalDepartmentName": "PLANT-DEPARTMENT",
    "ReferringPhysicianName": "Plantreferrer^Doc",
    "ReferringPhysicianAddress": "PLANT-REFADDR",
    "PhysiciansOfRecord": "Plantrecord^Doc",
    "PerformingPhysicianName": "Plantperformer^Doc",
    "NameOfPhysiciansReadingStudy": "Plantreader^Doc",
    "OperatorsName": "Plantoperator^Tech",
    "RequestingPhysician": "Plantrequester^Doc",
    "StationName": "PLANT-STATION",
    "DeviceSerialNumber": "PLANT-DEVSERIAL-88",
    "StudyDescription": "PLANT-STUDYDESC",
    "ProtocolName": "PLANT-PROTOCOL",
    "AccessionNumber": "PLANTACC0042",
    "StudyID": "PLANTSID9",
    "ImageComments": "PLANT-IMAGECOMMENT",
    "DerivationDescription": "PLANT-DERIVATION",
    "RequestedProcedureDescription": "PLANT-REQPROCDESC",
    "PerformedProcedureStepDescription": "PLANT-PPSDESC",
    "PerformedProcedureStepID": "PLANTPPSID",
    "ContentCreatorName": "Plantcreator^Name",
    "StudyDate": "19330102",
    "SeriesDate": "19330103",
    "AcquisitionDate": "19330104",
    "ContentDate": "19330105",
    "StudyTime": "101112",
    "SeriesTime": "101213",
    "AcquisitionTime": "101314",
    "ContentTime": "101415",
}
#: RequestAttributesSequence (0040,0275) item: the profile removes the whole sequence
SEQUENCE_ITEM = {"RequestedProcedureID": "PLANTRPID7", "ScheduledProcedureStepID": "PLANTSPSID8"}
SERIES_SUFFIX = " PLANT-SERIESDESC"


def _plant(raw: Path) -> int:
    n = 0
    for p in sorted(raw.rglob("*")):
        if not p.is_file() or p.suffix in (".csv", ".txt"):
            continue
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue
        for kw, value in PLANTED.items():
            setattr(ds, kw, value)
        item = Dataset()
        for kw, value in SEQUENCE_ITEM.items():
            setattr(item, kw, value)
        ds.RequestAttributesSequence = Sequence([item])
        ds.SeriesDescription = str(ds.SeriesDescription) + SERIES_SUFFIX
        ds.save_as(p)
        n += 1
    return n


def test_planted_identifiers_reach_no_output_byte(small_sample, tmp_path):
    sample = tmp_path / "sample"
    shutil.copytree(small_sample, sample)
    assert _plant(sample / "raw") >= 5
    recipe = tmp_path / "recipe.toml"
    text = RECIPE.read_text()
    assert '"^SAG_3D_DESS_(RIGHT|LEFT)$"' in text
    recipe.write_text(text.replace('"^SAG_3D_DESS_(RIGHT|LEFT)$"', '"^SAG_3D_DESS_(RIGHT|LEFT)"'))
    out = tmp_path / "out"
    args = ["rebuild", "--recipe", str(recipe), "--raw", str(sample / "raw"), "--annotations", str(sample),
            "--masks", str(sample), "--out", str(out), "--workers", "0", "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    exported = tmp_path / "export"
    r = CliRunner().invoke(
        cli,
        [
            "export",
            str(out / "shards"),
            str(exported),
            "--store",
            str(out / "volumes.zarr"),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output

    needles = sorted(
        {v for v in PLANTED.values() if len(v) > 3} | set(SEQUENCE_ITEM.values()) | {SERIES_SUFFIX.strip()}
    )
    # positive control: every planted string is in the raw tree, as written
    raw_found = hits(sample / "raw", needles)
    assert set().union(*raw_found.values()) == set(needles)
    # the outputs: store (attrs and decoded chunks), shards (decoded values), manifest, card, reports, export
    walked = set(contents(out)) | {f"export/{k}" for k in contents(exported)}
    assert any(k.endswith(".parquet") for k in walked) and any(k.endswith(".nii.gz") for k in walked)
    assert any(k.startswith("export/") and k.endswith(".csv") for k in walked)
    assert hits(out, needles) == {}
    assert hits(exported, needles) == {}
    # the planted descriptions were read to select the series: every volume was converted
    assert store.report_path(out / "volumes.zarr").read_text().count('"written"') >= 5
