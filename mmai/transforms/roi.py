"""Lesion boxes: cut a box of ``size_mm`` around a lesion at the pipeline's spacing.

The box is axis-aligned in RAS patient space, centred on the lesion mask's centre of mass (or on
a given point), ``round(size_mm / spacing)`` voxels per axis. The image is resampled onto it with
MONAI's ``SpatialResample`` (bilinear; after anti-aliasing when the box is coarser than the scan)
and the mask with nearest neighbour; outside the scan the box holds the scan's minimum (air), so
the padding never looks like tissue. The dictionary wrapper appends the mask as the last channel
after intensity normalisation (:class:`AppendMaskd`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, SpatialResample

from mmai.errors import PreprocessError

MASK_KEY = "roi_mask"
CENTER_KEY = "roi_center"


def roi_shape(size_mm: Sequence[float], spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxels per axis of a box of ``size_mm`` at ``spacing`` (at least 1)."""
    return tuple(max(1, int(round(s / p))) for s, p in zip(size_mm, spacing, strict=True))  # type: ignore[return-value]


def roi_affine(center_ras: Sequence[float], shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """(4, 4) RAS affine of a box of ``shape`` voxels at ``spacing`` whose centre is ``center_ras`` (mm)."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = np.asarray(center_ras, float) - (np.asarray(shape, float) - 1) / 2 * np.asarray(spacing, float)
    return aff


def mask_center_ras(mask: np.ndarray, affine: np.ndarray, *, name: str = "mask") -> np.ndarray:
    """(3,) centre of mass (RAS mm) of the voxels > 0.5 of a 3D mask with a voxel -> RAS affine."""
    idx = np.argwhere(np.asarray(mask) > 0.5)
    if idx.size == 0:
        raise PreprocessError(f"{name}: the lesion mask is empty (no voxel > 0.5); allowed: a mask with the lesion")
    com = idx.mean(axis=0)
    return (np.asarray(affine, float) @ np.append(com, 1.0))[:3]


def lps_to_ras(point: Sequence[float]) -> np.ndarray:
    """DICOM LPS millimetres -> NIfTI RAS millimetres."""
    p = np.asarray(point, float)
    return np.array([-p[0], -p[1], p[2]])


def resample_to_box(x: MetaTensor, affine: np.ndarray, shape: Sequence[int], *, mode: str = "bilinear",
                    fill: float | None = None) -> MetaTensor:
    """Resample a (C, I, J, K) MetaTensor onto the box grid; outside the scan -> ``fill`` (default: its minimum)."""
    fill = float(x.min()) if fill is None else fill
    shifted = x - fill  # SpatialResample pads with 0: shift so that 0 means "fill"
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        shifted, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=tuple(int(s) for s in shape))
    return MetaTensor(out + fill, meta=dict(out.meta))  # type: ignore[attr-defined]


def _load_mask(path: str) -> MetaTensor:
    img: Any = nib.load(path)
    if len(img.shape) != 3:
        raise PreprocessError(f"{path}: the lesion mask has shape {img.shape}; allowed: a 3D NIfTI volume")
    arr = np.asarray(img.dataobj, dtype=np.float32)
    return MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(img.affine, dtype=torch.float64),
                      meta={"filename_or_obj": path})


class RoiBoxd(MapTransform):
    """Cut the lesion box out of ``keys`` (one image key).

    Reads ``roi_mask`` (a NIfTI path: centre of mass + resampled mask) or ``roi_center`` (RAS mm)
    from the data dict; writes the box image to the key and the box mask to ``roi_mask``
    ((1, *box) float 0/1, or absent for a point ROI).
    """

    def __init__(self, keys: Any, *, size_mm: Sequence[float], spacing: Sequence[float]) -> None:
        super().__init__(keys)
        self.shape = roi_shape(size_mm, spacing)
        self.spacing = [float(s) for s in spacing]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        mask = None
        if d.get(MASK_KEY) is not None:
            mask = _load_mask(str(d[MASK_KEY]))
            center = mask_center_ras(mask[0].numpy(), mask.affine.numpy(), name=str(d[MASK_KEY]))
        elif d.get(CENTER_KEY) is not None:
            center = np.asarray(d[CENTER_KEY], dtype=float)
        else:
            raise PreprocessError("image.roi: this case has neither a lesion mask nor a centre; allowed: a mask "
                                  "NIfTI path in the mask column or three numbers in the centre columns")
        affine = roi_affine(center.tolist(), self.shape, self.spacing)
        for k in self.key_iterator(d):
            d[k] = resample_to_box(d[k], affine, self.shape)
        if mask is not None:
            d[MASK_KEY] = (resample_to_box(mask, affine, self.shape, mode="nearest", fill=0.0) > 0.5).float()
        else:
            d.pop(MASK_KEY, None)
        d.pop(CENTER_KEY, None)
        return d


class AppendMaskd(MapTransform):
    """Append ``roi_mask`` (when present) to the image as its last channel, scaled to [lo, hi]."""

    def __init__(self, keys: Any, lo: float = 0.0, hi: float = 1.0) -> None:
        super().__init__(keys)
        self.lo, self.hi = lo, hi

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        m = d.pop(MASK_KEY, None)
        if m is None:
            return d
        for k in self.key_iterator(d):
            x = d[k]
            extra = torch.as_tensor(m, dtype=x.dtype) * (self.hi - self.lo) + self.lo
            d[k] = MetaTensor(torch.cat([torch.as_tensor(x), extra], 0), meta=dict(x.meta))
        return d


def roi_sources(cfg: Any, df: Any, base_dir: Any = None) -> list[dict[str, Any] | None]:
    """Per-row ROI inputs of a manifest frame for an ``image.roi`` pipeline (all None without one).

    ``mask``: ``{"roi_mask": absolute path}`` (relative paths resolve against ``base_dir``, the
    manifest's folder); ``center``: ``{"roi_center": RAS mm}`` (LPS converted). A missing cell
    gives a per-case error at preprocessing (no silent whole-image fallback).
    """
    from pathlib import Path

    import pandas as pd

    roi = getattr(cfg, "roi", None)
    if roi is None:
        return [None] * len(df)
    cols = [roi.mask] if roi.mask is not None else list(roi.center)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        from mmai.errors import ManifestError

        raise ManifestError(f"image.roi: column(s) {missing} are not in the manifest; its columns are {list(df.columns)}")
    out: list[dict[str, Any] | None] = []
    for _, row in df.iterrows():
        values = [row[c] for c in cols]
        if any(v is None or (isinstance(v, float) and pd.isna(v)) or str(v).strip() == "" for v in values):
            out.append({})  # RoiBoxd raises the per-case error
        elif roi.mask is not None:
            p = Path(str(values[0]))
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            out.append({MASK_KEY: str(p.resolve())})
        else:
            try:
                point = [float(v) for v in values]
            except (TypeError, ValueError):
                out.append({})
                continue
            out.append({CENTER_KEY: (lps_to_ras(point) if roi.space == "LPS" else np.asarray(point)).tolist()})
    return out
