"""The result of one study as a DICOM Comprehensive SR (highdicom's layout), its UIDs, and reading it back.

Content (docs/pacs.md): a root container "Diagnostic imaging report" (LOINC 18748-4) holding the
algorithm name and version (DCM 111001 / 111003), the model id, the source series UID (DCM 112002),
then one item per predictions column: numbers (``prob_<class>``, ``risk``, ``surv_<t>``,
``clinical_present``, a regression ``prediction``) as NUM items and text (the predicted class,
``input_flags``) as TEXT items, each coded ``(<column>, 99MMAI, <meaning>)``. The instances of the
series the prediction was computed from are the SR's evidence (Current Requested Procedure Evidence).

UIDs: the SR's SeriesInstanceUID and SOPInstanceUID are UUID-derived (``2.25.<uuid5>``) from the
StudyInstanceUID, the model id and the object kind, so a rerun of the same model on the same study
makes the same instance (a PACS replaces or ignores it; it never adds a second one). Patient and
study attributes are copied from the source instances only; nothing identifying is added (no
case id, no file path, no pseudonym).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

from mmai.pacs.retry import PacsError
from mmai.pacs.sr_modules import PATIENT_STUDY_KEYWORDS

SCHEME = "99MMAI"
_NS = uuid.UUID("6f1d2b0e-7c1a-4f5e-9a63-4d2c7f0e8b11")  # mmai's namespace for derived UIDs
SR_SERIES_NUMBER = 9901
SKIP = ("case_id", "model_id")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


class InstanceRef(NamedTuple):
    """An instance of the source series by its UIDs (evidence of the SR without reading its header)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPClassUID: str
    SOPInstanceUID: str


def derived_uid(study_uid: str, model_id: str, kind: str) -> str:
    """A UID fixed by (study, model, kind): ``2.25.`` + the integer of a UUIDv5 (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_NS, f'{study_uid}|{model_id}|{kind}').int}"


def _meaning(column: str) -> str:
    if column.startswith("prob_"):
        return f"Probability of class {column[5:]}"
    if column.startswith("surv_"):
        return f"Probability of no event by time {column[5:]}"
    return {"risk": "Risk score (higher = earlier event)", "prediction": "Predicted value",
            "clinical_present": "Clinical data present (1) or missing (0)",
            "input_flags": "Input repairs"}.get(column, column)


def _code(value: str, scheme: str, meaning: str) -> Any:
    """A code item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    from pydicom import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(value_type: str, concept: Any) -> Any:
    """A content item of the root container (relationship CONTAINS)."""
    from pydicom import Dataset

    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", value_type
    item.ConceptNameCodeSequence = [concept]
    return item


def _text(concept: Any, value: str) -> Any:
    item = _item("TEXT", concept)
    item.TextValue = value
    return item


def _num(concept: Any, value: float) -> Any:
    from pydicom import Dataset
    from pydicom.valuerep import DSfloat

    mv = Dataset()
    mv.MeasurementUnitsCodeSequence = [_code("1", "UCUM", "no units")]
    mv.FloatingPointValue = value
    mv.NumericValue = DSfloat(value, auto_format=True)  # DS holds 16 characters; the FD value is exact
    item = _item("NUM", concept)
    item.MeasuredValueSequence = [mv]
    return item


def _equipment(source: Any, version: str, now: Any) -> list[Any]:
    """Contributing Equipment: the source images' acquisition equipment (when the source names its
    manufacturer) and mmai, as highdicom describes itself and the acquisition."""
    from pydicom import Dataset
    from pydicom.valuerep import DT

    out = []
    if str(source.get("Manufacturer", "") or ""):
        acq = Dataset()
        acq.Manufacturer = source.Manufacturer
        acq.PurposeOfReferenceCodeSequence = [_code("109101", "DCM", "Acquisition Equipment")]
        for kw in ("ManufacturerModelName", "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress",
                   "StationName", "DeviceSerialNumber", "SoftwareVersions", "AcquisitionDateTime"):
            if source.get(kw) is not None:
                setattr(acq, "ContributionDateTime" if kw == "AcquisitionDateTime" else kw, source.get(kw))
        acq.ContributionDescription = "Acquisition equipment of the source image(s)"
        out.append(acq)
    sw = Dataset()
    sw.Manufacturer, sw.ManufacturerModelName, sw.SoftwareVersions = "mmai", "mmai", version
    sw.PurposeOfReferenceCodeSequence = [_code("109102", "DCM", "Processing Equipment")]
    sw.ContributionDateTime = DT(now)
    sw.ContributionDescription = "Software that created this instance"
    out.append(sw)
    return out


def build_sr(row: dict[str, Any], source: Sequence[Any], *, model_id: str, version: str, kind: str) -> Any:
    """One study's prediction as a Comprehensive SR (a pydicom Dataset ready to send or save).

    The layout is highdicom's ``ComprehensiveSR`` for this content (the patient and study modules
    copied from the first source header, the evidence, the flags; tests build both and compare), written
    directly with pydicom: highdicom's attribute tables cost about 0.7 s to load per process and its
    checks 10 ms per study, more than mmai's prediction of a small study.

    Args:
        row: the study's predictions row (columns of :meth:`mmai.inference.predictor.Predictor.columns`).
        source: the instances of the series the prediction used: the first a full header (pydicom
            Dataset, stop_before_pixels is enough), the others anything with StudyInstanceUID,
            SeriesInstanceUID, SOPClassUID and SOPInstanceUID attributes.
        model_id: the run's model id; version: mmai's version; kind: the task kind (binary,
            multiclass, regression, survival) that decides whether ``prediction`` is a class (TEXT).

    Raises:
        PacsError: no source instance, or source instances of more than one study.
    """
    import datetime

    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
    from pydicom.valuerep import DA, TM

    if not source:
        raise PacsError("no source instance to attach the result SR to")
    first = source[0]
    study = str(first.StudyInstanceUID)
    if any(str(ds.StudyInstanceUID) != study for ds in source):
        raise PacsError(f"the source instances of study {study} belong to several studies")
    series_uid = str(first.SeriesInstanceUID)
    sop_uid = derived_uid(study, model_id, "sr")
    now = datetime.datetime.now()

    ds = Dataset()
    ds.preamble = b"\x00" * 128
    ds.file_meta = meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(COMPREHENSIVE_SR), UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID, meta.ImplementationVersionName = PYDICOM_IMPLEMENTATION_UID, f"mmai{version}"[:16]
    # patient and study: the source's attributes of these modules (as highdicom copies them), type 2 kept empty
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
               "StudyDate", "StudyTime", "ReferringPhysicianName"):
        setattr(ds, kw, first.get(kw, "") or "")
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw in first:
            ds.add(copy.deepcopy(first[kw]))
    ds.StudyInstanceUID = study
    if "SpecificCharacterSet" in first:
        ds.SpecificCharacterSet = first.SpecificCharacterSet
    ds.SeriesInstanceUID, ds.SeriesNumber = derived_uid(study, model_id, "sr-series"), SR_SERIES_NUMBER
    ds.Modality, ds.Manufacturer = "SR", "mmai"
    ds.SeriesDescription = f"mmai prediction {model_id}"[:64]
    ds.SOPClassUID, ds.SOPInstanceUID, ds.InstanceNumber = COMPREHENSIVE_SR, sop_uid, 1
    ds.InstanceCreationDate, ds.InstanceCreationTime = DA(now.date()), TM(now.time())
    ds.ContentDate, ds.ContentTime = DA(now.date()), TM(now.time())
    ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag = "COMPLETE", "UNVERIFIED", "PRELIMINARY"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "CONTINUOUS"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    items: list[Any] = [
        _text(_code("111001", "DCM", "Algorithm Name"), "mmai"),
        _text(_code("111003", "DCM", "Algorithm Version"), version),
        _text(_code("model_id", SCHEME, "Model identifier"), model_id),
    ]
    ref = _item("UIDREF", _code("112002", "DCM", "Series Instance UID"))
    ref.UID = series_uid
    items.append(ref)
    for column, value in row.items():
        if column in SKIP or value is None or (isinstance(value, float) and value != value):
            continue
        name = _code(column, SCHEME, _meaning(column))
        text = column in ("input_flags",) or (column == "prediction" and kind in ("binary", "multiclass"))
        if text:
            if str(value):
                items.append(_text(name, str(value)))
        else:
            items.append(_num(name, float(value)))
    ds.ContentSequence = items
    ds.CurrentRequestedProcedureEvidenceSequence = [_evidence(source, study)]
    ds.PerformedProcedureCodeSequence = []
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.ContributingEquipmentSequence = _equipment(first, version, now)
    return ds


def _evidence(source: Sequence[Any], study: str) -> Any:
    """Current Requested Procedure Evidence: the source instances by series (first-seen order)."""
    from pydicom import Dataset

    by_series: dict[str, list[Any]] = {}
    for inst in source:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = str(inst.SOPClassUID), str(inst.SOPInstanceUID)
        by_series.setdefault(str(inst.SeriesInstanceUID), []).append(ref)
    series = []
    for uid, refs in by_series.items():
        item = Dataset()
        item.ReferencedSOPSequence = refs
        item.SeriesInstanceUID = uid
        series.append(item)
    out = Dataset()
    out.ReferencedSeriesSequence = series
    out.StudyInstanceUID = study
    return out


def read_sr_values(ds: Any) -> dict[str, Any]:
    """The mmai items of a result SR: ``{column: float or str}`` plus ``model_id``, ``series_uid``,
    ``algorithm`` and ``version`` (for users and tests reading results back from a PACS)."""
    out: dict[str, Any] = {}
    for item in getattr(ds, "ContentSequence", []):
        concept = item.ConceptNameCodeSequence[0]
        code = str(concept.get("CodeValue", "") or concept.get("LongCodeValue", ""))
        scheme = str(concept.CodingSchemeDesignator)
        if item.ValueType == "NUM" and scheme == SCHEME:
            mv = item.MeasuredValueSequence[0]
            out[code] = float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)
        elif item.ValueType == "TEXT":
            key = {"111001": "algorithm", "111003": "version"}.get(code, code) if scheme == "DCM" else code
            out[key] = str(item.TextValue)
        elif item.ValueType == "UIDREF" and code == "112002":
            out["series_uid"] = str(item.UID)
    return out
