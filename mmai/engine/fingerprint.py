"""The dataset fingerprint that the self-configuring defaults read (nnU-Net's lesson).

:func:`fingerprint` summarises the TRAINING rows of a validated manifest: number of cases and
patients, class balance (classification) or events (survival), volume size and spacing (read
from the NIfTI headers of up to ``max_images`` training images, or the box of volumes made by
``mmai preprocess``), and lesion sizes (bounding-box extent in mm of the ``image.roi.mask``
masks). Reading is cheap: headers for the volumes, one array per mask. Nothing here is fitted
on validation or test rows. :mod:`mmai.engine.autoconfig` turns it into settings.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from mmai.config import PipelineConfig
from mmai.data.provenance import is_nifti, provenance_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What the self-configuring defaults know about a training split.

    Attributes:
        kind: task kind.
        n_train: training cases (the split the model is fitted on).
        n_patients: distinct patients among them.
        class_counts: cases per class (binary / multiclass), else None.
        n_events: events among the training cases (survival), else None.
        image: ``{"n_read", "shape_median" (I, J, K), "spacing_median_mm", "preprocessed",
            "preprocessed_shape", "preprocessed_spacing_mm"}`` from the image headers, or None.
        lesion: ``{"n_masks", "extent_mm_median", "extent_mm_p95", "volume_ml_median"}`` where
            ``extent`` is the longest bounding-box side of the mask in mm; None without masks.
    """

    kind: str
    n_train: int
    n_patients: int
    class_counts: dict[str, int] | None = None
    n_events: int | None = None
    image: dict[str, Any] | None = None
    lesion: dict[str, Any] | None = None

    @property
    def n_minority(self) -> int:
        """Cases of the rarest class (classification) or events (survival); n_train otherwise."""
        if self.class_counts:
            return min(self.class_counts.values())
        if self.n_events is not None:
            return self.n_events
        return self.n_train

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fingerprint(config: PipelineConfig, train: pd.DataFrame, *, base_dir: Path | None = None,
                max_images: int = 64, max_masks: int = 400) -> Fingerprint:
    """Fingerprint of the training rows ``train`` of a validated manifest.

    Args:
        config: the pipeline (task columns, image column, ``image.roi.mask``).
        train: the training rows (image column holds absolute paths or None).
        base_dir: folder relative mask paths resolve against (the manifest's), or None.
        max_images: image headers read at most (evenly spread over the rows).
        max_masks: masks read at most.
    """
    t = config.task
    counts = events = None
    if t.kind in ("binary", "multiclass") and t.target in train:
        vc = train[t.target].astype(str).value_counts()
        counts = {str(k): int(v) for k, v in sorted(vc.items())}
    elif t.kind == "survival" and t.event in train:
        events = int(pd.to_numeric(train[t.event], errors="coerce").fillna(0).astype(bool).sum())
    n_patients = int(train["patient_id"].nunique()) if "patient_id" in train else len(train)
    image = lesion = None
    if config.image is not None and config.image.column in train:
        image = _image_summary(list(train[config.image.column]), max_images)
        roi = config.image.roi
        if roi is not None and roi.mask is not None and roi.mask in train:
            lesion = _lesion_summary(list(train[roi.mask]), base_dir, max_masks)
    return Fingerprint(kind=t.kind, n_train=len(train), n_patients=n_patients, class_counts=counts,
                       n_events=events, image=image, lesion=lesion)


def _spread(paths: list[Any], k: int) -> list[str]:
    present = [str(p) for p in paths if isinstance(p, str) and p.strip()]
    if len(present) <= k:
        return present
    return [present[i] for i in np.linspace(0, len(present) - 1, k).round().astype(int)]


def _image_summary(paths: list[Any], k: int) -> dict[str, Any] | None:
    """Median shape and spacing from NIfTI headers (DICOM folders are not opened here)."""
    shapes, spacings, pre_shapes, pre_spacings = [], [], [], []
    for p in _spread(paths, k):
        if not is_nifti(p):
            continue
        try:
            img: Any = nib.load(p)
        except (OSError, ValueError) as exc:
            log.debug("fingerprint: cannot read %s: %s", p, exc)
            continue
        shape = tuple(int(n) for n in img.shape[:3])
        zooms = _voxel_sizes(np.asarray(img.affine))
        if provenance_of(img) is not None:
            pre_shapes.append(shape)
            pre_spacings.append(zooms)
        else:
            shapes.append(shape)
            spacings.append(zooms)
    if not shapes and not pre_shapes:
        return None
    out: dict[str, Any] = {"n_read": len(shapes) + len(pre_shapes), "preprocessed": bool(pre_shapes)}
    if shapes:
        out["shape_median"] = [int(v) for v in np.median(np.array(shapes), axis=0)]
        out["spacing_median_mm"] = [round(float(v), 4) for v in np.median(np.array(spacings), axis=0)]
    if pre_shapes:
        out["preprocessed_shape"] = [int(v) for v in np.median(np.array(pre_shapes), axis=0)]
        out["preprocessed_spacing_mm"] = [round(float(v), 4) for v in np.median(np.array(pre_spacings), axis=0)]
    return out


def _voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine)."""
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


def _lesion_summary(paths: list[Any], base_dir: Path | None, k: int) -> dict[str, Any] | None:
    """Longest bounding-box side (mm) and volume (mL) of each readable, non-empty mask."""
    extents, volumes = [], []
    for p in _spread(paths, k):
        path = Path(p)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        try:
            img: Any = nib.load(str(path))
            mask = np.asanyarray(img.dataobj) > 0
        except (OSError, ValueError) as exc:
            log.debug("fingerprint: cannot read mask %s: %s", path, exc)
            continue
        if mask.ndim > 3:
            mask = mask.reshape(mask.shape[:3] + (-1,)).any(-1)
        if not mask.any():
            continue
        zooms = np.array(_voxel_sizes(np.asarray(img.affine)), dtype=float)
        idx = np.nonzero(mask)
        sides = np.array([(int(i.max()) - int(i.min()) + 1) for i in idx]) * zooms
        extents.append(float(sides.max()))
        volumes.append(float(mask.sum() * np.prod(zooms)) / 1000.0)
    if not extents:
        return None
    return {"n_masks": len(extents), "extent_mm_median": round(float(np.median(extents)), 2),
            "extent_mm_p95": round(float(np.percentile(extents, 95)), 2),
            "volume_ml_median": round(float(np.median(volumes)), 4)}
