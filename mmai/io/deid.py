"""Which DICOM header fields may leave the loader, and pseudonymous patient keys.

Policy (see docs/dicom_scan.md): by default nothing that identifies a person leaves mmai's
DICOM layer. Names, birth dates, patient/accession/other IDs, addresses, institution and
physician names, free-text comments and dates never reach logs, sidecars, index CSVs or
manifests unless the caller passes ``include_phi=True`` explicitly. What may leave is an
*allow-list* (never a deny-list: a field nobody thought of stays inside): geometry, pixel
encoding and acquisition parameters.

Patient keys are replaced by :func:`pseudonym`, a keyed hash (HMAC-SHA256) of the ID, so rows
of one patient still group together without exposing the ID. The key is a secret of the site:
the CLI's ``--salt-file FILE`` (read by :func:`read_salt_file`, set with
:func:`set_pseudonym_key`), else the environment variable ``MMAI_PSEUDONYM_KEY`` holding the
secret itself, else the public default :data:`DEFAULT_SALT`, with a warning (once per process):
anyone can recompute public-default pseudonyms from a PatientID, so they are not de-identified.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from mmai.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SALT = "mmai-deid-v1"
#: Environment variable holding the pseudonym secret itself (not a path).
KEY_ENV = "MMAI_PSEUDONYM_KEY"
MIN_KEY_CHARS = 16

_state: dict[str, Any] = {"key": None, "warned": False}

#: Header keywords that may leave the loader (index rows, sidecars, DicomVolume.meta, logs).
SAFE_KEYWORDS: tuple[str, ...] = (
    # what the object is
    "SOPClassUID", "Modality", "ImageType", "SeriesNumber", "SeriesDescription",
    "ProtocolName", "BodyPartExamined", "AcquisitionNumber", "InstanceNumber",
    "TemporalPositionIdentifier", "NumberOfTemporalPositions", "EchoNumbers", "ContrastBolusAgent",
    # geometry
    "Rows", "Columns", "NumberOfFrames", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "ImageOrientationPatient", "ImagePositionPatient", "PatientPosition", "GantryDetectorTilt",
    "FrameOfReferenceUID",
    # pixel encoding
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "WindowCenter", "WindowWidth",
    # equipment (model, not the site)
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "MagneticFieldStrength",
    # CT acquisition
    "KVP", "XRayTubeCurrent", "Exposure", "ExposureTime", "ConvolutionKernel", "FilterType",
    "SpiralPitchFactor", "TableSpeed", "RevolutionTime", "SingleCollimationWidth",
    "TotalCollimationWidth", "DataCollectionDiameter", "ReconstructionDiameter", "CTDIvol",
    # MR acquisition
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "EchoTrainLength",
    "NumberOfAverages", "ImagingFrequency", "ImagedNucleus", "PixelBandwidth",
    "ReceiveCoilName", "TransmitCoilName", "AcquisitionMatrix", "InPlanePhaseEncodingDirection",
    "PercentSampling", "PercentPhaseFieldOfView", "DiffusionBValue", "TriggerTime",
    "ParallelReductionFactorInPlane",
    # PET/NM
    "Units", "DecayCorrection", "CorrectedImage", "AttenuationCorrectionMethod",
    "ReconstructionMethod", "RadiopharmaceuticalInformationSequence",
)

#: Keywords that identify a person or a visit; never written unless include_phi is requested.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "StationName",
    "DeviceSerialNumber", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "StudyDescription",
    "ImageComments", "PatientComments", "RequestAttributesSequence", "AdditionalPatientHistory",
)

_SAFE = frozenset(SAFE_KEYWORDS)


def _check_key(key: str, source: str) -> str:
    key = key.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"{source}: the pseudonym secret has {len(key)} character(s); use at least "
                          f"{MIN_KEY_CHARS} (e.g. the output of `openssl rand -hex 32`)")
    return key


def read_salt_file(path: str | Path) -> str:
    """The pseudonym secret stored in ``path`` (its text, stripped; at least 16 characters).

    Raises:
        ConfigError: the file is missing, unreadable, a folder, or holds a too short secret.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--salt-file {path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--salt-file {path}: cannot read it: {exc}") from exc
    return _check_key(text, f"--salt-file {path}")


def set_pseudonym_key(key: str | None) -> None:
    """Use ``key`` for every pseudonym made in this process (None: back to env var / default)."""
    _state["key"] = None if key is None else _check_key(key, "pseudonym key")


def pseudonym_key() -> str:
    """The secret in force: :func:`set_pseudonym_key`, else ``$MMAI_PSEUDONYM_KEY``, else the public
    default (logging a warning once per process)."""
    if _state["key"] is not None:
        return str(_state["key"])
    env = os.environ.get(KEY_ENV)
    if env is not None and env.strip():
        return _check_key(env, f"${KEY_ENV}")
    if not _state["warned"]:
        _state["warned"] = True
        log.warning("pseudonyms use mmai's public default salt: anyone can recompute them from a PatientID; "
                    "pass --salt-file FILE or set %s to a secret (docs/cli.md)", KEY_ENV)
    return DEFAULT_SALT


def pseudonym(value: str, salt: str | None = None) -> str:
    """Return a stable, non-reversible key for an identifier (e.g. PatientID).

    Args:
        value: the identifier; an empty value maps to "" (unknown stays unknown).
        salt: HMAC key; None or :data:`DEFAULT_SALT` mean "the key in force" (:func:`pseudonym_key`).

    Returns:
        ``"p-"`` followed by 16 hex digits of HMAC-SHA256(salt, value).
    """
    text = str(value).strip()
    if not text:
        return ""
    key = pseudonym_key() if salt is None or salt == DEFAULT_SALT else salt
    digest = hmac.new(key.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()
    return "p-" + digest[:16]


def _plain(value: Any) -> Any:
    """Convert a pydicom value to JSON-friendly Python (lists, floats, ints, str)."""
    # Local import: pydicom is only needed when a dataset is passed in.
    from pydicom.multival import MultiValue
    from pydicom.sequence import Sequence
    from pydicom.valuerep import IS, DSfloat, PersonName

    if isinstance(value, Sequence):
        return [safe_meta(item) for item in value]
    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PersonName):  # never on the allow-list, but be safe in sequences
        return None
    if isinstance(value, (DSfloat, float)):
        return float(value)
    if isinstance(value, (IS, int)):
        return int(value)
    if isinstance(value, bytes):
        return None
    return str(value)


def safe_meta(ds: Any, *, include_phi: bool = False) -> dict[str, Any]:
    """Return the header fields of a dataset that may leave the loader.

    Args:
        ds: a ``pydicom.Dataset`` (or a sequence item).
        include_phi: also copy the PHI keywords (only when the user explicitly asked).

    Returns:
        ``{keyword: JSON-friendly value}`` for the allow-listed keywords present in ``ds``
        (plus PHI_KEYWORDS when ``include_phi``). Values that cannot be decoded are skipped.
    """
    wanted = SAFE_KEYWORDS + (PHI_KEYWORDS if include_phi else ())
    out: dict[str, Any] = {}
    for kw in wanted:
        if kw not in ds:
            continue
        try:
            elem = ds[kw]
            value = str(elem.value) if elem.VR == "PN" else _plain(elem.value)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
            continue  # a malformed value is simply not exported
        if value is None or value == "" or value == []:
            continue
        out[kw] = value
    return out


def is_safe_keyword(keyword: str) -> bool:
    """True if ``keyword`` is on the allow-list of fields that may leave the loader."""
    return keyword in _SAFE
