"""What the sample's DICOM headers say: the DESS protocol's tags, each patient's identifying fields (holding
the :data:`PHI_MARKERS` that privacy checks grep for) and the study, frame and series UIDs, all derived from the
plan.
"""

from __future__ import annotations

from kneeprep.synth.dicom_writer import make_uid
from kneeprep.synth.plan import KneePlan, PatientPlan, SamplePlan

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


def identity_tags(patient: PatientPlan, knee: KneePlan, plan: SamplePlan) -> dict:
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


def series_uids(plan: SamplePlan, patient: PatientPlan, knee: KneePlan, kind: str) -> dict:
    key = ("kneeprep-synth", plan.seed, plan.size, patient.patient_id, knee.side)
    return {
        "study_uid": make_uid(*key, "study"),
        "frame_uid": make_uid(*key, "frame"),
        "series_uid": make_uid(*key, kind, "series"),
    }
