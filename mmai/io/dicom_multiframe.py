"""Enhanced (and legacy) multi-frame CT/MR files: per-frame geometry and stack/phase splitting.

Geometry comes from the functional groups: for each frame the Per-Frame group is read first,
then the Shared group: PlanePositionSequence (ImagePositionPatient), PlaneOrientationSequence
(ImageOrientationPatient), PixelMeasuresSequence (PixelSpacing, SliceThickness),
PixelValueTransformationSequence (RescaleSlope/Intercept). Frames are split into stacks by the
scan's splitter (:mod:`mmai.io.dicom_stacks`: orientation, StackID, then phases at the same
positions by TemporalPositionIndex, EffectiveEchoTime, b-value, trigger delay, other dimension
indices); each stack becomes one volume (:func:`mmai.io.dicom_series.load_multiframe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mmai.errors import DicomError
from mmai.io.dicom_frames import Frame, float_or, frames_from_dataset
from mmai.io.dicom_geometry import DEFAULT_POLICY, GeometryPolicy
from mmai.io.dicom_stacks import other_dimensions, split_slices


@dataclass
class FrameStack:
    """Frames of one stack/phase inside a multi-frame file; ``label`` names its key."""

    key: tuple[Any, ...]
    label: str
    frames: list[Frame]


def _macro(per: Any, shared: Any, seq: str) -> Any:
    """First item of functional-group macro ``seq``, from the per-frame group, else the shared one."""
    for group in (per, shared):
        if group is not None and seq in group and len(group[seq].value):
            return group[seq].value[0]
    return None


def _floats(item: Any, keyword: str) -> list[float] | None:
    if item is None or keyword not in item or item[keyword].value in (None, ""):
        return None
    value = item[keyword].value
    return [float(v) for v in value] if hasattr(value, "__len__") and not isinstance(value, str) else [float(value)]


def frames_from_multiframe(ds: Any, source: str) -> list[Frame]:
    """One Frame per frame of a multi-frame dataset; ``Frame.source`` is ``file#frame`` (1-based)."""
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, TypeError):
        frames_from_dataset(ds, source)  # raises the DicomError that names the transfer syntax
        raise
    pixels = pixels.reshape((n,) + pixels.shape[-2:]) if pixels.ndim in (2, 3) else pixels
    if pixels.ndim != 3:
        raise DicomError(f"{source}: multi-frame pixel array has shape {pixels.shape}; expected (frames, rows, cols)")
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_seq = ds.PerFrameFunctionalGroupsSequence if "PerFrameFunctionalGroupsSequence" in ds else None
    ts = str(ds.file_meta.TransferSyntaxUID) if hasattr(ds, "file_meta") else ""
    base: dict[str, Any] = dict(
        rows=int(ds.Rows), cols=int(ds.Columns),
        photometric=str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")),
        bits_stored=int(getattr(ds, "BitsStored", 16)),
        image_type=tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or ())),
        modality=str(getattr(ds, "Modality", "")),
        series_description=str(getattr(ds, "SeriesDescription", "")), transfer_syntax=ts,
    )
    top_slope = float_or(getattr(ds, "RescaleSlope", None), 1.0)
    top_intercept = float_or(getattr(ds, "RescaleIntercept", None), 0.0)
    frames: list[Frame] = []
    if per_seq is None and shared is None:  # legacy multi-frame: one position, frames along the normal
        ipp, iop, ps = (getattr(ds, k, None) for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))
        step = float_or(getattr(ds, "SpacingBetweenSlices", None), 0.0) or float_or(getattr(ds, "SliceThickness", None), 0.0)
        if not (ipp and iop and ps and step):
            raise DicomError(f"{source}: multi-frame file without functional groups lacks ImagePositionPatient, "
                             f"ImageOrientationPatient, PixelSpacing or SpacingBetweenSlices; cannot place its frames")
        iop_a = np.array([float(v) for v in iop])
        normal = np.cross(iop_a[:3], iop_a[3:])
        for f in range(n):
            fr = Frame(source=f"{source}#{f + 1}", ipp=np.array([float(v) for v in ipp]) + f * step * normal,
                       iop=iop_a, pixel_spacing=(float(ps[0]), float(ps[1])), slope=top_slope,
                       intercept=top_intercept, stored=pixels[f], slice_thickness=step, frame_index=f, **base)
            frames.append(fr)
        return frames
    if per_seq is not None and len(per_seq) != n:
        raise DicomError(f"{source}: PerFrameFunctionalGroupsSequence has {len(per_seq)} items for {n} frames")
    other_dims = other_dimensions(ds)
    for f in range(n):
        per = per_seq[f] if per_seq is not None else None
        pos = _floats(_macro(per, shared, "PlanePositionSequence"), "ImagePositionPatient")
        ori = _floats(_macro(per, shared, "PlaneOrientationSequence"), "ImageOrientationPatient")
        meas = _macro(per, shared, "PixelMeasuresSequence")
        ps = _floats(meas, "PixelSpacing")
        thick = _floats(meas, "SliceThickness")
        pvt = _macro(per, shared, "PixelValueTransformationSequence")
        slope = _floats(pvt, "RescaleSlope")
        intercept = _floats(pvt, "RescaleIntercept")
        content = _macro(per, None, "FrameContentSequence")
        echo = _floats(_macro(per, shared, "MREchoSequence"), "EffectiveEchoTime")
        bvalue = _floats(_macro(per, shared, "MRDiffusionSequence"), "DiffusionBValue")
        trigger = _floats(_macro(per, shared, "CardiacSynchronizationSequence"), "NominalCardiacTriggerDelayTime")
        stack_id = str(content.get("StackID", "")) if content is not None else ""
        temporal = content.get("TemporalPositionIndex", None) if content is not None else None
        fr = Frame(
            source=f"{source}#{f + 1}",
            ipp=np.array(pos) if pos and len(pos) == 3 else None,
            iop=np.array(ori) if ori and len(ori) == 6 else None,
            pixel_spacing=(ps[0], ps[1]) if ps and len(ps) == 2 else None,
            slope=slope[0] if slope else top_slope, intercept=intercept[0] if intercept else top_intercept,
            stored=pixels[f], slice_thickness=thick[0] if thick else None, frame_index=f, **base,
        )
        iop_key = tuple(np.round(fr.iop, 3)) if fr.iop is not None else ()
        div = content.get("DimensionIndexValues", None) if content is not None else None
        div = [div] if isinstance(div, int) else list(div or [])
        other = tuple(int(div[i]) for i in other_dims if i < len(div))
        fr.stack_key = (stack_id, int(temporal) if temporal is not None else 0, echo[0] if echo else 0.0,
                        other, iop_key, bvalue[0] if bvalue else None, trigger[0] if trigger else None)
        frames.append(fr)
    return frames


def _record(f: Frame, index: int) -> dict[str, Any]:
    """A frame as a slice record of :func:`mmai.io.dicom_stacks.split_slices` (as the scan builds it)."""
    stack_id, temporal, echo, other, _, bvalue, trigger = f.stack_key or ("", 0, 0.0, (), (), None, None)
    return {"file": "frames", "frame": index, "index": index, "rows": f.rows, "cols": f.cols,
            "iop": tuple(f.iop) if f.iop is not None else None, "ipp": tuple(f.ipp) if f.ipp is not None else None,
            "pixel_spacing": f.pixel_spacing, "stack_key": stack_id or None, "temporal": temporal or None,
            "echo": echo or None, "dims": other or None, "bvalue": bvalue, "trigger": trigger, "acq": None,
            "image_type": None, "instance": f.frame_index, "mf": True, "loc": False}


def _label(key: tuple[Any, ...], all_keys: list[tuple[Any, ...]]) -> str:
    if not key:
        return "all frames"
    stack_id, temporal, echo, other = key[:4]
    parts = [f"stack {stack_id}" if stack_id else "", f"temporal {temporal}" if temporal else "",
             f"echo {echo:g} ms" if echo else "",
             f"dimension index {list(other)}" if other and len({k[3] for k in all_keys if k}) > 1 else ""]
    return ", ".join(p for p in parts if p) or "all frames"


def split_frames(frames: list[Frame], policy: GeometryPolicy = DEFAULT_POLICY) -> list[FrameStack]:
    """Split the frames of one multi-frame file into stacks with the scan's splitter
    (:func:`mmai.io.dicom_stacks.split_slices`: orientation, StackID, then phases at the same
    positions by TemporalPositionIndex, echo time, b-value, trigger delay, the other dimension
    indices), ordered by their functional-group keys; ``label`` names each stack."""
    parts = split_slices([_record(f, i) for i, f in enumerate(frames)], policy)
    stacks = [FrameStack(key=frames[sl[0]["index"]].stack_key, label="", frames=[frames[s["index"]] for s in sl])
              for sl, _ in parts]
    stacks.sort(key=lambda st: repr(st.key[:4]) if st.key else "")
    for st in stacks:
        st.label = _label(st.key, [x.key for x in stacks])
    if len(stacks) > 1 and len({s.label for s in stacks}) < len(stacks):  # keys alike: number them
        for i, st in enumerate(stacks):
            st.label = f"{st.label} (part {i + 1})"
    return stacks
