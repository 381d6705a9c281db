"""Provenance of preprocessed volumes: which pipeline and modality produced them.

``mmai preprocess`` writes ``mmai:<pipeline id>`` into the NIfTI header's ``descrip`` and a JSON
header extension (code 6, "comment") ``{"mmai": {"pipeline_id", "modality", "intensity_stats",
"fov_lost_fraction"}}``. A loader checks every preprocessed input against what the run expects
(:func:`check_input`): a volume made by another pipeline, or of another modality, is refused
with a one-line reason instead of being normalised a second time. A raw input (no ``mmai:``
tag) passes and goes through the pipeline's chain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib

from mmai.errors import PreprocessError

TAG = "mmai:"
_EXT_CODE = 6  # NIfTI "comment" extension


class ProvenanceError(PreprocessError):
    """A preprocessed input does not come from the pipeline / modality the run expects."""


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def descrip(img: Any) -> str:
    """The NIfTI header's description field."""
    return bytes(img.header["descrip"].tobytes()).split(b"\x00")[0].decode("ascii", "replace")


def stamp(img: nib.Nifti1Image, info: dict[str, Any]) -> None:
    """Tag an image (in place) as preprocessed: ``descrip`` + a JSON header extension."""
    img.header["descrip"] = f"{TAG}{info['pipeline_id']}".encode()
    blob = json.dumps({"mmai": info}, sort_keys=True).encode()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(_EXT_CODE, blob))


def provenance_of(img: Any) -> dict[str, Any] | None:
    """The provenance of a loaded NIfTI image, or None for a raw (not mmai-preprocessed) one."""
    tag = descrip(img)
    if not tag.startswith(TAG):
        return None
    info: dict[str, Any] = {"pipeline_id": tag[len(TAG):]}
    for ext in img.header.extensions:
        if ext.get_code() == _EXT_CODE:
            try:
                data = json.loads(ext.get_content())
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and isinstance(data.get("mmai"), dict):
                info.update(data["mmai"])
    return info


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """Provenance of a file (None for a raw NIfTI, a DICOM folder or anything else)."""
    if isinstance(path, list) or not is_nifti(path):
        return None
    return provenance_of(nib.load(str(path)))


def expected_provenance(cfg: Any) -> dict[str, Any]:
    """What a run with the image section ``cfg`` accepts: its pipeline id and modality."""
    from mmai.transforms.pipelines import image_pipeline_id

    return {"pipeline_id": image_pipeline_id(cfg), "modality": cfg.modality}


def check_provenance(info: dict[str, Any] | None, expected: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`ProvenanceError` (one line) when a preprocessed input is not what ``expected`` says."""
    if info is None:
        return
    want, got = expected.get("pipeline_id"), info.get("pipeline_id")
    if want is not None and got != want:
        raise ProvenanceError(f"{path}: preprocessed by pipeline {got}, but this run uses pipeline {want}; "
                              "refusing to normalise it twice: give the raw image, or preprocess it with this pipeline")
    want_mod, got_mod = expected.get("modality", "any"), str(info.get("modality", "unknown"))
    if want_mod not in (None, "any") and got_mod not in ("unknown", want_mod):
        raise ProvenanceError(f"{path}: a {got_mod} volume, but this run was trained on {want_mod}; "
                              f"allowed: {want_mod}")


def check_input(path: str | Path, expected: dict[str, Any]) -> None:
    """Refuse ``path`` if it was preprocessed by another pipeline or is of another modality.

    Args:
        path: a NIfTI file or DICOM folder (raw inputs always pass).
        expected: ``{"pipeline_id": .., "modality": ..}`` (see :func:`expected_provenance`).

    Raises:
        ProvenanceError: one line naming the file, what it is and what is allowed.
    """
    check_provenance(read_provenance(path), expected, path)


def input_flags_column(case_ids: Any, rel_paths: list[str | None], out_dir: Path) -> list[str]:
    """The ``input_flags`` column of a preprocess manifest: each output's recorded flags ('' for a
    clean input or a missing image); every flagged case is logged with its flags."""
    import logging

    log = logging.getLogger(__name__)
    flags = []
    for cid, rel in zip(case_ids, rel_paths, strict=True):
        info = read_provenance(Path(out_dir) / rel) if rel else None
        text = str((info or {}).get("input_flags") or "")
        if text:
            log.warning("case %s: input repaired: %s", cid, text)
        flags.append(text)
    return flags


def run_image_state(cfg: Any, loader: Any = None) -> dict[str, Any]:
    """The ``image`` entry of a run's state.json: pipeline id, modality and the inputs' intensity
    statistics (from the preprocessed volumes the loader read, when the pipeline learns any)."""
    state = expected_provenance(cfg)
    stats = getattr(loader, "stats", None) if loader is not None else None
    state["intensity_stats"] = stats
    seen = sorted(getattr(loader, "modalities_seen", set()) or []) if loader is not None else []
    state["input_modalities"] = seen
    return state
