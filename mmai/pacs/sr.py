"""The result of one study as a DICOM Comprehensive SR (highdicom), its UIDs, and reading it back.

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

import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

from mmai.pacs.retry import PacsError

SCHEME = "99MMAI"
_NS = uuid.UUID("6f1d2b0e-7c1a-4f5e-9a63-4d2c7f0e8b11")  # mmai's namespace for derived UIDs
SR_SERIES_NUMBER = 9901
SKIP = ("case_id", "model_id")


class InstanceRef(NamedTuple):
    """An instance of the source series by its UIDs: SR evidence without reading its header (a cache
    file is named by its SOPInstanceUID)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPClassUID: str
    SOPInstanceUID: str


def _evidence_datasets(source: Sequence[Any]) -> list[Any]:
    """``source`` as pydicom Datasets for highdicom's evidence: headers as they are, an
    :class:`InstanceRef` as a Dataset holding its four UIDs (all highdicom reads of evidence beyond
    the first instance, whose patient and study modules the SR copies)."""
    from pydicom import Dataset

    out = []
    for item in source:
        if isinstance(item, InstanceRef):
            ds = Dataset()
            for key, value in item._asdict().items():
                setattr(ds, key, value)
            item = ds
        out.append(item)
    return out


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


def _code(value: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, SCHEME, meaning)


def build_sr(row: dict[str, Any], source: Sequence[Any], *, model_id: str, version: str, kind: str) -> Any:
    """One study's prediction as a Comprehensive SR.

    Args:
        row: the study's predictions row (columns of :meth:`mmai.inference.predictor.Predictor.columns`).
        source: headers (pydicom Datasets) of the instances of the series the prediction used; after
            the first, :class:`InstanceRef` UIDs will do.
        model_id: the run's model id; version: mmai's version; kind: the task kind (binary,
            multiclass, regression, survival) that decides whether ``prediction`` is a class (TEXT).

    Raises:
        PacsError: no source instance, or source instances of more than one study.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    if not source:
        raise PacsError("no source instance to attach the result SR to")
    source = _evidence_datasets(source)
    study = str(source[0].StudyInstanceUID)
    if any(str(ds.StudyInstanceUID) != study for ds in source):
        raise PacsError(f"the source instances of study {study} belong to several studies")
    series_uid = str(source[0].SeriesInstanceUID)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[Any] = [
        hd.sr.TextContentItem(Code("111001", "DCM", "Algorithm Name"), "mmai", relationship_type=contains),
        hd.sr.TextContentItem(Code("111003", "DCM", "Algorithm Version"), version, relationship_type=contains),
        hd.sr.TextContentItem(_code("model_id", "Model identifier"), model_id, relationship_type=contains),
        hd.sr.UIDRefContentItem(Code("112002", "DCM", "Series Instance UID"), series_uid,
                                relationship_type=contains),
    ]
    unit = Code("1", "UCUM", "no units")
    for column, value in row.items():
        if column in SKIP or value is None or (isinstance(value, float) and value != value):
            continue
        name = _code(column, _meaning(column))
        text = column in ("input_flags",) or (column == "prediction" and kind in ("binary", "multiclass"))
        if text:
            if str(value):
                items.append(hd.sr.TextContentItem(name, str(value), relationship_type=contains))
        else:
            items.append(hd.sr.NumContentItem(name, float(value), unit, relationship_type=contains))
    root = hd.sr.ContainerContentItem(Code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items  # type: ignore[assignment]  # pydicom turns the list into a Sequence
    sr = hd.sr.ComprehensiveSR(
        evidence=list(source), content=root,
        series_instance_uid=derived_uid(study, model_id, "sr-series"), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(study, model_id, "sr"), instance_number=1,
        manufacturer="mmai", is_complete=True, is_final=False, is_verified=False,
    )
    sr.SeriesDescription = f"mmai prediction {model_id}"[:64]
    return sr


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
