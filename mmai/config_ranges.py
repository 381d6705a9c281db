"""Range checks of every numeric pipeline value, run when a config is loaded
(:func:`mmai.config.config_from_dict`): a value outside its working range is a one-line
:class:`~mmai.errors.ConfigError` naming the key path, the value and what is allowed, instead of
a crash or a silent misbehaviour later (``model.heads: 0``, ``encoder: vit``, ``dropout: 5.0``,
``ema: -1``, ``warmup: 2.0``, ``infer.batch_size: 0``, ``widths: [8]``, ...); and the cross-field
checks (:func:`check_values`: sizes, intensity windows, ROI, cache; :func:`check_pretrain`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mmai.errors import ConfigError

if TYPE_CHECKING:
    from mmai.config import ImageConfig, InferConfig, ModelConfig, PretrainConfig, TaskConfig, TrainConfig


def check_ranges(task: TaskConfig, image: ImageConfig | None, model: ModelConfig, train: TrainConfig,
                 infer: InferConfig, source: str) -> None:
    """Every numeric value in its working range, the message naming the key path and the range."""
    from mmai.models.fusion_names import ENCODER_NAMES

    def need(key: str, value: Any, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; {allowed}")

    whole = "a whole number >= 1"
    need("model.encoder", model.encoder, model.encoder in ENCODER_NAMES, f"choose one of {list(ENCODER_NAMES)}")
    n_widths = 4 if model.encoder == "resnet" else 1
    need("model.widths", list(model.widths), (len(model.widths) == 4 if model.encoder == "resnet"
                                              else len(model.widths) >= 1) and all(w >= 1 for w in model.widths),
         f"give {n_widths if model.encoder == 'resnet' else 'at least 1'} channel count(s) >= 1, one per stage of "
         f"the {model.encoder} encoder, e.g. [16, 32, 64, 128]")
    for key in ("dim", "heads", "layers"):
        need(f"model.{key}", getattr(model, key), getattr(model, key) >= 1, f"choose {whole}")
    need("model.dropout", model.dropout, 0.0 <= model.dropout < 1.0, "choose a probability in [0, 1)")
    need("model.image_dropout", model.image_dropout, 0.0 <= model.image_dropout < 1.0,
         "choose a probability in [0, 1)")
    need("model.aux_weight", model.aux_weight, model.aux_weight >= 0.0, "choose a number >= 0")
    for key in ("epochs", "batch_size", "folds", "accumulate", "patience"):
        need(f"train.{key}", getattr(train, key), getattr(train, key) >= 1, f"choose {whole}")
    need("train.lr", train.lr, 0.0 < train.lr <= 10.0, "choose a learning rate in (0, 10]")
    need("train.weight_decay", train.weight_decay, train.weight_decay >= 0.0, "choose a number >= 0")
    need("train.ema", train.ema, 0.0 <= train.ema < 1.0, "choose a decay in [0, 1) (0 = no EMA)")
    need("train.warmup", train.warmup, 0.0 <= train.warmup <= 1.0,
         "choose a fraction of the optimizer steps in [0, 1]")
    need("train.num_workers", train.num_workers, train.num_workers >= 0, "choose a whole number >= 0")
    need("train.seed", train.seed, train.seed >= 0, "choose a whole number >= 0")
    need("infer.batch_size", infer.batch_size, infer.batch_size >= 1, f"choose {whole}")
    for i, t in enumerate(task.horizons):
        need(f"task.horizons[{i}]", t, t > 0, "choose a positive time (the units of the time column)")
    if image is None:
        return
    it = image.intensity
    need("image.intensity.a_max", it.a_max, it.a_min < it.a_max, f"must be above image.intensity.a_min ({it.a_min})")
    need("image.intensity.b_max", it.b_max, it.b_min < it.b_max, f"must be above image.intensity.b_min ({it.b_min})")
    if image.foreground is not None:
        need("image.foreground", image.foreground, _finite(image.foreground), "choose a finite number or null")


def _finite(x: float) -> bool:
    """x is a finite number (not NaN, not +-inf)."""
    return math.isfinite(x)


def check_pretrain(model: ModelConfig, pre: PretrainConfig, source: str) -> None:
    """Ranges of model.pretrained_lr / freeze_pretrained and of the pretrain section."""
    if model.pretrained is not None and not model.pretrained.strip():
        raise ConfigError(f"{source}: model.pretrained must be a path (file or folder), got an empty string")
    if not model.pretrained_lr > 0:
        raise ConfigError(f"{source}: model.pretrained_lr must be > 0 (a multiplier of train.lr), got "
                          f"{model.pretrained_lr!r}; use model.freeze_pretrained to freeze")
    fp = model.freeze_pretrained
    if not isinstance(fp, bool) and fp < 0:
        raise ConfigError(f"{source}: model.freeze_pretrained must be true, false or a number of epochs >= 0, "
                          f"got {fp!r}")
    for name in ("epochs", "batch_size"):
        if getattr(pre, name) < 1:
            raise ConfigError(f"{source}: pretrain.{name} must be >= 1, got {getattr(pre, name)!r}")
    if not pre.lr > 0:
        raise ConfigError(f"{source}: pretrain.lr must be > 0, got {pre.lr!r}")
    for name in ("mask_fraction", "mask_size"):
        if not 0.0 < getattr(pre, name) < 1.0:
            raise ConfigError(f"{source}: pretrain.{name} must be in (0, 1), got {getattr(pre, name)!r}")
    if pre.contrastive_weight < 0 or not pre.temperature > 0:
        raise ConfigError(f"{source}: pretrain.contrastive_weight must be >= 0 and pretrain.temperature > 0, got "
                          f"{pre.contrastive_weight!r} / {pre.temperature!r}")


def check_values(task: TaskConfig, image: ImageConfig | None, model: ModelConfig, train: TrainConfig,
                  source: str) -> None:
    def positive(name: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{source}: {name} must be > 0, got {value!r}")

    for name in ("epochs", "batch_size", "folds", "accumulate"):
        positive(f"train.{name}", getattr(train, name))
    positive("train.lr", train.lr)
    positive("model.dim", model.dim)
    positive("model.heads", model.heads)
    if model.dim % model.heads:
        raise ConfigError(f"{source}: model.dim ({model.dim}) must be divisible by model.heads ({model.heads})")
    if not 0.0 <= train.val_fraction < 1.0:
        raise ConfigError(f"{source}: train.val_fraction must be in [0, 1), got {train.val_fraction}")
    if image is not None:
        for i, n in enumerate(image.size or ()):
            positive(f"image.size[{i}]", n)
        _check_image(image, source)
        if image.spacing is not None:
            for i, mm in enumerate(image.spacing):
                positive(f"image.spacing[{i}]", mm)
        for name in ("translate", "noise_std", "intensity_shift"):
            if getattr(image.augment, name) < 0:
                raise ConfigError(f"{source}: image.augment.{name} must be >= 0, got {getattr(image.augment, name)!r}")


def _check_image(image: ImageConfig, source: str) -> None:
    """Cross-field checks of the image section (intensity windows, roi, cache)."""
    it = image.intensity
    if it.kind == "windows" and not it.windows:
        raise ConfigError(f"{source}: image.intensity.kind = windows needs image.intensity.windows, e.g. "
                          "[[-1000, 400], [-160, 240]]")
    for i, (lo, hi) in enumerate(it.windows):
        if not lo < hi:
            raise ConfigError(f"{source}: image.intensity.windows[{i}] = [{lo}, {hi}] must have min < max")
    lo_p, hi_p = it.percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise ConfigError(f"{source}: image.intensity.percentiles = {list(it.percentiles)} must be 0 <= low < high <= 100")
    if image.size_multiple < 1:
        raise ConfigError(f"{source}: image.size_multiple must be >= 1, got {image.size_multiple}")
    if not 0.0 <= image.fov.tolerance < 1.0:
        raise ConfigError(f"{source}: image.fov.tolerance must be in [0, 1), got {image.fov.tolerance}")
    if image.cache == "disk" and not image.cache_dir:
        raise ConfigError(f"{source}: image.cache = disk needs image.cache_dir (a folder)")
    roi = image.roi
    if image.descriptors is True and roi is not None and roi.mask is None:
        raise ConfigError(f"{source}: image.descriptors = true needs a lesion mask (image.roi.mask: COLUMN) with a "
                          "box around a given centre; allowed there: auto or false")
    if roi is not None:
        if (roi.mask is None) == (roi.center is None):
            raise ConfigError(f"{source}: image.roi needs exactly one of 'mask' (a mask column) or 'center' "
                              "(three coordinate columns)")
        if image.spacing is None:
            raise ConfigError(f"{source}: image.roi needs image.spacing (the box is cut at that spacing)")
        for i, mm in enumerate(roi.size_mm):
            if mm <= 0:
                raise ConfigError(f"{source}: image.roi.size_mm[{i}] must be > 0, got {mm}")
