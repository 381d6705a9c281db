"""Walk a DICOM tree, read headers only, and split it into series stacks (one index row each).

A *stack* is a set of slices (files, or frames of one enhanced multi-frame file) that can be
turned into one 3D volume: one study, one SeriesInstanceUID, one orientation, one matrix size,
one acquisition/phase/echo, no localizers mixed in. The rules and the ``problems`` vocabulary
are documented in docs/dicom_scan.md; per-file header reading lives in
:mod:`mmai.io.dicom_scan_read`, the splitting in :mod:`mmai.io.dicom_stacks`, and the geometry
check (the loader's own, :func:`mmai.io.dicom_geometry.check_stack`) in
:mod:`mmai.io.dicom_geometry`.

Example:
    >>> df = scan_tree(Path("/data/dicom"), workers=2)
    >>> df[["series_description", "orientation", "n_instances", "problems"]]
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.errors import DicomError
from mmai.io.deid import DEFAULT_SALT, pseudonym
from mmai.io.dicom_geometry import (
    DEFAULT_POLICY,
    GeometryPolicy,
    check_stack,
    policy_from,
    same_pixel_spacing,
    slice_normal,
)
from mmai.io.dicom_geometry import orientation_label as _geometry_label
from mmai.io.dicom_mosaic import is_mosaic
from mmai.io.dicom_scan_read import read_headers
from mmai.io.dicom_stacks import split_series

log = logging.getLogger(__name__)


INDEX_COLUMNS = [
    "patient_id", "study_uid", "series_uid", "modality", "series_description", "n_instances",
    "rows", "cols", "orientation", "path", "problems",
    "stack_id", "kind", "series_number", "image_type", "is_localizer", "multiframe", "n_files",
    "slice_thickness", "pixel_spacing", "spacing", "n_missing", "tilt_deg", "phase_key",
    "phase_index", "n_phases", "transfer_syntax", "sop_class",
]


@dataclass
class SeriesStack:
    """One stack of slices that makes one volume.

    Attributes:
        files: the files of this stack, sorted along the slice normal when geometry is known
            (the loader sorts again; order is not a contract).
        row: the index row (keys = INDEX_COLUMNS).
        frames: for enhanced multi-frame stacks, the 0-based frame indices of ``files[0]``
            that belong to this stack; None for single-frame stacks.
    """

    files: list[Path]
    row: dict[str, Any]
    frames: list[int] | None = None


@dataclass
class ScanResult:
    """Everything one walk found: the stacks plus the files that were skipped on purpose."""

    stacks: list[SeriesStack]
    n_files: int = 0
    n_non_dicom: int = 0
    n_dicomdir: int = 0
    non_dicom: list[Path] = field(default_factory=list)
    dicomdirs: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)   # second copies of one SOPInstanceUID
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- geometry helpers


def orientation_label(iop: tuple[float, ...] | None) -> str:
    """Name the plane of a slice: axial, coronal, sagittal, oblique ('' if unknown).

    Same rule as the loader (mmai.io.dicom_geometry.orientation_label: the slice normal within
    10 degrees of a patient axis), so the index and DicomVolume.meta agree.
    """
    if iop is None or len(iop) != 6 or not np.any(slice_normal(iop)):
        return ""
    return _geometry_label(iop)


def spacing_problems(ipps: np.ndarray, iop: tuple[float, ...], policy: GeometryPolicy = DEFAULT_POLICY,
                     pixel_spacing: float | None = None) -> dict[str, Any]:
    """Check the slice positions of one stack with the loader's rule
    (:func:`mmai.io.dicom_geometry.check_stack`, the same tolerances).

    Args:
        ipps: (N, 3) ImagePositionPatient per slice (LPS mm), N >= 2, any order.
        iop: the stack's ImageOrientationPatient (6 floats).
        policy: the tolerances (pipeline YAML ``image.dicom``).
        pixel_spacing: the smaller PixelSpacing (mm); with it, slice origins off one straight
            line are a problem too (the loader refuses such a stack).

    Returns:
        dict with ``spacing`` (median step along the normal, mm), ``n_missing`` (slices that
        would fill the gaps), ``uneven`` (not uniform, and not only whole missing slices),
        ``tilt_deg`` (angle of the in-plane drift of the slice origins), ``duplicates`` (bool)
        and ``problems`` (the geometry problem names, as the loader reports them).
    """
    chk = check_stack(ipps, iop, policy)
    problems = chk.problems(pixel_spacing)
    return {"spacing": round(chk.median_step, 4) if chk.median_step > 0 else None,
            "n_missing": chk.n_missing, "uneven": "uneven spacing" in problems,
            "tilt_deg": round(chk.tilt_deg, 3), "duplicates": bool(chk.n_duplicates), "problems": problems}


# --------------------------------------------------------------------------- rows


def _fmt_problem_file(path: str, reason: str) -> str:
    reason = " ".join(str(reason).replace(";", ",").split())[:160]
    return f"unreadable: {os.path.basename(path)}: {reason}"


def _geometry(sl: list[dict[str, Any]], iop: tuple[float, ...],
              policy: GeometryPolicy) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the slices sorted along the normal, :func:`spacing_problems` of their positions)."""
    ipps = np.array([s["ipp"] for s in sl], dtype=float)
    ps = sl[0].get("pixel_spacing")
    geo = spacing_problems(ipps, iop, policy, min(ps) if ps else None)
    order = np.argsort(ipps @ slice_normal(iop), kind="stable")
    return [sl[i] for i in order], geo


def _stack_row(sl: list[dict[str, Any]], info: dict[str, Any], recs: dict[str, dict[str, Any]],
               policy: GeometryPolicy = DEFAULT_POLICY) -> tuple[dict[str, Any], list[Path], list[int] | None]:
    """Build the index row, the file list and the frame list of one stack."""
    first = recs[sl[0]["file"]]
    problems: list[str] = []
    iop = sl[0]["iop"]
    files_in = list(dict.fromkeys(s["file"] for s in sl))
    geo: dict[str, Any] = {"spacing": None, "n_missing": 0, "tilt_deg": 0.0}
    if info["is_localizer"]:
        problems.append("localizer")
    if iop is None or any(s["ipp"] is None for s in sl):
        if first.get("rows") is not None and not (first.get("n_frames") or 1) > 1:
            problems.append("no geometry")
    elif len(sl) >= 2:
        sl, geo = _geometry(sl, iop, policy)
        problems.extend(geo["problems"])
        files_in = list(dict.fromkeys(s["file"] for s in sl))
    for p in info["problems"]:
        if p not in problems:
            problems.append(p)
    mosaic = is_mosaic(first.get("image_type"))
    if mosaic:  # one file = one volume of NumberOfImagesInMosaic tiles (mmai.io.dicom_mosaic)
        problems.append("mosaic")
    elif len(sl) == 1 and not info["multiframe"] and "localizer" not in problems:
        problems.append("single slice")
    if info["multiframe"] and not first.get("frames"):
        problems.append("legacy multi-frame")
    spacings = [s["pixel_spacing"] for s in sl if s.get("pixel_spacing")]
    if any(not same_pixel_spacing(ps, spacings[0]) for ps in spacings[1:]):
        problems.append("mixed pixel spacing")
    n_dup = sum(len(recs[f].get("duplicates", [])) for f in files_in)
    if n_dup:
        problems.append(f"{n_dup} duplicate instances ignored")
    for f in files_in:
        for r in [recs[f], *recs[f].get("duplicates", [])]:
            problems.extend(_fmt_problem_file(r["path"], fp) for fp in r.get("problems", []))
    frames = sorted(s["frame"] for s in sl) if info["multiframe"] and first.get("frames") else None
    parents = {os.path.dirname(f) for f in files_in}
    path = files_in[0] if info["multiframe"] else (os.path.commonpath(list(parents)) if parents else "")
    ps = sl[0].get("pixel_spacing")
    it = first.get("image_type")
    row = {
        "patient_id": first.get("patient_id") or "", "study_uid": first.get("study_uid") or "",
        "series_uid": first.get("series_uid") or "", "modality": first.get("modality") or "",
        "series_description": first.get("series_description") or "",
        "n_instances": len(sl), "rows": sl[0]["rows"], "cols": sl[0]["cols"],
        "orientation": orientation_label(iop), "path": path, "problems": ";".join(problems),
        "stack_id": "", "kind": "image", "series_number": first.get("series_number"),
        "image_type": "\\".join(it) if it else "", "is_localizer": bool(info["is_localizer"]),
        "multiframe": bool(info["multiframe"]), "n_files": len(files_in),
        "slice_thickness": first.get("thickness"),
        "pixel_spacing": f"{ps[0]:g}x{ps[1]:g}" if ps and len(ps) == 2 else "",
        "spacing": geo["spacing"], "n_missing": geo["n_missing"], "tilt_deg": geo["tilt_deg"],
        "phase_key": info["phase_key"], "phase_index": info["phase_index"], "n_phases": info["n_phases"],
        "transfer_syntax": first.get("transfer_syntax") or "", "sop_class": first.get("sop_class") or "",
    }
    return row, [Path(f) for f in files_in], frames


def _other_row(recs: list[dict[str, Any]], kind: str, problems: list[str]) -> dict[str, Any]:
    first = recs[0]
    files = [r["path"] for r in recs]
    parents = {os.path.dirname(f) for f in files}
    for r in recs:
        for d in [r, *r.get("duplicates", [])]:
            problems += [_fmt_problem_file(d["path"], p) for p in d.get("problems", [])]
    return {
        "patient_id": first.get("patient_id") or "", "study_uid": first.get("study_uid") or "",
        "series_uid": first.get("series_uid") or "", "modality": first.get("modality") or "",
        "series_description": first.get("series_description") or "", "n_instances": len(recs),
        "rows": None, "cols": None, "orientation": "",
        "path": files[0] if kind == "unreadable" else os.path.commonpath(list(parents)),
        "problems": ";".join(problems), "stack_id": "", "kind": kind,
        "series_number": first.get("series_number"), "image_type": "", "is_localizer": False,
        "multiframe": False, "n_files": len(files), "slice_thickness": None, "pixel_spacing": "",
        "spacing": None, "n_missing": 0, "tilt_deg": 0.0, "phase_key": "", "phase_index": 0,
        "n_phases": 1, "transfer_syntax": first.get("transfer_syntax") or "",
        "sop_class": first.get("sop_class") or "",
    }


# --------------------------------------------------------------------------- public API


def _partition(records: list[dict[str, Any]], res: ScanResult
               ) -> tuple[dict[tuple[str, str], list[dict[str, Any]]], list[dict[str, Any]]]:
    """Count skipped files in ``res``; group readable records by (study, series); list unreadable ones."""
    by_series: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    unreadable_recs: list[dict[str, Any]] = []
    for rec in records:
        st = rec["status"]
        if st == "not_dicom":
            res.n_non_dicom += 1
            res.non_dicom.append(Path(rec["path"]))
        elif st == "dicomdir":
            res.n_dicomdir += 1
            res.dicomdirs.append(Path(rec["path"]))
        elif st == "unreadable":
            res.unreadable.append((Path(rec["path"]), rec["reason"]))
            unreadable_recs.append(rec)
        else:
            series = rec.get("series_uid") or "no-series-uid:" + os.path.dirname(rec["path"])
            by_series[(rec.get("study_uid") or "", series)].append(rec)
    return by_series, unreadable_recs


def scan(root: Path, *, workers: int = 1, progress: bool = False, pool: str = "thread",
         include_phi: bool = False, salt: str = DEFAULT_SALT, policy: Any = None) -> ScanResult:
    """Walk ``root``, read every file's header once, and split the tree into stacks.

    Args:
        root: a folder (walked recursively, symlinks not followed) or a single file.
        workers: parallel header readers; >1 uses a pool of ``pool`` kind.
        progress: show a tqdm bar on stderr.
        pool: "thread" (default: measured faster on 2 cores, see docs/dicom_scan.md) or "process".
        include_phi: keep the raw PatientID in ``row["patient_id"]`` (default: a pseudonym).
        salt: HMAC key of the pseudonym (see mmai.io.deid.pseudonym).
        policy: geometry tolerances (:func:`mmai.io.dicom_geometry.policy_from`: None = defaults,
            a GeometryPolicy, or the pipeline's ``image.dicom``); the loader uses the same ones.

    Returns:
        ScanResult with the stacks (image stacks, then one per non-image series, then one
        per unreadable file) and the counts of skipped non-DICOM files and DICOMDIRs.

    Raises:
        DicomError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise DicomError(f"DICOM root {str(root)!r} does not exist")
    paths = [str(root)] if root.is_file() else _walk(root)
    records = read_headers(paths, workers=workers, progress=progress, pool=pool)
    res = ScanResult(stacks=[], n_files=len(paths))
    pol = policy_from(policy)
    by_series, unreadable_recs = _partition(records, res)
    stacks: list[SeriesStack] = []
    for _key, recs_all in by_series.items():
        recs = _dedupe(recs_all)
        res.duplicates.extend(Path(d["path"]) for r in recs for d in r.get("duplicates", []))
        by_path = {r["path"]: r for r in recs}
        image = [r for r in recs if r.get("rows") is not None and r.get("has_pixels", True)]
        other = [r for r in recs if not (r.get("rows") is not None and r.get("has_pixels", True))]
        for sl, info in split_series(image, pol) if image else []:
            row, files, frames = _stack_row(sl, info, by_path, pol)
            stacks.append(SeriesStack(files=files, row=row, frames=frames))
        if other:
            why = "not an image" if all(r.get("rows") is None for r in other) else "no pixel data"
            stacks.append(SeriesStack(files=sorted(Path(r["path"]) for r in other),
                                      row=_other_row(other, "non-image", [why]), frames=None))
    stacks.sort(key=lambda s: (s.row["patient_id"], s.row["study_uid"], _num(s.row["series_number"]),
                               s.row["series_uid"], s.row["is_localizer"], s.row["phase_index"],
                               s.row["orientation"], s.row["path"]))
    for rec in unreadable_recs:
        row = _other_row([rec], "unreadable", [_fmt_problem_file(rec["path"], rec["reason"])])
        stacks.append(SeriesStack(files=[Path(rec["path"])], row=row, frames=None))
    for i, s in enumerate(stacks):
        s.row["stack_id"] = f"s{i:04d}"
        if not include_phi:
            s.row["patient_id"] = pseudonym(s.row["patient_id"], salt)
    res.stacks = stacks
    log.debug("scanned %d files under %s: %d stacks, %d non-DICOM files skipped, %d DICOMDIR skipped, "
             "%d unreadable", len(paths), root, len(stacks), res.n_non_dicom, res.n_dicomdir,
             len(res.unreadable))
    return res


def scan_stacks(root: Path, *, workers: int = 1, progress: bool = False, include_phi: bool = False,
                salt: str = DEFAULT_SALT, policy: Any = None) -> list[SeriesStack]:
    """Return every stack under ``root`` (see :func:`scan`; unreadable files are stacks of kind
    "unreadable", non-image series are stacks of kind "non-image")."""
    return scan(root, workers=workers, progress=progress, include_phi=include_phi, salt=salt,
                policy=policy).stacks


def stacks_to_frame(stacks: list[SeriesStack]) -> pd.DataFrame:
    """Turn stacks into the index DataFrame (one row per stack, INDEX_COLUMNS first)."""
    df = pd.DataFrame([s.row for s in stacks], columns=INDEX_COLUMNS)
    for col in ("rows", "cols", "series_number", "n_instances", "n_files", "n_missing", "phase_index", "n_phases"):
        df[col] = df[col].astype("Int64")  # integers stay integers next to missing values
    return df


def scan_tree(root: Path, *, workers: int = 1, progress: bool = False, include_phi: bool = False,
              salt: str = DEFAULT_SALT, policy: Any = None) -> pd.DataFrame:
    """Index a DICOM tree: one row per stack (the `mmai scan` CSV).

    ``patient_id`` holds a pseudonym (``p-`` + 16 hex digits) unless ``include_phi``. The
    counts of skipped files are in ``df.attrs`` (n_files, n_non_dicom, n_dicomdir, n_unreadable).
    """
    res = scan(root, workers=workers, progress=progress, include_phi=include_phi, salt=salt, policy=policy)
    df = stacks_to_frame(res.stacks)
    df.attrs.update(n_files=res.n_files, n_non_dicom=res.n_non_dicom, n_dicomdir=res.n_dicomdir,
                    n_unreadable=len(res.unreadable))
    return df


def _dedupe(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep one file per SOPInstanceUID (the first without problems); the others are listed
    under the kept record's ``duplicates``."""
    by_uid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    out: list[dict[str, Any]] = []
    for r in recs:
        if r.get("sop_uid"):
            by_uid[r["sop_uid"]].append(r)
        else:
            out.append(r)
    for group in by_uid.values():
        group.sort(key=lambda r: (bool(r.get("problems")), r["path"]))
        keep = group[0]
        keep["duplicates"] = group[1:]
        out.append(keep)
    return out


def _walk(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames))
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("inf")
