"""Walk a DICOM tree, read headers only, and split it into series stacks (one index row each).

A *stack* is a set of slices (files, or frames of one enhanced multi-frame file) that can be
turned into one 3D volume: one study, one SeriesInstanceUID, one orientation, one matrix size,
one acquisition/phase/echo, no localizers mixed in. The rules and the ``problems`` vocabulary
are documented in docs/dicom_scan.md; per-file header reading lives in
:mod:`mmai.io.dicom_scan_read`.

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

from mmai.io.deid import DEFAULT_SALT, pseudonym
from mmai.io.dicom_geometry import orientation_label as _geometry_label
from mmai.io.dicom_scan_read import read_headers

log = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-3      # max |difference| of direction cosines within one stack
POSITION_TOL_MM = 0.01      # slices closer than this along the normal share a position
TILT_MIN_DEG = 0.1          # smaller apparent tilts are rounding noise
# Fields tried, in order, to separate several volumes acquired at the same positions.
PHASE_KEYS = (("echo", "EchoNumbers"), ("temporal", "TemporalPositionIdentifier"),
              ("trigger", "TriggerTime"), ("acq", "AcquisitionNumber"), ("bvalue", "DiffusionBValue"),
              ("image_type", "ImageType"))

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


def slice_normal(iop: tuple[float, ...]) -> np.ndarray:
    """Return the unit slice normal (LPS) = cross(row cosine, column cosine)."""
    r = np.asarray(iop[:3], dtype=float)
    c = np.asarray(iop[3:6], dtype=float)
    n = np.cross(r, c)
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def orientation_label(iop: tuple[float, ...] | None) -> str:
    """Name the plane of a slice: axial, coronal, sagittal, oblique ('' if unknown).

    Same rule as the loader (mmai.io.dicom_geometry.orientation_label: the slice normal within
    10 degrees of a patient axis), so the index and DicomVolume.meta agree.
    """
    if iop is None or len(iop) != 6 or not np.any(slice_normal(iop)):
        return ""
    return _geometry_label(iop)


def _cluster(values: list[tuple[float, ...] | None], tol: float) -> list[int]:
    """Greedy clustering of equal-length float tuples (None = its own cluster id -1)."""
    centers: list[tuple[float, ...]] = []
    exact: dict[tuple[float, ...], int] = {}
    out: list[int] = []
    for v in values:
        if v is None:
            out.append(-1)
            continue
        ci = exact.get(v)
        if ci is None:
            for i, c in enumerate(centers):
                if len(c) == len(v) and max(abs(a - b) for a, b in zip(c, v, strict=True)) <= tol:
                    ci = i
                    break
            else:
                centers.append(v)
                ci = len(centers) - 1
            exact[v] = ci
        out.append(ci)
    return out


def _position_ids(d: np.ndarray) -> np.ndarray:
    """Give slices whose positions along the normal agree within POSITION_TOL_MM one id."""
    order = np.argsort(d, kind="stable")
    ids = np.empty(len(d), dtype=int)
    cur, last = -1, None
    for idx in order:
        if last is None or d[idx] - last > POSITION_TOL_MM:
            cur += 1
        ids[idx] = cur
        last = d[idx]
    return ids


def spacing_problems(ipps: np.ndarray, iop: tuple[float, ...]) -> dict[str, Any]:
    """Check the slice positions of one stack.

    Args:
        ipps: (N, 3) ImagePositionPatient per slice (LPS mm), N >= 2, any order.
        iop: the stack's ImageOrientationPatient (6 floats).

    Returns:
        dict with ``spacing`` (median step along the normal, mm), ``n_missing`` (slices that
        would fill the gaps), ``uneven`` (bool), ``tilt_deg`` (angle between the slice stack
        direction and the normal) and ``duplicates`` (bool).
    """
    n = slice_normal(iop)
    d = ipps @ n
    order = np.argsort(d)
    d_sorted = d[order]
    steps = np.diff(d_sorted)
    out: dict[str, Any] = {"spacing": None, "n_missing": 0, "uneven": False, "tilt_deg": 0.0,
                           "duplicates": bool(np.any(steps <= POSITION_TOL_MM))}
    steps = steps[steps > POSITION_TOL_MM]
    if steps.size == 0:
        return out
    s = float(np.median(steps))
    tol = max(0.02 * s, 0.01)
    out["spacing"] = round(s, 4)
    for st in steps:
        k = int(round(st / s))
        if k >= 2 and abs(st - k * s) <= tol * k:
            out["n_missing"] += k - 1
        elif abs(st - s) > tol:
            out["uneven"] = True
    v = ipps[order[-1]] - ipps[order[0]]
    along = float(v @ n)
    lateral = float(np.linalg.norm(v - along * n))
    if abs(along) > 0 and lateral > 0.01:
        tilt = float(np.degrees(np.arctan2(lateral, abs(along))))
        out["tilt_deg"] = round(tilt, 3) if tilt >= TILT_MIN_DEG else 0.0
    return out


# --------------------------------------------------------------------------- splitting


def _slices_of(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand one file record into slice records (one per frame for enhanced multi-frame)."""
    base = {k: rec.get(k) for k in ("rows", "cols", "iop", "ipp", "echo", "temporal", "trigger", "acq",
                                    "bvalue", "image_type", "instance", "pixel_spacing")}
    base["file"] = rec["path"]
    base["frame"] = None
    base["stack_key"] = None
    frames = rec.get("frames")
    if not frames:
        return [base]
    out = []
    for i, fr in enumerate(frames):
        s = dict(base)
        s["frame"] = i
        for k, v in fr.items():
            if v is not None:
                s[k] = v
        s["instance"] = i
        out.append(s)
    return out


def _split_phases(sl: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], str, list[str]]:
    """Split slices of one geometry group into volumes acquired at the same positions.

    Returns:
        (groups, phase_key, problems): ``phase_key`` names the separating field ('' if none).
    """
    if len(sl) < 2 or any(s["ipp"] is None or s["iop"] is None for s in sl):
        return [sl], "", []
    n = slice_normal(sl[0]["iop"])
    d = np.array([np.dot(np.asarray(s["ipp"], dtype=float), n) for s in sl])
    pid = _position_ids(d)
    if len(set(pid.tolist())) == len(sl):
        return [sl], "", []

    def unique_within(groups: dict[Any, list[int]]) -> bool:
        return all(len({pid[i] for i in idx}) == len(idx) for idx in groups.values())

    varying = [(k, name) for k, name in PHASE_KEYS if len({repr(s.get(k)) for s in sl}) > 1]
    tries = [[kv] for kv in varying] + ([varying] if len(varying) > 1 else [])
    for combo in tries:
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, s in enumerate(sl):
            groups[tuple(repr(s.get(k)) for k, _ in combo)].append(i)
        if unique_within(groups):
            ordered = sorted(groups.items(), key=lambda kv: _sort_key(sl[kv[1][0]], combo))
            return [[sl[i] for i in idx] for _, idx in ordered], "+".join(n for _, n in combo), []
    # Same multiplicity at every position: the k-th copy (by instance number) is phase k.
    counts = np.bincount(pid)
    if counts.min() == counts.max() > 1:
        by_pos: dict[int, list[int]] = defaultdict(list)
        for i in sorted(range(len(sl)), key=lambda i: (sl[i].get("instance") or 0, sl[i]["file"])):
            by_pos[int(pid[i])].append(i)
        m = int(counts.max())
        groups_l = [[sl[idx[k]] for idx in by_pos.values()] for k in range(m)]
        return groups_l, "InstanceNumber order", ["phases split by instance order"]
    return [sl], "", ["duplicate positions"]


def _sort_key(s: dict[str, Any], combo: list[tuple[str, str]]) -> tuple:
    vals = []
    for k, _ in combo:
        v = s.get(k)
        vals.append((0, float(v)) if isinstance(v, (int, float)) else (1, repr(v)))
    return tuple(vals)


def _is_localizer_type(image_type: tuple[str, ...] | None) -> bool:
    return any(str(t).upper() == "LOCALIZER" for t in image_type or ())


def _split_series(files: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Split the image slices of one series into stacks.

    Returns:
        list of (slices, info) with info keys: is_localizer, phase_key, phase_index, n_phases,
        multiframe, extra problems.
    """
    slices: list[dict[str, Any]] = []
    for rec in files:
        for s in _slices_of(rec):
            s["mf"] = bool(rec.get("frames")) or (rec.get("n_frames") or 1) > 1
            s["loc"] = _is_localizer_type(rec.get("image_type"))
            slices.append(s)
    orient_ids = _cluster([tuple(s["iop"]) if s["iop"] is not None else None for s in slices],
                          ORIENTATION_TOL)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for s, oid in zip(slices, orient_ids, strict=True):
        mf_key = s["file"] if s["mf"] else ""
        groups[(s["loc"], s["rows"], s["cols"], oid, mf_key, repr(s.get("stack_key")))].append(s)
    # A lone single-frame slice in an orientation other than the series' main stack is a
    # localizer; so are all slices of a series made only of lone slices in several orientations.
    real = [(k, sl) for k, sl in groups.items() if not k[0]]
    main = max(real, key=lambda kv: len(kv[1]), default=None)
    n_orient = len({k[3] for k, _ in real})

    def lone_localizer(key: tuple, sl: list[dict[str, Any]]) -> bool:
        if len(sl) != 1 or sl[0]["mf"] or n_orient < 2 or main is None:
            return False
        return len(main[1]) == 1 or key[3] != main[0][3]

    out: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    n_geo = 0
    for key, sl in groups.items():
        multiframe = bool(key[4])
        if key[0] or lone_localizer(key, sl):
            out.append((sl, {"is_localizer": True, "phase_key": "", "phase_index": 0, "n_phases": 1,
                             "multiframe": multiframe, "problems": ["localizer"]}))
            continue
        n_geo += 1
        phases, phase_key, probs = _split_phases(sl)
        n = len(phases)
        for pi, ph in enumerate(phases):
            out.append((ph, {"is_localizer": False, "phase_key": phase_key, "phase_index": pi + 1 if n > 1 else 0,
                             "n_phases": n, "multiframe": multiframe,
                             "problems": ([f"{n} phases"] if n > 1 else []) + list(probs)}))
    if n_geo > 1:
        for _, info in out:
            if not info["is_localizer"]:
                info["problems"].append(f"series has {n_geo} stacks")
    return out


# --------------------------------------------------------------------------- rows


def _fmt_problem_file(path: str, reason: str) -> str:
    reason = " ".join(str(reason).replace(";", ",").split())[:160]
    return f"unreadable: {os.path.basename(path)}: {reason}"


def _stack_row(sl: list[dict[str, Any]], info: dict[str, Any],
               recs: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[Path], list[int] | None]:
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
        ipps = np.array([s["ipp"] for s in sl], dtype=float)
        geo = spacing_problems(ipps, iop)
        if geo["n_missing"]:
            problems.append("missing slices")
        if geo["uneven"]:
            problems.append("uneven spacing")
        if geo["tilt_deg"]:
            problems.append("gantry tilt")
        n = slice_normal(iop)
        order = np.argsort(ipps @ n, kind="stable")
        sl = [sl[i] for i in order]
        files_in = list(dict.fromkeys(s["file"] for s in sl))
    for p in info["problems"]:
        if p not in problems:
            problems.append(p)
    if len(sl) == 1 and not info["multiframe"] and "localizer" not in problems:
        problems.append("single slice")
    if info["multiframe"] and not first.get("frames"):
        problems.append("legacy multi-frame")
    spacings = {tuple(round(v, 4) for v in s["pixel_spacing"]) for s in sl if s.get("pixel_spacing")}
    if len(spacings) > 1:
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


def scan(root: Path, *, workers: int = 1, progress: bool = False, pool: str = "thread",
         include_phi: bool = False, salt: str = DEFAULT_SALT) -> ScanResult:
    """Walk ``root``, read every file's header once, and split the tree into stacks.

    Args:
        root: a folder (walked recursively, symlinks not followed) or a single file.
        workers: parallel header readers; >1 uses a pool of ``pool`` kind.
        progress: show a tqdm bar on stderr.
        pool: "thread" (default: measured faster on 2 cores, see docs/dicom_scan.md) or "process".
        include_phi: keep the raw PatientID in ``row["patient_id"]`` (default: a pseudonym).
        salt: HMAC key of the pseudonym (see mmai.io.deid.pseudonym).

    Returns:
        ScanResult with the stacks (image stacks, then one per non-image series, then one
        per unreadable file) and the counts of skipped non-DICOM files and DICOMDIRs.

    Raises:
        DicomError: ``root`` does not exist.
    """
    from mmai.errors import DicomError

    root = Path(root)
    if not root.exists():
        raise DicomError(f"DICOM root {str(root)!r} does not exist")
    paths = [str(root)] if root.is_file() else _walk(root)
    records = read_headers(paths, workers=workers, progress=progress, pool=pool)
    res = ScanResult(stacks=[], n_files=len(paths))
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
    stacks: list[SeriesStack] = []
    for _key, recs_all in by_series.items():
        recs = _dedupe(recs_all)
        res.duplicates.extend(Path(d["path"]) for r in recs for d in r.get("duplicates", []))
        by_path = {r["path"]: r for r in recs}
        image = [r for r in recs if r.get("rows") is not None and r.get("has_pixels", True)]
        other = [r for r in recs if not (r.get("rows") is not None and r.get("has_pixels", True))]
        for sl, info in _split_series(image) if image else []:
            row, files, frames = _stack_row(sl, info, by_path)
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
                salt: str = DEFAULT_SALT) -> list[SeriesStack]:
    """Return every stack under ``root`` (see :func:`scan`; unreadable files are stacks of kind
    "unreadable", non-image series are stacks of kind "non-image")."""
    return scan(root, workers=workers, progress=progress, include_phi=include_phi, salt=salt).stacks


def stacks_to_frame(stacks: list[SeriesStack]) -> pd.DataFrame:
    """Turn stacks into the index DataFrame (one row per stack, INDEX_COLUMNS first)."""
    df = pd.DataFrame([s.row for s in stacks], columns=INDEX_COLUMNS)
    for col in ("rows", "cols", "series_number", "n_instances", "n_files", "n_missing", "phase_index", "n_phases"):
        df[col] = df[col].astype("Int64")  # integers stay integers next to missing values
    return df


def scan_tree(root: Path, *, workers: int = 1, progress: bool = False, include_phi: bool = False,
              salt: str = DEFAULT_SALT) -> pd.DataFrame:
    """Index a DICOM tree: one row per stack (the `mmai scan` CSV).

    ``patient_id`` holds a pseudonym (``p-`` + 16 hex digits) unless ``include_phi``. The
    counts of skipped files are in ``df.attrs`` (n_files, n_non_dicom, n_dicomdir, n_unreadable).
    """
    res = scan(root, workers=workers, progress=progress, include_phi=include_phi, salt=salt)
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
