"""`mmai convert`: every image stack of a DICOM tree -> NIfTI + JSON sidecar (like dcm2niix).

One ``.nii.gz`` per stack (affine = the loader's voxel -> RAS affine), a multi-phase series as
one 4D file (or one file per phase with ``split_phases``), and a JSON sidecar with geometry
(what the loader did: ``geometry`` regular | resampled | irregular, the policy, the original
slice steps, every slice position when not uniform), warnings, the scan's problems and the
non-identifying acquisition parameters
(:func:`mmai.io.deid.safe_meta`). Output names carry no PHI:
``s<SeriesNumber>_<sanitized description>_<hash of the study/series/stack UIDs>``.
Localizers and non-image objects are skipped (counted in the report); a stack that cannot be
converted gets a row in ``OUT/errors.csv`` (series, stage, error) and the others still convert.
Every file is written atomically (temp file + os.replace).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import sys
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmai.config import load_config
from mmai.io.deid import DEFAULT_SALT, pseudonym, safe_meta
from mmai.io.dicom_frames import Frame
from mmai.io.dicom_geometry import GeometryPolicy, policy_from
from mmai.io.dicom_scan import SeriesStack, scan
from mmai.io.dicom_scan_read import quiet_pydicom
from mmai.io.dicom_select import SelectionRule
from mmai.io.dicom_series import DicomVolume, assemble, load_series, read_frames
from mmai.io.input_flags import META_KEY, merge_flags
from mmai.utils import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ERROR_COLUMNS = ["series", "stage", "error", "stack_id", "n_files"]


@dataclass
class ConvertReport:
    """What one conversion did. ``str()`` is a one-line summary (logged by the CLI)."""

    out_dir: Path
    n_stacks: int = 0
    written: list[str] = field(default_factory=list)      # NIfTI file names
    n_4d: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    errors: list[dict[str, Any]] = field(default_factory=list)
    n_non_dicom: int = 0
    n_dicomdir: int = 0
    stack_status: dict[str, str] = field(default_factory=dict)  # stack_id -> written | skipped: why | error

    @property
    def all_failed(self) -> bool:
        """Nothing was written although stacks failed, or files were found and none was DICOM:
        exit status 1."""
        return not self.written and (bool(self.errors) or (self.n_stacks == 0 and self.n_non_dicom > 0))

    def as_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "n_stacks": self.n_stacks, "n_written": len(self.written),
                "n_4d": self.n_4d, "skipped": dict(self.skipped), "n_errors": len(self.errors),
                "n_non_dicom": self.n_non_dicom, "n_dicomdir": self.n_dicomdir}

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return (f"convert -> {self.out_dir}: {self.n_stacks} stacks, {len(self.written)} NIfTI written "
                f"({self.n_4d} 4D), {len(self.errors)} failed (errors.csv), skipped: {skipped}; "
                f"{self.n_non_dicom} non-DICOM files, {self.n_dicomdir} DICOMDIR ignored")


def read_pipeline_image(config_path: Path | None) -> tuple[SelectionRule | None, GeometryPolicy | None]:
    """The ``image.select`` rule and the ``image.dicom`` geometry policy of a pipeline YAML
    (None, None without a path; the rule is None when the YAML has none).

    Raises:
        ConfigError: missing file, invalid YAML, or an invalid section (names the file and key).
    """
    if config_path is None:
        return None, None
    cfg = load_config(config_path)
    if cfg.image is None:
        return None, None
    rule = (SelectionRule.from_dict(cfg.image.select, f"{config_path}: image.select")
            if cfg.image.select is not None else None)
    return rule, policy_from(cfg.image.dicom)


def output_stem(row: dict[str, Any], *, phase: int | None = None, stack: SeriesStack | None = None) -> str:
    """PHI-free file stem: ``s<series>_<description>_<8 hex of UIDs + stack>[_p<phase>]``.

    The hash covers the study/series UIDs, the stack's geometry and (with ``stack``) its first
    file and frame, so two stacks never share a name; it is stable across runs.
    """
    desc = re.sub(r"[^A-Za-z0-9.+-]+", "_", str(row.get("series_description") or "")).strip("_.")[:40]
    sn = row.get("series_number")
    key = "|".join(str(row.get(k) or "") for k in ("study_uid", "series_uid", "orientation", "rows", "cols",
                                                     "is_localizer", "path"))
    if stack is not None and stack.files:
        key += f"|{stack.files[0]}|{stack.frames[0] if stack.frames else ''}"
    if phase is None:  # 4D file: one name for all phases
        key += "|4d"
    else:
        key += f"|{row.get('phase_index')}"
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:8]
    sn_txt = f"s{int(sn):03d}" if isinstance(sn, (int, float)) and sn == sn else "sNA"
    stem = "_".join(p for p in (sn_txt, desc, digest) if p)
    return stem + (f"_p{phase}" if phase else "")


def _scrub(text: str, stacks: list[SeriesStack]) -> str:
    """Replace the stack's folders in a message by nothing (file names stay, folders may hold PHI)."""
    for s in stacks:
        for f in s.files[:1] + s.files[-1:]:
            text = text.replace(str(f.parent) + "/", "").replace(str(f.parent), "<series folder>")
    return " ".join(text.replace(";", ",").split())


def _load(stack: SeriesStack, policy: GeometryPolicy) -> DicomVolume:
    """One stack -> DicomVolume (enhanced multi-frame via the scan's frame subset)."""
    if stack.frames is not None:
        frames: list[Frame] = read_frames(stack.files[0], fast=False)
        return assemble([frames[i] for i in stack.frames], dtype="native", policy=policy)
    return load_series([str(f) for f in stack.files], dtype="native", policy=policy)


def _header_meta(stack: SeriesStack) -> dict[str, Any]:
    import pydicom

    ds = pydicom.dcmread(str(stack.files[0]), stop_before_pixels=True)
    meta = safe_meta(ds)
    meta.pop("ImagePositionPatient", None)  # per slice; the affine says it better
    meta.pop("PerFrameFunctionalGroupsSequence", None)
    return meta


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def convert_unit(stacks: list[SeriesStack], out_dir: Path, split_phases: bool, salt: str,
                 policy: GeometryPolicy | None = None) -> dict[str, Any]:
    """Convert one stack, or the phases of one series. Never raises: failures come back as errors.

    pydicom's value-validation warnings are silenced here (they can quote header values);
    real failures are reported in errors.csv.

    Returns:
        ``{"written": [names], "n_4d": int, "errors": [rows], "status": {stack_id: state}}``.
    """
    with quiet_pydicom(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
        return _convert_unit(stacks, out_dir, split_phases, salt, policy or GeometryPolicy())


def _convert_unit(stacks: list[SeriesStack], out_dir: Path, split_phases: bool, salt: str,
                  policy: GeometryPolicy) -> dict[str, Any]:
    res: dict[str, Any] = {"written": [], "n_4d": 0, "errors": [], "status": {}}
    stage = "load"
    loaded = []
    for s in stacks:
        stage = "load"
        try:
            vol = _load(s, policy)
            stage = "header"
            loaded.append((s, vol, _header_meta(s)))
        except Exception as exc:  # noqa: BLE001 - one bad series never stops the others
            res["errors"].append({"series": output_stem(s.row, phase=s.row.get("phase_index") or None, stack=s),
                                  "stage": stage, "error": _scrub(f"{type(exc).__name__}: {exc}", [s]),
                                  "stack_id": s.row.get("stack_id"), "n_files": len(s.files)})
            res["status"][s.row.get("stack_id")] = "error"
    if not loaded:
        return res
    four_d = (not split_phases and len(loaded) > 1 and len(loaded) == len(stacks)
              and all(v.array.shape == loaded[0][1].array.shape and np.allclose(v.affine, loaded[0][1].affine, atol=1e-4)
                      for _, v, _ in loaded))
    groups = [loaded] if four_d else [[x] for x in loaded]
    for grp in groups:
        s0, v0, meta0 = grp[0]
        phase = None if four_d else (s0.row.get("phase_index") or None)
        stem = output_stem(s0.row, phase=phase, stack=s0)
        stage = "write"
        try:
            array = np.stack([v.array for _, v, _ in grp], axis=-1) if four_d else v0.array
            if four_d and array.dtype != np.float32 and len({v.array.dtype for _, v, _ in grp}) > 1:
                array = array.astype(np.float32)
            _write_nifti(out_dir / f"{stem}.nii.gz", array, v0.affine)
            sidecar = _sidecar(grp, array.shape, salt, stacks)
            sidecar.update({k: v for k, v in meta0.items() if k not in sidecar})
            atomic_write_json(out_dir / f"{stem}.json", sidecar)
            res["written"].append(f"{stem}.nii.gz")
            res["n_4d"] += int(four_d)
            res["status"].update({s.row.get("stack_id"): "written" for s, _, _ in grp})
        except Exception as exc:  # noqa: BLE001 - a failed write is reported, the others go on
            res["errors"].append({"series": stem, "stage": stage,
                                  "error": _scrub(f"{type(exc).__name__}: {exc}", [s0]),
                                  "stack_id": s0.row.get("stack_id"), "n_files": len(s0.files)})
            res["status"].update({s.row.get("stack_id"): "error" for s, _, _ in grp})
    return res


def _sidecar(grp: list[tuple[SeriesStack, Any, dict[str, Any]]], shape: tuple[int, ...], salt: str,
             stacks: list[SeriesStack]) -> dict[str, Any]:
    s0, v0, _ = grp[0]
    r = s0.row
    warnings = [_scrub(w, stacks) for _, v, _ in grp for w in v.warnings]
    return {
        "PatientKey": r.get("patient_id") if str(r.get("patient_id", "")).startswith("p-")
        else pseudonym(str(r.get("patient_id") or ""), salt),
        "StudyInstanceUID": r.get("study_uid"), "SeriesInstanceUID": r.get("series_uid"),
        "Modality": r.get("modality"), "SeriesNumber": r.get("series_number"),
        "SeriesDescription": r.get("series_description"),
        "ImageType": [t for t in str(r.get("image_type") or "").split("\\") if t],
        "shape": list(shape), "affine_ras": np.asarray(v0.affine).round(6).tolist(),
        "voxel_spacing": [float(x) for x in np.linalg.norm(np.asarray(v0.affine)[:3, :3], axis=0).round(6)],
        "orientation": r.get("orientation"), "n_slices": r.get("n_instances"),
        "phases": [{"phase_index": s.row.get("phase_index"), "phase_key": s.row.get("phase_key")}
                   for s, _, _ in grp] if len(grp) > 1 else None,
        "phase_key": r.get("phase_key") or None, "phase_index": r.get("phase_index") or None,
        "problems": [p for p in str(r.get("problems") or "").split(";") if p],
        "warnings": warnings, "dtype": str(v0.array.dtype), "converter": "mmai convert",
        "input_flags": merge_flags(*(v.meta.get(META_KEY) or {} for _, v, _ in grp)),
        **_geometry_record(v0),
    }


def _geometry_record(vol: DicomVolume) -> dict[str, Any]:
    """What the loader did to the slice geometry: ``geometry`` (regular | resampled | irregular),
    ``resampled``, the policy, the original steps and, when not uniform, every slice position."""
    m = vol.meta
    out = {"geometry": m.get("geometry"), "resampled": bool(m.get("resampled")),
           "geometry_policy": m.get("policy"), "original_slices": m.get("slice_steps"),
           "geometry_problems": m.get("problems", [])}
    if "slice_positions_mm" in m:
        out["slice_positions_mm"] = m["slice_positions_mm"]
    return out


def _units(stacks: list[SeriesStack]) -> list[list[SeriesStack]]:
    """Group the phases of one series (same study, series, geometry, phase key) into one unit."""
    groups: dict[tuple, list[SeriesStack]] = defaultdict(list)
    for s in stacks:
        r = s.row
        key: tuple
        if (r.get("n_phases") or 1) > 1:
            key = (r["study_uid"], r["series_uid"], r["orientation"], r["rows"], r["cols"], r["phase_key"],
                   str(s.files[0]) if s.frames is not None else "")
        else:
            key = (r["stack_id"],)
        groups[key].append(s)
    return list(groups.values())


def convert_tree(root: Path, out: Path, *, config_path: Path | None = None, workers: int = 1,
                 split_phases: bool = False, progress: bool = False, include_phi: bool = False,
                 salt: str = DEFAULT_SALT, uneven: str | None = None, policy: Any = None) -> ConvertReport:
    """Convert every selected image stack under ``root`` into ``out``.

    Args:
        root: DICOM folder (walked recursively).
        out: output folder (created).
        config_path: pipeline YAML whose ``image.select`` narrows the stacks (matching stacks of
            every study are converted; no one-per-study rule here).
        workers: header readers for the scan, and conversion processes.
        split_phases: one file per phase/echo instead of one 4D file per multi-phase series.
        progress: tqdm bar on stderr.
        include_phi: keep the real PatientID in the scan rows (sidecars still use a pseudonym).
        salt: pseudonym salt (mmai.io.deid.pseudonym).
        uneven: "resample" | "error" | "keep" for stacks that are not uniformly spaced
            (`mmai convert --uneven`); overrides the policy's.
        policy: geometry policy (GeometryPolicy, DicomConfig or mapping); default: the
            pipeline YAML's ``image.dicom`` when ``config_path`` is given, else the defaults.

    Returns:
        ConvertReport (counts; ``str()`` is a one-line summary). ``out/errors.csv`` always exists.
    """
    from tqdm import tqdm

    rule, yaml_policy = read_pipeline_image(config_path)
    pol = policy_from(policy if policy is not None else yaml_policy, uneven=uneven)
    res = scan(root, workers=workers, progress=progress, include_phi=include_phi, salt=salt, policy=pol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ConvertReport(out_dir=out, n_stacks=len(res.stacks), n_non_dicom=res.n_non_dicom,
                           n_dicomdir=res.n_dicomdir)
    todo: list[SeriesStack] = []
    for s in res.stacks:
        kind, why = s.row["kind"], ""
        if kind == "unreadable":
            report.errors.append({"series": f"unreadable file {s.files[0].name}", "stage": "scan",
                                  "error": s.row["problems"].removeprefix("unreadable: "),
                                  "stack_id": s.row["stack_id"], "n_files": 1})
            report.stack_status[s.row["stack_id"]] = "error"
            continue
        if kind != "image":
            why = "not an image"
        elif rule is None and s.row["is_localizer"]:
            why = "localizer"
        elif rule is not None and not rule.matches(s.row):
            why = "not selected"
        if why:
            report.skipped[why] = report.skipped.get(why, 0) + 1
            report.stack_status[s.row["stack_id"]] = f"skipped: {why}"
        else:
            todo.append(s)
    units = _units(todo)
    bar = tqdm(total=len(units), unit="series", desc="convert", file=sys.stderr, disable=not progress)
    if workers > 1 and len(units) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            results = ex.map(convert_unit, units, [out] * len(units), [split_phases] * len(units),
                             [salt] * len(units), [pol] * len(units))
            for r in results:
                _merge(report, r)
                bar.update(1)
    else:
        for u in units:
            _merge(report, convert_unit(u, out, split_phases, salt, pol))
            bar.update(1)
    bar.close()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ERROR_COLUMNS)
    w.writeheader()
    w.writerows(report.errors)
    atomic_write_text(out / "errors.csv", buf.getvalue())
    if report.errors:
        log.warning("%d stack(s) could not be converted; reasons in %s", len(report.errors), out / "errors.csv")
    return report


def _merge(report: ConvertReport, r: dict[str, Any]) -> None:
    report.written.extend(r["written"])
    report.n_4d += r["n_4d"]
    report.errors.extend(r["errors"])
    report.stack_status.update(r["status"])


def report_json(report: ConvertReport) -> str:
    """The report as a JSON string."""
    return json.dumps(report.as_dict())
