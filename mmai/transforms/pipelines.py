"""The only place where MONAI ``Compose`` chains are assembled (from the pipeline config).

Two chains:

- :func:`preprocess_transforms`: raw DICOM folder / NIfTI -> model-ready volume. Load (mmai's
  DICOM reader, nibabel for NIfTI), channel first, reorient, resample to the target spacing,
  normalise intensities, optionally crop to the body, pad/crop to the model size. Runs on CPU
  or, with ``device="cuda"``, on the GPU from the resampling step on.
- :func:`augment_transforms`: training-time random augmentation of a preprocessed volume.

Preprocessed NIfTI files carry ``mmai:<pipeline id>`` in their header description, so
inference can tell a preprocessed input (use as is) from a raw one (run the chain).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    BorderPadd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandShiftIntensityd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from mmai.config import ImageConfig, _to_plain

KEY = "image"
PREPROCESSED_TAG = "mmai:"


def image_pipeline_id(cfg: ImageConfig) -> str:
    """Short hash of everything that changes a preprocessed volume (not augmentation)."""
    fields = {k: v for k, v in _to_plain(cfg).items() if k not in ("augment", "column", "select")}
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def background_value(cfg: ImageConfig) -> float:
    """The value of empty space after normalisation (used for padding)."""
    return float(cfg.intensity.b_min) if cfg.intensity.kind == "window" else 0.0


def _foreground(cfg: ImageConfig):  # noqa: ANN202 - a picklable callable
    return _AboveThreshold(background_value(cfg) + 1e-3)


class _AboveThreshold:
    """Picklable ``select_fn`` for CropForegroundd."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: Any) -> Any:
        return x > self.threshold


def preprocess_transforms(cfg: ImageConfig, *, device: str = "cpu", load: bool = True) -> Compose:
    """Raw image -> model-ready ``(1, *cfg.size)`` float32 MetaTensor with its RAS affine.

    Args:
        cfg: the pipeline's ``image`` section.
        device: ``cpu`` or ``cuda[:N]``; with CUDA the volume moves to the GPU after loading.
        load: include the loading step (False when the caller provides a MetaTensor).
    """
    from mmai.io.reader import mmai_load_imaged

    chain: list[Any] = []
    if load:
        # mmai's reader only (NIfTI files, DICOM folders, DICOM file lists): MONAI's LoadImage
        # would otherwise retry a refused folder with readers that stack every series in it
        with warnings.catch_warnings():  # MONAI registers its optional readers and warns about absent codecs
            warnings.simplefilter("ignore", UserWarning)
            loader = mmai_load_imaged(KEY, select=cfg.select, load_dtype=np.float32, image_only=True)
        chain += [loader, EnsureChannelFirstd(KEY)]
    chain.append(EnsureTyped(KEY, data_type="tensor", dtype=torch.float32, device=torch.device(device),
                             track_meta=True))
    # labels spelled out: MONAI warns (once per process, so once per preprocessing worker) that
    # its default is changing; these are the anatomical RAS/LPS labels mmai means
    chain.append(Orientationd(KEY, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if cfg.spacing is not None:
        chain.append(Spacingd(KEY, pixdim=cfg.spacing, mode="bilinear", padding_mode="border"))
    it = cfg.intensity
    if it.kind == "window":
        chain.append(ScaleIntensityRanged(KEY, a_min=it.a_min, a_max=it.a_max, b_min=it.b_min, b_max=it.b_max,
                                          clip=True))
    elif it.kind == "zscore":
        chain.append(NormalizeIntensityd(KEY, nonzero=True, channel_wise=True))
    if cfg.crop_foreground:
        chain.append(CropForegroundd(KEY, source_key=KEY, select_fn=_foreground(cfg), margin=2))
    chain.append(ResizeWithPadOrCropd(KEY, spatial_size=cfg.size, mode="constant", value=background_value(cfg)))
    return Compose(chain)


def apply_chain(chain: Compose, data: dict[str, Any]) -> dict[str, Any]:
    """Run a chain; MONAI wraps a failing transform's error in "applying transform ..." RuntimeErrors,
    so re-raise the original error (an MmaiError keeps its message naming the file and the problem)."""
    try:
        return chain(data)
    except RuntimeError as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is exc:
            raise
        raise cause from exc


def augment_transforms(cfg: ImageConfig, *, seed: int = 0) -> Compose | None:
    """Random augmentation for training (None when the config asks for none)."""
    a = cfg.augment
    chain: list[Any] = []
    if a.translate > 0:  # pad by t voxels, crop back to the original size at a random offset
        chain += [BorderPadd(KEY, spatial_border=a.translate, mode="constant", value=background_value(cfg)),
                  RandSpatialCropd(KEY, roi_size=cfg.size, random_size=False)]
    if a.flip:
        chain += [RandFlipd(KEY, prob=0.5, spatial_axis=axis) for axis in (0, 1, 2)]
    if a.rotate90:
        chain.append(RandRotate90d(KEY, prob=0.5, spatial_axes=(0, 1)))
    if a.intensity_shift > 0:
        chain.append(RandShiftIntensityd(KEY, offsets=a.intensity_shift, prob=0.5))
    if a.noise_std > 0:
        chain.append(RandGaussianNoised(KEY, prob=0.5, std=a.noise_std))
    if not chain:
        return None
    comp = Compose(chain)
    comp.set_random_state(seed=seed)
    return comp
