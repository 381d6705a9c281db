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
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from mmai.config import ImageConfig
from mmai.config_typed import to_plain
from mmai.errors import ConfigError
from mmai.transforms.descriptors import LesionDescriptorsd
from mmai.transforms.guards import InputGuardd, ModalityGuardd
from mmai.transforms.intensity import PercentileNormalized, VolumePercentileNormalized, WindowChannelsd
from mmai.transforms.roi import AppendMaskd, RoiBoxd, roi_shape
from mmai.transforms.spatial import AntiAliasd, FitToGridd, ForegroundMaskd

KEY = "image"
FG = "fg"


# nonfinite / modality_check: an input either passes them unchanged or is refused (a filled
# volume carries the nonfinite_voxels flag), so they do not change what a pipeline makes;
# descriptors are measured beside the volume, never change it
_NOT_IN_ID = ("augment", "column", "select", "cache", "cache_dir", "modality", "nonfinite", "modality_check",
              "descriptors")


def image_pipeline_id(cfg: ImageConfig) -> str:
    """Short hash of everything that changes a preprocessed volume (not augmentation, caching,
    the input column or series selection; the modality is checked separately)."""
    fields = {k: _numbers_as_float(v) for k, v in to_plain(cfg).items() if k not in _NOT_IN_ID}
    blob = json.dumps(fields, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def _numbers_as_float(v: Any) -> Any:
    """-1000 and -1000.0 are the same setting (YAML vs Python): hash them alike."""
    if isinstance(v, dict):
        return {k: _numbers_as_float(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_numbers_as_float(x) for x in v]
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def image_channels(cfg: ImageConfig) -> int:
    """Input channels the model sees: one per intensity window (else one), + 1 for a ROI mask."""
    n = len(cfg.intensity.windows) if cfg.intensity.kind == "windows" else 1
    return n + (1 if cfg.roi is not None and cfg.roi.mask is not None else 0)


def output_shape(cfg: ImageConfig) -> tuple[int, int, int] | None:
    """The fixed spatial shape of every preprocessed volume (ROI box or ``size``), or None (variable)."""
    if cfg.roi is not None and cfg.spacing is not None:
        return roi_shape(cfg.roi.size_mm, cfg.spacing)
    return tuple(cfg.size) if cfg.size is not None else None  # type: ignore[return-value]


def placeholder_shape(cfg: ImageConfig) -> tuple[int, int, int, int]:
    """(C, D, H, W) of a stand-in volume for a missing image: the pipeline's channels and fixed
    shape, or ``size_multiple`` voxels per axis when volumes keep their own extent."""
    return (image_channels(cfg), *(output_shape(cfg) or (cfg.size_multiple,) * 3))  # type: ignore[return-value]


def background_value(cfg: ImageConfig) -> float:
    """The value of empty space after normalisation (used for padding)."""
    return float(cfg.intensity.b_min) if cfg.intensity.kind in ("window", "windows") else 0.0


class _AboveThreshold:
    """Picklable ``select_fn`` for CropForegroundd."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, x: Any) -> Any:
        return x > self.threshold


def _windows(cfg: ImageConfig) -> list[tuple[float, float]]:
    it = cfg.intensity
    return [(it.a_min, it.a_max)] if it.kind != "windows" else [tuple(w) for w in it.windows]  # type: ignore[misc]


def _intensity(cfg: ImageConfig, stats: dict[str, float] | None) -> list[Any]:
    it = cfg.intensity
    if it.kind == "window":
        return [ScaleIntensityRanged(KEY, a_min=it.a_min, a_max=it.a_max, b_min=it.b_min, b_max=it.b_max, clip=True)]
    if it.kind == "windows":
        return [WindowChannelsd(KEY, it.windows, b_min=it.b_min, b_max=it.b_max)]
    if it.kind == "zscore":
        return [NormalizeIntensityd(KEY, nonzero=True, channel_wise=True)]
    if it.kind == "percentile":
        return [PercentileNormalized(KEY, stats, fg_key=FG)]
    if it.kind == "volume_percentile":
        return [VolumePercentileNormalized(KEY, it.percentiles, fg_key=FG)]
    return []


def preprocess_transforms(cfg: ImageConfig, *, device: str = "cpu", load: bool = True,
                          stats: dict[str, float] | None = None, raw: bool = False, fast: bool = True) -> Compose:
    """Raw image -> model-ready ``(C, I, J, K)`` float32 MetaTensor with its RAS affine.

    Order: load, channel first, input guard (one 3D volume, enough voxels per axis, finite voxels;
    ``input_flags`` in the output dict), modality guard, reorient, anti-alias + resample to ``spacing`` (or
    cut the ``roi`` box; with a lesion mask, its descriptors in ``lesion_descriptors``), foreground mask,
    intensity (one channel per window), body crop, fit to
    the grid with the FOV guard (``fov_lost_fraction`` in the output dict), ROI mask channel.

    Args:
        cfg: the pipeline's ``image`` section.
        device: ``cpu`` or ``cuda[:N]``; with CUDA the volume moves to the GPU after loading.
        load: include the loading step (False when the caller provides a MetaTensor).
        stats: fitted intensity statistics (``intensity.kind: percentile`` only).
        raw: stop after the foreground mask (raw intensities + ``fg``), to fit statistics.
        fast: with ``spacing`` set and no ``roi``, load + reorient + anti-alias + resample in one
            separable pass over the body region (:mod:`mmai.transforms.fastchain`; same output to
            float32 rounding). False: the reference chain of MONAI transforms, step by step.
    """
    from mmai.io.reader import mmai_load_imaged

    chain: list[Any] = []
    loader = None
    if load:
        # mmai's reader only (NIfTI files, DICOM folders, DICOM file lists): MONAI's LoadImage
        # would otherwise retry a refused folder with readers that stack every series in it
        with warnings.catch_warnings():  # MONAI registers its optional readers and warns about absent codecs
            warnings.simplefilter("ignore", UserWarning)
            loader = mmai_load_imaged(KEY, select=cfg.select, dicom=cfg.dicom, load_dtype=np.float32, image_only=True)
    guards = [InputGuardd(KEY, nonfinite=cfg.nonfinite, target_spacing=cfg.spacing),
              ModalityGuardd(KEY, cfg.modality, cfg.modality_check)]
    fast = fast and cfg.spacing is not None and cfg.roi is None
    if fast:
        from mmai.transforms.fastchain import fast_spatial

        spatial = fast_spatial(cfg, loader if load else None, device=device, load=load, raw=raw)
        chain = spatial[:-1] + guards + [spatial[-1]]
    else:
        if load:
            chain += [loader, EnsureChannelFirstd(KEY)]
        chain += guards + _reference_spatial(cfg, device)
    it = cfg.intensity
    chain.append(ForegroundMaskd(KEY, cfg.foreground, it.kind, _windows(cfg), fg_key=FG))
    if raw:
        return Compose(chain)
    if fast and it.kind in ("window", "windows"):
        from mmai.transforms.fastchain import windows_last

        chain += windows_last(cfg)  # crop, fit, then each voxel windowed once (same output)
    elif cfg.roi is None:
        chain += _intensity(cfg, stats)
        if cfg.crop_foreground:
            chain.append(CropForegroundd([KEY, FG], source_key=FG, select_fn=_AboveThreshold(0.5), margin=2,
                                         allow_smaller=True))
        chain.append(FitToGridd([KEY, FG], size=cfg.size, size_multiple=cfg.size_multiple, mode=cfg.fov.mode,
                                tolerance=cfg.fov.tolerance, background=background_value(cfg), fg_key=FG))
    else:
        chain += _intensity(cfg, stats)
        chain.append(AppendMaskd(KEY))
    chain.append(DeleteItemsd(FG))
    return Compose(chain)


def _reference_spatial(cfg: ImageConfig, device: str) -> list[Any]:
    """Reorient, anti-alias, resample (or cut the ROI box, then measure the lesion descriptors):
    MONAI transforms, step by step."""
    chain: list[Any] = [EnsureTyped(KEY, data_type="tensor", dtype=torch.float32, device=torch.device(device),
                                    track_meta=True),
                        # labels spelled out: MONAI warns (once per process, so once per preprocessing
                        # worker) that its default is changing; these are the anatomical RAS/LPS labels
                        Orientationd(KEY, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if cfg.spacing is not None and cfg.antialias:
        chain.append(AntiAliasd(KEY, cfg.spacing))
    if cfg.roi is not None and cfg.spacing is not None:
        chain.append(RoiBoxd(KEY, size_mm=cfg.roi.size_mm, spacing=cfg.spacing))
        if cfg.roi.mask is not None:  # in the scanner's units: before any intensity step
            chain.append(LesionDescriptorsd(KEY, spacing=cfg.spacing))
    elif cfg.spacing is not None:
        chain.append(Spacingd(KEY, pixdim=cfg.spacing, mode="bilinear", padding_mode="border"))
    return chain


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
        shape = output_shape(cfg)
        if shape is None:
            raise ConfigError("image.augment.translate needs a fixed grid (image.size or image.roi); "
                              "with image.size: null the volumes differ in size")
        chain += [BorderPadd(KEY, spatial_border=a.translate, mode="constant", value=background_value(cfg)),
                  RandSpatialCropd(KEY, roi_size=shape, random_size=False)]
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
