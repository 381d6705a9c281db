"""Offline 3D viewer pages: the scan with its saliency / attention overlay in three planes (NiiVue).

- :func:`write_case_page`: one case's page (``mmai predict --explain DIR`` writes
  ``DIR/<stem>_viewer.html`` beside the overview PNG);
- :func:`report_cases`: the cases of an explanation folder, for ``mmai evaluate --explain DIR``
  (the report's "3D viewer" section, :func:`mmai.viewer.page.viewer_block`).

Everything a page needs is inside it (the vendored NiiVue build, the volumes): it opens from
``file://`` with no network. See docs/evaluate.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmai.viewer.page import case_entry, read_cases, viewer_block, write_page
from mmai.viewer.volumes import ViewerVolumes, decode, encode, prepare

log = logging.getLogger(__name__)

CASE_MAX_DIM = 128  # voxels per axis on a case page
REPORT_MAX_DIM = 96  # voxels per axis for each case of the evaluation report

__all__ = ["CASE_MAX_DIM", "REPORT_MAX_DIM", "ViewerVolumes", "case_entry", "decode", "encode", "prepare",
           "read_cases", "report_cases", "viewer_block", "write_case_page", "write_page"]


def write_case_page(path: Path, image: np.ndarray, maps: dict[str, np.ndarray], affine: np.ndarray, *,
                    case_id: str, facts: list[tuple[str, str]], max_dim: int = CASE_MAX_DIM) -> Path:
    """Write one case's self-contained viewer page.

    Args:
        path: the HTML file to write (atomically).
        image: the scan (X, Y, Z) on its own grid.
        maps: name -> (X, Y, Z) map in [0, 1] on the same grid ("saliency" first: the crosshair
            starts on its peak).
        affine: (4, 4) voxel -> world of that grid.
        case_id: shown in the title and the facts.
        facts: (name, value) rows shown above the planes (model, probability, ...).
        max_dim: voxels per axis kept (larger scans are block-downsampled).
    """
    vols = prepare(image, maps, affine, max_dim=max_dim)
    entry = case_entry(encode(vols), [("case", case_id), *facts], label=case_id)
    write_page(path, [entry], title=f"mmai explanation: {case_id}")
    log.debug("viewer page %s (%d bytes)", path, Path(path).stat().st_size)
    return Path(path)


def prediction_facts(predictor: Any, case: Any, row: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(column, value) of the case's prediction as ``mmai predict`` writes it, plus the model id.

    Args:
        row: the case's predictions.csv row when the caller already has it (explain does: the
            forward pass its maps came from); else the prediction is made again (the ensemble's
            mean for a K-fold run). A predictor without ``predict_batch`` (a test stub) or a case
            that fails gives the model id only.
    """
    facts = [("model", str(getattr(predictor, "model_id", "")))]
    predict = getattr(predictor, "predict_batch", None)
    if row is None and predict is None:
        return facts
    errors: list[dict[str, str]] = []
    rows = [row] if row is not None else predict(case, errors) if predict is not None else []
    if not rows:
        log.warning("viewer: no prediction for the page of case %s: %s", case["case_id"].iloc[0],
                    errors[0]["error"] if errors else "no row")
        return facts
    for k, v in rows[0].items():
        if k in ("case_id", "model_id") or v is None or v == "":
            continue
        facts.append((k, f"{float(v):.3f}" if isinstance(v, float | np.floating) else str(v)))
    return facts


def _reduce_entry(entry: dict[str, Any], max_dim: int) -> dict[str, Any]:
    """A case's encoded volumes downsampled further (decode -> block reduce -> encode)."""
    if max(entry["shape"]) <= max_dim:
        return entry
    img = decode(entry["image"])
    maps = {k: np.asarray(decode(v).dataobj, dtype=np.float32) for k, v in entry["maps"].items()}
    vols = prepare(np.asarray(img.dataobj, dtype=np.float32), maps, img.affine, max_dim=max_dim)
    enc = encode(vols)
    enc["factors"] = [a * b for a, b in zip(entry["factors"], enc["factors"], strict=True)]
    enc["source_shape"] = entry["source_shape"]
    return {**entry, **enc}


def report_cases(pages: dict[str, Path], facts: dict[str, list[tuple[str, str]]], labels: dict[str, str], *,
                 max_dim: int = REPORT_MAX_DIM) -> list[dict[str, Any]]:
    """The cases of the evaluation report's viewer, read from their case pages.

    Args:
        pages: case_id -> its ``<stem>_viewer.html`` (in report order).
        facts: case_id -> (name, value) rows replacing the page's own (the report knows the truth).
        labels: case_id -> the text of the case selector.
        max_dim: voxels per axis kept for each case (the report holds several).

    A page that cannot be read is logged and left out.
    """
    from mmai.errors import MmaiError

    out = []
    for cid, path in pages.items():
        try:
            entries = read_cases(path)
        except (OSError, MmaiError) as exc:
            log.warning("viewer: case %s left out of the report: %s", cid, exc)
            continue
        entry = _reduce_entry(entries[0], max_dim)
        out.append({**entry, "facts": [[str(k), str(v)] for k, v in facts.get(cid, entry["facts"])],
                    "label": labels.get(cid, cid)})
    return out
