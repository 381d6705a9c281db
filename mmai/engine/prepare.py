"""From a validated manifest + config to model inputs: target encoding and datasets.

Everything learned here (class list, regression target mean/std, the clinical preprocessor)
is fitted on training rows only and saved into state.json; inference rebuilds it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mmai.clinical.preprocess import ClinicalPreprocessor, FeatureSpec
from mmai.config import PipelineConfig
from mmai.data.dataset import ImageLoader, MultimodalDataset
from mmai.errors import ManifestError
from mmai.labels import sort_classes


@dataclass
class TargetEncoding:
    """How targets become tensors: class order (classification) or mean/std (regression)."""

    kind: str
    classes: list[str] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, config: PipelineConfig, train: pd.DataFrame) -> TargetEncoding:
        t = config.task
        if t.kind in ("binary", "multiclass"):
            classes = sort_classes(train[t.target])
            if t.kind == "binary" and len(classes) != 2:
                raise ManifestError(f"task.kind is binary but the training rows of '{t.target}' hold "
                                    f"{len(classes)} class(es): {classes}; binary needs exactly 2")
            if t.kind == "multiclass" and len(classes) < 2:
                raise ManifestError(f"multiclass target '{t.target}' has only {classes} in the training rows")
            return cls(kind=t.kind, classes=classes)
        if t.kind == "regression":
            y = train[t.target].astype(float).to_numpy()
            std = float(y.std()) or 1.0
            return cls(kind=t.kind, mean=float(y.mean()), std=std)
        return cls(kind=t.kind)

    def encode(self, config: PipelineConfig, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Target arrays for ``df`` (rows must carry targets)."""
        t = config.task
        if self.kind in ("binary", "multiclass"):
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted({str(v) for v in df[t.target]} - set(index))
            if unknown:
                raise ManifestError(f"label value(s) {unknown} in '{t.target}' were not among the training "
                                    f"classes {self.classes}")
            y = np.array([index[str(v)] for v in df[t.target]])
            return {"target": y.astype(np.float32 if self.kind == "binary" else np.int64)}
        if self.kind == "regression":
            y = (df[t.target].astype(float).to_numpy() - self.mean) / self.std
            return {"target": y.astype(np.float32)}
        return {"time": df[t.time].astype(float).to_numpy(np.float32),
                "event": df[t.event].astype(float).to_numpy(np.float32)}

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TargetEncoding:
        return cls(kind=state["kind"], classes=list(state["classes"]), mean=float(state["mean"]),
                   std=float(state["std"]))


def fit_clinical(config: PipelineConfig, train: pd.DataFrame) -> ClinicalPreprocessor | None:
    """Fit the clinical preprocessor on the training rows (None without a clinical section).

    With lesion descriptors (:func:`mmai.data.descriptors.descriptor_names`) its schema gains one
    numeric column per descriptor (``train`` must carry them: :func:`mmai.data.descriptors.attach_run_descriptors`)."""
    from mmai.data.descriptors import descriptor_names, extend_schema

    names = descriptor_names(config)
    clinical = None if config.model.fusion == "image_only" else config.clinical  # image_only: descriptors only
    if clinical is None and not names:
        return None
    schema: Any = extend_schema(clinical, names, config.source) if names else clinical
    pre = ClinicalPreprocessor(schema, scaling=config.train.scaling, impute=config.train.impute)
    return pre.fit(train, source="training rows")


def feature_specs(pre: ClinicalPreprocessor | None) -> list[FeatureSpec]:
    return list(pre.feature_specs) if pre is not None else []


def build_dataset(config: PipelineConfig, df: pd.DataFrame, *, pre: ClinicalPreprocessor | None,
                  targets: dict[str, np.ndarray] | None, uses_image: bool, augment: Any = None,
                  image_dropout: float = 0.0, seed: int = 0, loader: ImageLoader | None = None
                  ) -> MultimodalDataset:
    """A :class:`MultimodalDataset` over the rows of ``df`` (already validated)."""
    values = mask = None
    if pre is not None:
        values, mask = pre.transform(df, source="manifest")
    image_paths = None
    if uses_image:
        if config.image is None:
            raise ManifestError("this model needs images but the pipeline has image: null")
        image_paths = list(df[config.image.column])
    return MultimodalDataset(list(df["case_id"]), image_paths=image_paths, clinical=values, clinical_mask=mask,
                             targets=targets, image_cfg=config.image if uses_image else None, augment=augment,
                             image_dropout=image_dropout, seed=seed, loader=loader)
