"""Pipeline configuration: one YAML file -> frozen dataclasses.

The YAML is parsed with ``yaml.safe_load`` and checked against the dataclasses below: an
unknown key, a wrong type or a value outside its allowed set is a :class:`ConfigError` that
names the key path, the file and the allowed values. Nothing in a config is ever evaluated.

Sections (see docs/pipelines.md): ``task`` and ``clinical`` (a fixed form other tools write), ``image``,
``model``, ``train``, ``infer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmai.config_typed import build_section, key_paths, to_plain
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
    horizons: tuple[float, ...] = ()  # survival: write surv_<t> = P(no event by t) for each t (time units)


@dataclass(frozen=True)
class IntensityConfig:
    """Intensity normalisation applied at preprocessing.

    ``window``: clip to [a_min, a_max] (e.g. CT HU) and scale to [b_min, b_max].
    ``windows``: one channel per ``[a_min, a_max]`` pair of ``windows`` (e.g. lung + mediastinum),
    each clipped and scaled to [b_min, b_max].
    ``zscore``: per-volume mean/std over non-zero voxels (MR); no statistic is learned.
    ``percentile``: clip to the ``percentiles`` of the foreground and z-score with the foreground
    mean/std, all four numbers fitted on the training cases only (``mmai preprocess``), saved
    with the preprocessed volumes and the run, reloaded at inference; background -> 0.
    ``volume_percentile``: per volume, clip to the ``percentiles`` of THAT volume's foreground and
    z-score with its foreground mean/std (nnU-Net's MR rule); nothing is learned, so scanners
    with different gains and offsets all come out with background 0 < tissue.
    ``none``: keep the values.
    """

    kind: Literal["window", "windows", "zscore", "percentile", "volume_percentile", "none"] = "window"
    a_min: float = -1000.0
    a_max: float = 1000.0
    b_min: float = 0.0
    b_max: float = 1.0
    windows: tuple[tuple[float, float], ...] = ()
    percentiles: tuple[float, float] = (0.5, 99.5)


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
class DicomConfig:
    """DICOM geometry policy and tolerances (docs/dicom.md); read by mmai.io.dicom_geometry.

    ``uneven``: a stack not uniform within ``spacing_tolerance`` (missing slice, uneven spacing,
    jitter) is ``resample``d onto a uniform grid, refused (``error``) or kept raw and flagged
    irregular (``keep``). ``tilt``: gantry tilt above ``tilt_tolerance_deg`` as a sheared affine
    (``shear``) or resampled onto an orthogonal grid. ``spacing_tolerance``: largest distance of a
    slice from the uniform grid, as a fraction of the slice step. ``orientation_tolerance``:
    largest difference of ImageOrientationPatient cosines within one stack.
    """

    uneven: Literal["resample", "error", "keep"] = "resample"
    tilt: Literal["shear", "resample"] = "shear"
    spacing_tolerance: float = 0.01
    tilt_tolerance_deg: float = 0.1
    orientation_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        for name, hi in (("spacing_tolerance", 0.5), ("tilt_tolerance_deg", 45.0), ("orientation_tolerance", 0.1)):
            if not 0 < getattr(self, name) < hi:
                raise ConfigError(f"image.dicom.{name} = {getattr(self, name)!r} is not allowed; choose a "
                                  f"number in (0, {hi:g})")


@dataclass(frozen=True)
class FovConfig:
    """What happens when the output box would cut body (foreground) voxels.

    ``mode: error``: a lost foreground fraction above ``tolerance`` fails the case, naming it and
    the fraction; ``mode: crop``: crop anyway, log the fraction and record it (manifest column
    ``fov_lost_fraction``, NIfTI provenance).
    """

    mode: Literal["error", "crop"] = "error"
    tolerance: float = 0.0


@dataclass(frozen=True)
class RoiConfig:
    """A lesion box instead of the whole scan (docs/pipelines.md, "Lesion-aware inputs").

    Attributes:
        mask: manifest column with a per-case NIfTI mask in the image's patient space: the box is
            centred on the mask's centre of mass and the mask (nearest neighbour) is an extra channel.
        center: three manifest columns with a point in millimetres (instead of ``mask``).
        space: ``RAS`` (NIfTI convention) or ``LPS`` (DICOM convention) for ``center``.
        size_mm: box size (x, y, z) in mm, cut at the pipeline's ``spacing``.
    """

    mask: str | None = None
    center: tuple[str, str, str] | None = None
    space: Literal["RAS", "LPS"] = "RAS"
    size_mm: tuple[float, float, float] = (40.0, 40.0, 40.0)


@dataclass(frozen=True)
class ImageConfig:
    """How a case's image is found, loaded and prepared.

    Attributes:
        column: manifest column holding the NIfTI file or DICOM folder.
        select: series selection rule for DICOM study folders (see docs/dicom_scan.md).
        modality: the modality the pipeline is for (``any``, ``CT``, ``MR``); a DICOM series or a
            preprocessed volume of another modality is refused.
        spacing: target voxel spacing in mm (i, j, k), or None to keep the native spacing.
        size: spatial size (i, j, k) the model sees (centre pad/crop after resampling), or None
            (default) to keep the whole (body-cropped) volume, padded to a multiple of ``size_multiple``.
        size_multiple: with ``size: null``, pad each axis up to a multiple of this many voxels.
        orientation: axis codes after reorientation (MONAI Orientationd), e.g. RAS.
        crop_foreground: crop to the body (the ``foreground`` mask) before padding.
        dicom: DICOM geometry policy and tolerances (:class:`DicomConfig`).
        foreground: raw intensity above which a voxel is body (e.g. -500 HU); None = automatic.
        antialias: Gaussian smoothing before downsampling (sigma = half the zoom factor).
        fov: what a box that cuts foreground does (:class:`FovConfig`).
        roi: a lesion box instead of the whole scan (:class:`RoiConfig`), or None.
        descriptors: lesion descriptors (first-order + shape statistics inside ``roi.mask``,
            :mod:`mmai.transforms.descriptors`) as extra clinical features: ``auto`` (default: on
            when ``roi.mask`` is set, for fusions with a clinical path other than clinical_only;
            without a lesion box, the mask-free focal-object inventory of :mod:`mmai.data.focal`
            for every fusion with an image path), ``true`` (the same) or ``false``.
        cache: ``memory`` (small grids), ``disk`` (full resolution: ``cache_dir``) or ``none``.
        cache_dir: folder of the disk cache (keyed by file content + pipeline id).
        nonfinite: NaN / inf voxels in an input: ``error`` (default: the case is an error row) or
            ``fill`` (set to the volume's finite minimum, flagged ``nonfinite_voxels=N``).
        modality_check: check an untagged NIfTI's intensities against ``modality`` (CT holds air
            near -1000 HU, MR does not; docs/pipelines.md); False skips the check.
    """

    column: str = "image"
    select: dict[str, Any] | None = None
    modality: Literal["any", "CT", "MR"] = "any"
    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    size: tuple[int, int, int] | None = None
    size_multiple: int = 16
    orientation: str = "RAS"
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    crop_foreground: bool = False
    foreground: float | None = None
    antialias: bool = True
    fov: FovConfig = field(default_factory=FovConfig)
    roi: RoiConfig | None = None
    descriptors: bool | Literal["auto"] = "auto"
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    nonfinite: Literal["error", "fill"] = "error"
    modality_check: bool = True


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
    windows: WindowsConfig | None = None
    bidirectional: bool = False
    pretrained: str | None = None  # image encoder weights: file or folder (mmai/models/pretrained.py)
    pretrained_lr: float = 1.0  # learning-rate multiplier of the pretrained encoder's parameters
    freeze_pretrained: bool | int = False  # true: frozen throughout; N: frozen for the first N epochs
    base: Literal["glm", "none"] = "glm"  # frozen penalised GLM base term on the clinical features (mmai.models.glm)


@dataclass(frozen=True)
class WindowsConfig:
    """``model.windows``: sliding-window image tokens (cross_attention; docs/models.md "Full resolution").

    ``roi_size`` voxels per window, ``overlap`` in [0, 1), ``batch`` windows per encoder call,
    ``train_windows`` ``all`` or K windows sampled per volume per training step, ``checkpoint``
    activation checkpointing of the window encoder in training.
    """

    roi_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.25
    batch: int = 4
    train_windows: Literal["all"] | int = "all"
    checkpoint: bool = False

    def __post_init__(self) -> None:
        if min(self.roi_size) < 1 or not 0.0 <= self.overlap < 1.0 or self.batch < 1:
            raise ConfigError(f"model.windows: roi_size must be > 0, overlap in [0, 1), batch >= 1; got "
                              f"{self.roi_size}, {self.overlap}, {self.batch}")
        if self.train_windows != "all" and self.train_windows < 1:
            raise ConfigError(f"model.windows.train_windows must be 'all' or >= 1, got {self.train_windows!r}")


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
    amp: bool | Literal["bf16", "fp16", "off"] = "off"  # true/false: deprecated spellings of bf16/off
    accumulate: int = 1
    scaling: Literal["robust", "standard"] = "robust"
    impute: Literal["median", "mean"] = "median"
    select_metric: Literal["auto", "loss", "metric"] = "auto"
    ema: float = 0.0
    num_workers: int = 0
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup: float = 0.05  # fraction of the optimizer steps (at most one epoch) of linear warm-up

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):  # YAML reads an unquoted `off` as false
            if self.amp:
                import logging

                logging.getLogger(__name__).warning("train.amp: true is deprecated; write bf16 (or fp16, off)")
            object.__setattr__(self, "amp", "bf16" if self.amp else "off")


@dataclass(frozen=True)
class PretrainConfig:
    """``mmai pretrain``: self-supervised encoder pretraining (docs/models.md "Pretraining").

    ``epochs``, ``batch_size``, ``lr`` of the pretraining run (AdamW, cosine schedule; seed and
    weight decay from ``train``); ``mask_fraction`` of each view's voxels hidden by random cuboids
    of ``mask_size`` (fraction of each axis) for the inpainting loss; ``contrastive_weight`` of the
    NT-Xent term between two augmented views at ``temperature`` (0, the default = inpainting only).
    """

    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    mask_fraction: float = 0.4
    mask_size: float = 0.25
    contrastive_weight: float = 0.0  # measured: NT-Xent discarded lesion size (docs/benchmarks.md "Few labels")
    temperature: float = 0.5


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    source: str = "<dict>"
    # dotted key paths the user wrote (``train.epochs``, ``image.roi.mask``, ...): what mmai's
    # self-configuring defaults (mmai.engine.autoconfig) never change; not part of to_dict
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that :func:`config_from_dict` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("source", "explicit"):
                continue
            value = getattr(self, f.name)
            if f.name == "clinical":
                out["clinical"] = value.to_dict() if value is not None else None
            elif value is None:
                out[f.name] = None
            else:
                out[f.name] = to_plain(value)
        return out

    def replace(self, **sections: Any) -> PipelineConfig:
        return dataclasses.replace(self, **sections)

    def is_explicit(self, path: str) -> bool:
        """Whether the user wrote ``path`` (``train.epochs``), or wrote a section above it as a
        value rather than a mapping (``image: null`` covers ``image.roi.size_mm``)."""
        if path in self.explicit:
            return True
        parts = path.split(".")
        for i in range(1, len(parts)):
            head = ".".join(parts[:i])
            if head in self.explicit and not any(p.startswith(head + ".") for p in self.explicit):
                return True
        return False

    def mark_explicit(self, *paths: str) -> PipelineConfig:
        """The config with ``paths`` counted as written by the user (e.g. command-line overrides)."""
        return dataclasses.replace(self, explicit=self.explicit | frozenset(paths))


_SECTIONS = ("task", "clinical", "image", "model", "train", "infer", "pretrain")


def config_from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> PipelineConfig:
    """Build and validate a :class:`PipelineConfig` from a parsed YAML mapping."""
    data = dict(data or {})
    unknown = [k for k in data if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key '{unknown[0]}'; allowed: {list(_SECTIONS)}")
    task = build_section(TaskConfig, data.get("task"), "task", source)
    clinical = None
    if data.get("clinical"):
        from mmai.clinical.schema import ClinicalSchema

        clinical = ClinicalSchema.from_dict(data["clinical"], source)
    image = None if "image" in data and data["image"] is None else build_section(ImageConfig, data.get("image"), "image", source)
    if image is not None and image.select is not None:
        from mmai.io.dicom_select import SelectionRule

        SelectionRule.from_dict(image.select, source)  # validate early; parsed again where used
    model = build_section(ModelConfig, data.get("model"), "model", source)
    if model.fusion not in FUSIONS:
        raise ConfigError(f"{source}: model.fusion = {model.fusion!r} is not allowed; choose one of {list(FUSIONS)}")
    train = build_section(TrainConfig, data.get("train"), "train", source)
    infer = build_section(InferConfig, data.get("infer"), "infer", source)
    pretrain = build_section(PretrainConfig, data.get("pretrain"), "pretrain", source)
    from mmai.config_ranges import check_pretrain, check_ranges, check_values

    check_values(task, image, model, train, source)
    check_ranges(task, image, model, train, infer, source)
    check_pretrain(model, pretrain, source)
    return PipelineConfig(task=task, clinical=clinical, image=image, model=model, train=train,
                          infer=infer, pretrain=pretrain, source=source, explicit=frozenset(key_paths(data)))


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
