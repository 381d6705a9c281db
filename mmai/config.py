"""Pipeline configuration: one YAML file -> frozen dataclasses.

The YAML is parsed with ``yaml.safe_load`` and checked against the dataclasses below: an
unknown key, a wrong type or a value outside its allowed set is a :class:`ConfigError` that
names the key path, the file and the allowed values. Nothing in a config is ever evaluated.

Sections (see docs/pipelines.md): ``task`` and ``clinical`` (fixed by DESIGN.md), ``image``,
``model``, ``train``, ``infer``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmai.errors import ConfigError

TaskKind = Literal["binary", "multiclass", "regression", "survival"]
from mmai.models.fusion_names import FUSIONS  # noqa: E402  (the one list; torch-free)


@dataclass(frozen=True)
class TaskConfig:
    """What is predicted. ``target`` for classification/regression; ``time``/``event`` for survival."""

    kind: TaskKind = "binary"
    target: str = "label"
    time: str = "time"
    event: str = "event"


@dataclass(frozen=True)
class IntensityConfig:
    """Intensity normalisation applied at preprocessing.

    ``window``: clip to [a_min, a_max] (e.g. CT HU) and scale to [b_min, b_max].
    ``zscore``: per-volume mean/std over non-zero voxels (MR); no statistic is learned.
    ``none``: keep the values.
    """

    kind: Literal["window", "zscore", "none"] = "window"
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time random augmentation (MONAI dictionary transforms).

    ``translate``: shift the volume by up to this many voxels along each axis (whole voxels, the
    uncovered border filled with the background value), so the encoder sees each structure at
    many grid offsets; helps most when the labels are few and the voxels coarse.
    """

    flip: bool = False
    rotate90: bool = False
    intensity_shift: float = 0.0
    noise_std: float = 0.0
    translate: int = 0


@dataclass(frozen=True)
class ImageConfig:
    """How a case's image is found, loaded and prepared.

    Attributes:
        column: manifest column holding the NIfTI file or DICOM folder.
        select: series selection rule for DICOM study folders (see docs/dicom_scan.md).
        spacing: target voxel spacing in mm (i, j, k), or None to keep the native spacing.
        size: spatial size (i, j, k) the model sees: centre pad/crop after resampling.
        orientation: axis codes after reorientation (MONAI Orientationd), e.g. RAS.
        crop_foreground: crop to the body (values above the window minimum) before padding.
    """

    column: str = "image"
    select: dict[str, Any] | None = None
    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] = (64, 64, 64)
    orientation: str = "RAS"
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    crop_foreground: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Model architecture (see mmai/models)."""

    encoder: str = "resnet"
    widths: tuple[int, ...] = (16, 32, 64, 128)
    fusion: str = "cross_attention"
    clinical_encoder: Literal["tokens", "mlp"] = "tokens"
    dim: int = 64
    heads: int = 4
    layers: int = 1
    dropout: float = 0.1
    image_dropout: float = 0.0
    aux_weight: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data split settings."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    folds: int = 1
    val_fraction: float = 0.15
    patience: int = 10
    amp: bool = False
    accumulate: int = 1
    scaling: Literal["robust", "standard"] = "robust"
    impute: Literal["median", "mean"] = "median"
    select_metric: Literal["auto", "loss"] = "auto"
    ema: float = 0.0
    num_workers: int = 0


@dataclass(frozen=True)
class InferConfig:
    """Inference settings."""

    batch_size: int = 16


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline. ``clinical`` holds the parsed :class:`ClinicalSchema` (or None)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    clinical: Any = None
    image: ImageConfig | None = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that :func:`config_from_dict` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if f.name == "clinical":
                out["clinical"] = value.to_dict() if value is not None else None
            elif value is None:
                out[f.name] = None
            else:
                out[f.name] = _to_plain(value)
        return out

    def replace(self, **sections: Any) -> PipelineConfig:
        return dataclasses.replace(self, **sections)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must have {len(args)} entries, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key '{path}.{key}'; allowed keys in '{path}': {allowed}")
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}", source)
    return cls(**kwargs)


_SECTIONS = ("task", "clinical", "image", "model", "train", "infer")


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> PipelineConfig:
    """Build and validate a :class:`PipelineConfig` from a parsed YAML mapping."""
    data = dict(data or {})
    unknown = [k for k in data if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key '{unknown[0]}'; allowed: {list(_SECTIONS)}")
    task = _build(TaskConfig, data.get("task"), "task", source)
    clinical = None
    if data.get("clinical"):
        from mmai.clinical.schema import ClinicalSchema

        clinical = ClinicalSchema.from_dict(data["clinical"], source)
    image = None if "image" in data and data["image"] is None else _build(ImageConfig, data.get("image"), "image", source)
    if image is not None and image.select is not None:
        from mmai.io.dicom_select import SelectionRule

        SelectionRule.from_dict(image.select, source)  # validate early; parsed again where used
    model = _build(ModelConfig, data.get("model"), "model", source)
    if model.fusion not in FUSIONS:
        raise ConfigError(f"{source}: model.fusion = {model.fusion!r} is not allowed; choose one of {list(FUSIONS)}")
    train = _build(TrainConfig, data.get("train"), "train", source)
    infer = _build(InferConfig, data.get("infer"), "infer", source)
    _check_values(task, image, model, train, source)
    return PipelineConfig(task=task, clinical=clinical, image=image, model=model, train=train,
                          infer=infer, source=source)


def _check_values(task: TaskConfig, image: ImageConfig | None, model: ModelConfig, train: TrainConfig,
                  source: str) -> None:
    def positive(name: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{source}: {name} must be > 0, got {value!r}")

    for name in ("epochs", "batch_size", "folds", "accumulate"):
        positive(f"train.{name}", getattr(train, name))
    positive("train.lr", train.lr)
    positive("model.dim", model.dim)
    if model.dim % model.heads:
        raise ConfigError(f"{source}: model.dim ({model.dim}) must be divisible by model.heads ({model.heads})")
    if not 0.0 <= train.val_fraction < 1.0:
        raise ConfigError(f"{source}: train.val_fraction must be in [0, 1), got {train.val_fraction}")
    if image is not None:
        for i, n in enumerate(image.size):
            positive(f"image.size[{i}]", n)
        if image.spacing is not None:
            for i, mm in enumerate(image.spacing):
                positive(f"image.spacing[{i}]", mm)
        for name in ("translate", "noise_std", "intensity_shift"):
            if getattr(image.augment, name) < 0:
                raise ConfigError(f"{source}: image.augment.{name} must be >= 0, got {getattr(image.augment, name)!r}")


def load_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline YAML file (safe_load) and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"pipeline config not found: {path}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, source=str(path))


def dump_config(config: PipelineConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomic)."""
    from mmai.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
