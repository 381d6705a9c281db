"""Range checks of every numeric pipeline value, run when a config is loaded
(:func:`mmai.config.config_from_dict`): a value outside its working range is a one-line
:class:`~mmai.errors.ConfigError` naming the key path, the value and what is allowed, instead of
a crash or a silent misbehaviour later (``model.heads: 0``, ``encoder: vit``, ``dropout: 5.0``,
``ema: -1``, ``warmup: 2.0``, ``infer.batch_size: 0``, ``widths: [8]``, ...)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from mmai.errors import ConfigError

if TYPE_CHECKING:
    from mmai.config import ImageConfig, InferConfig, ModelConfig, TaskConfig, TrainConfig


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
