"""Split the slices of one DICOM series into stacks: orientation, matrix, localizers, phases.

The one stack/phase splitter of mmai: :mod:`mmai.io.dicom_scan` builds the index with it, and
the loader gets its stacks from the scan (:func:`mmai.io.reader.load_dicom_folder`,
``mmai convert``). Slices are plain dict records (see :mod:`mmai.io.dicom_scan_read`); the
rules are documented in docs/dicom_scan.md. Tolerances come from
:mod:`mmai.io.dicom_geometry` (orientation agreement, duplicate positions).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from mmai.io.dicom_geometry import DEFAULT_POLICY, DUPLICATE_TOL_MM, GeometryPolicy, slice_normal
from mmai.io.dicom_mosaic import is_mosaic

# Fields tried, in order, to separate several volumes acquired at the same positions.
PHASE_KEYS = (("echo", "EchoNumbers"), ("temporal", "TemporalPositionIdentifier"),
              ("trigger", "TriggerTime"), ("acq", "AcquisitionNumber"), ("bvalue", "DiffusionBValue"),
              ("dims", "DimensionIndexValues"), ("image_type", "ImageType"))
#: Enhanced multi-frame dimensions that are the position within a stack, or a key of their own
#: (InStackPositionNumber, ImagePositionPatient, StackID, TemporalPositionIndex).
KNOWN_DIMENSIONS = frozenset({0x00209057, 0x00200032, 0x00209056, 0x00209128})


def other_dimensions(ds: Any) -> list[int]:
    """Indices into DimensionIndexValues of an enhanced multi-frame dataset's dimensions that
    separate stacks but are not KNOWN_DIMENSIONS (e.g. a b-value, an echo, a contrast phase)."""
    seq = ds.get("DimensionIndexSequence", None) or []
    return [i for i, item in enumerate(seq) if int(item.get("DimensionIndexPointer", 0) or 0) not in KNOWN_DIMENSIONS]


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
    """Give slices whose positions along the normal agree within DUPLICATE_TOL_MM one id."""
    order = np.argsort(d, kind="stable")
    ids = np.empty(len(d), dtype=int)
    cur, last = -1, None
    for idx in order:
        if last is None or d[idx] - last > DUPLICATE_TOL_MM:
            cur += 1
        ids[idx] = cur
        last = d[idx]
    return ids




def _slices_of(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand one file record into slice records (one per frame for enhanced multi-frame)."""
    base = {k: rec.get(k) for k in ("rows", "cols", "iop", "ipp", "echo", "temporal", "trigger", "acq",
                                    "bvalue", "dims", "image_type", "instance", "pixel_spacing")}
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


def split_phases(sl: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], str, list[str]]:
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


def mosaic_volumes(sl: list[dict[str, Any]]) -> tuple[list[list[dict[str, Any]]], str, list[str]]:
    """Siemens mosaics: each file is one whole volume (its tiles are the slices), so each file is a
    phase, ordered by AcquisitionNumber, TemporalPositionIdentifier, InstanceNumber, file name."""
    if len(sl) < 2:
        return [sl], "", []

    def order(s: dict[str, Any]) -> tuple:
        return tuple((0, float(v)) if isinstance(v, (int, float)) else (1, repr(v))
                     for v in (s.get("acq"), s.get("temporal"), s.get("instance"))) + (s["file"],)

    return [[s] for s in sorted(sl, key=order)], "mosaic volume", []


def _sort_key(s: dict[str, Any], combo: list[tuple[str, str]]) -> tuple:
    vals = []
    for k, _ in combo:
        v = s.get(k)
        vals.append((0, float(v)) if isinstance(v, (int, float)) else (1, repr(v)))
    return tuple(vals)


def _is_localizer_type(image_type: tuple[str, ...] | None) -> bool:
    return any(str(t).upper() == "LOCALIZER" for t in image_type or ())


def split_series(files: list[dict[str, Any]], policy: GeometryPolicy = DEFAULT_POLICY
                 ) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
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
            s["mosaic"] = is_mosaic(rec.get("image_type"))
            slices.append(s)
    return split_slices(slices, policy)


def split_slices(slices: list[dict[str, Any]], policy: GeometryPolicy = DEFAULT_POLICY
                 ) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Split slice records (``rows, cols, iop, ipp, file, mf, loc, stack_key`` and the PHASE_KEYS
    fields) into stacks: orientation, matrix, localizer, multi-frame file and StackID, then
    phases at the same positions (:func:`split_phases`). Used for the slices of a series (scan)
    and for the frames of one enhanced multi-frame file (the loader).

    Returns:
        list of (slices, info) as :func:`split_series`.
    """
    orient_ids = _cluster([tuple(s["iop"]) if s["iop"] is not None else None for s in slices],
                          policy.orientation_tolerance)
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
        phases, phase_key, probs = mosaic_volumes(sl) if all(s.get("mosaic") for s in sl) else split_phases(sl)
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
