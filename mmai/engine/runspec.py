"""The run contract: one frozen object that says everything a trained run needs to be used.

``mmai train`` writes a run folder (config.yaml, state.json, model.safetensors, ...); every
reader of a run (predict, explain, export) goes through :class:`RunSpec` instead of reading
state.json keys itself, the role nnU-Net's plans file plays. A RunSpec holds:

- the resolved pipeline (``config``) and the image pipeline's state: pipeline id, the modality
  the run was trained on and the fitted intensity statistics (``image_state``), from which
  :meth:`RunSpec.image_loader` builds the loader, so a raw input is preprocessed exactly as
  the training volumes were (``intensity.kind: percentile`` included);
- the fitted clinical preprocessor, the target encoding, the model constructor (fusion and
  keyword arguments), the survival baseline and horizons;
- the output column rule (:func:`mmai.inference.columns.prediction_columns`,
  :meth:`RunSpec.output_columns`) shared by predictions.csv, the out-of-fold tables and
  ``mmai evaluate``, and the one place a batch becomes model inputs
  (:func:`model_inputs`);
- for a K-fold run (``mmai train --folds K``, RUN/folds/foldK/), the fold models as ``folds``:
  ``mmai predict`` on such a run averages them (probabilities for classification, value for
  regression, log-risk and survival probabilities for survival), nnU-Net's default.

Older run folders load as before: state.json keys may be added, never renamed; a missing key
gets the value older mmai versions implied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmai.config import PipelineConfig, load_config
from mmai.engine.checkpoint import read_json
from mmai.engine.prepare import TargetEncoding
from mmai.engine.survival import STATE_KEY, survival_probability
from mmai.errors import CheckpointError
from mmai.inference.columns import prediction_columns

log = logging.getLogger(__name__)

FOLDS_DIR = "folds"
#: version of the state.json layout this module writes (keys are only ever added; a run without
#: the key is version 1)
STATE_VERSION = 2
#: columns a caller may add to predictions.csv between ``clinical_present`` and ``model_id``,
#: copied through from its per-case values (e.g. ``input_flags``: what preprocessing repaired)
PASSTHROUGH = ("input_flags",)


def model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of a fusion model call from a batch dict, the one place this is decided.

    ``batch``: ``image`` (B, C, D, H, W) or absent/None (clinical-only), ``image_present`` (B,),
    ``clinical`` (B, F), ``clinical_mask`` (B, F) and, for models that place image tokens in
    millimetres (``model.accepts_affine``), ``affine`` (B, 4, 4) voxel -> RAS.
    """
    inner = getattr(model, "module", model)  # DDP wrapper
    kwargs: dict[str, Any] = {}
    if getattr(inner, "accepts_affine", False):
        kwargs["affine"] = batch.get("affine")
    return (batch.get("image"), batch["image_present"], batch["clinical"], batch["clinical_mask"]), kwargs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A trained run (or a K-fold ensemble of them), as written by ``mmai train``.

    Attributes:
        run_dir: the run folder.
        config: the resolved pipeline (config.yaml).
        model_id: ``<fusion>-<weights digest>``; for an ensemble ``<fusion>-ens<K>-<digest of the ids>``.
        fusion: the fusion strategy (model registry name).
        model_kwargs: the model constructor's keyword arguments.
        uses_image: whether the model reads images.
        encoding: the target encoding (kind, classes, regression mean/std).
        clinical: the fitted clinical preprocessor, or None.
        image_state: state.json's ``image`` entry (pipeline id, modality, intensity statistics), or None.
        horizons: survival horizons of the ``surv_<t>`` columns (survival runs with task.horizons).
        baseline: the Breslow baseline hazard (survival with horizons), or None.
        weights: the model.safetensors of this run.
        folds: the fold models of a K-fold run read as an ensemble (empty: a single model).
        descriptors: the lesion descriptors the run takes as clinical columns (mmai.data.descriptors).
    """

    run_dir: Path
    config: PipelineConfig
    model_id: str
    fusion: str
    model_kwargs: Mapping[str, Any]
    uses_image: bool
    encoding: TargetEncoding
    clinical: Any
    image_state: Mapping[str, Any] | None
    horizons: tuple[float, ...]
    baseline: Mapping[str, Any] | None
    weights: Path
    folds: tuple[RunSpec, ...] = ()
    descriptors: tuple[str, ...] = ()

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, run_dir: Path | str, *, ensemble: bool = True) -> RunSpec:
        """Read a run folder.

        Args:
            run_dir: a folder written by ``mmai train`` (or one of its ``folds/foldK``).
            ensemble: read a K-fold run's fold models as an ensemble (``False``: the final model
                trained on all non-test rows).

        Raises:
            CheckpointError: not a finished run, or a state that does not fit its config.
        """
        run_dir = Path(run_dir)
        single = cls._load_one(run_dir)
        if not ensemble:
            return single
        fold_dirs = sorted((p for p in (run_dir / FOLDS_DIR).glob("fold*") if p.is_dir()),
                           key=lambda p: (len(p.name), p.name))
        if not fold_dirs:
            return single
        done = [p for p in fold_dirs if (p / "DONE").exists() and (p / "state.json").exists()]
        if len(done) != len(fold_dirs) or len(done) != single.config.train.folds:
            raise CheckpointError(f"{run_dir}: {len(done)} of {single.config.train.folds} cross-validation fold "
                                  f"models are finished ({run_dir / FOLDS_DIR}); finish training (mmai train "
                                  "--resume) or predict with the final model alone (--no-ensemble)")
        fold_dirs = done
        folds = tuple(cls._load_one(p) for p in fold_dirs)
        for f in folds:
            if f.encoding.kind != single.encoding.kind or list(f.encoding.classes) != list(single.encoding.classes):
                raise CheckpointError(f"{f.run_dir}: the fold model has classes {f.encoding.classes}, the run "
                                      f"{single.encoding.classes}; retrain the run or predict with one fold's folder")
            if f.uses_image != single.uses_image or _image_key(f) != _image_key(single):
                raise CheckpointError(f"{f.run_dir}: the fold model reads images differently from the run (pipeline "
                                      "or intensity statistics differ); predict with one fold's folder")
        digest = hashlib.sha1("\n".join(f.model_id for f in folds).encode()).hexdigest()[:10]
        return dataclasses.replace(single, model_id=f"{single.fusion}-ens{len(folds)}-{digest}", folds=folds)

    @classmethod
    def _load_one(cls, run_dir: Path) -> RunSpec:
        from mmai.clinical.preprocess import ClinicalPreprocessor
        from mmai.data.descriptors import names_from_state
        from mmai.transforms.pipelines import image_pipeline_id

        if not (run_dir / "state.json").exists():
            raise CheckpointError(f"{run_dir} is not a finished mmai run (no state.json); train it first")
        state = read_json(run_dir / "state.json")
        config = load_config(run_dir / "config.yaml")
        try:
            cstate = state.get("clinical")
            pre = ClinicalPreprocessor.from_state(cstate, source=str(run_dir / "state.json")) if cstate else None
            encoding = TargetEncoding.from_state(state["target"])
            spec = cls(run_dir=run_dir, config=config, model_id=str(state["model_id"]), fusion=str(state["fusion"]),
                       model_kwargs=dict(state["model_kwargs"]), uses_image=bool(state.get("uses_image", True)),
                       encoding=encoding, clinical=pre, image_state=state.get("image"), horizons=(),
                       baseline=None, weights=run_dir / "model.safetensors",
                       descriptors=names_from_state(state))
        except KeyError as exc:
            raise CheckpointError(f"{run_dir}/state.json lacks {exc}; it was not written by mmai train") from exc
        img = spec.image_state
        if spec.uses_image and config.image is None:
            raise CheckpointError(f"{run_dir}: the model reads images but config.yaml has image: null")
        if spec.uses_image and config.image is not None and img is not None \
                and img.get("pipeline_id") != image_pipeline_id(config.image):
            raise CheckpointError(f"{run_dir}: config.yaml's image section does not match the one the model was "
                                  "trained with (pipeline id differs); do not edit a run's config.yaml")
        horizons, baseline = _survival(run_dir, config, encoding, state)
        return dataclasses.replace(spec, horizons=horizons, baseline=baseline)

    # ------------------------------------------------------------------ what it builds

    @property
    def members(self) -> tuple[RunSpec, ...]:
        """The models whose outputs are averaged: the folds of an ensemble, else this run."""
        return self.folds or (self,)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.folds)

    @property
    def kind(self) -> str:
        return self.encoding.kind

    def build_model(self, device: str = "cpu") -> torch.nn.Module:
        """This (single) run's model with its weights, in eval mode on ``device``."""
        from mmai.inference.weights import load_matching_weights
        from mmai.models.registry import create_model

        specs = list(self.clinical.feature_specs) if self.clinical is not None else []
        model = create_model(self.fusion, feature_specs=specs, **self.model_kwargs)
        load_matching_weights(model, self.weights, self.model_id, self.fusion)
        return model.to(device).eval()

    def image_loader(self, device: str = "cpu") -> Any:
        """The image loader of this run: the pipeline with the run's modality and fitted statistics,
        so raw inputs are preprocessed as the training volumes were (None for clinical-only runs)."""
        from mmai.data.dataset import ImageLoader

        if not self.uses_image or self.config.image is None:
            return None
        return ImageLoader(self.config.image, device=device, run_state=dict(self.image_state or {}))

    def roi_sources(self, df: Any, base_dir: Path | None) -> list[dict[str, Any] | None]:
        """Per-row lesion-box inputs (mask path or centre) of an ``image.roi`` run, read from the
        manifest columns exactly as ``mmai preprocess`` reads them; all None when the pipeline has
        no ROI or the manifest lacks the columns (then only preprocessed volumes can be read)."""
        from mmai.errors import ManifestError
        from mmai.transforms.roi import roi_sources

        cfg = self.config.image
        if cfg is None or cfg.roi is None or not self.uses_image:
            return [None] * len(df)
        try:
            return roi_sources(cfg, df, base_dir)
        except ManifestError:
            return [None] * len(df)

    @staticmethod
    def model_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) of ``model``'s call on ``batch`` (:func:`model_inputs`)."""
        return model_inputs(model, batch)

    def output_columns(self, extra: Sequence[str] = ()) -> list[str]:
        """predictions.csv's columns: case_id, the task's columns, clinical_present, ``extra``
        (pass-through columns such as ``input_flags``), model_id."""
        cols = prediction_columns(self.kind, self.encoding.classes, self.horizons)
        return ["case_id", *cols, "clinical_present", *extra, "model_id"]

    def predictions(self, out: torch.Tensor) -> np.ndarray:
        """Raw model outputs (B, n_outputs) -> the averaged quantities (B, Q): class probabilities
        (B, K), the regression value in target units (B, 1), or log-risk then P(no event by t)
        per horizon (B, 1 + H). These are what an ensemble averages."""
        from mmai.models.heads import outputs_to_predictions

        pred = outputs_to_predictions(self.kind, out).numpy().astype(np.float64)
        if self.kind == "regression":
            return pred[:, :1] * self.encoding.std + self.encoding.mean
        if self.kind == "survival":
            risk = pred[:, :1]
            if self.horizons and self.baseline is not None:
                surv = survival_probability(dict(self.baseline), risk[:, 0], self.horizons)
                return np.concatenate([risk, np.asarray(surv, np.float64).reshape(len(risk), -1)], axis=1)
            return risk
        return pred

    def rows(self, case_ids: Sequence[str], values: np.ndarray, clinical_present: Sequence[int] | np.ndarray,
             extra: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """predictions.csv rows from :meth:`predictions` values (averaged over the members)."""
        cols = prediction_columns(self.kind, self.encoding.classes, self.horizons)
        rows = []
        for k, cid in enumerate(case_ids):
            v = values[k]
            row: dict[str, Any] = {"case_id": str(cid)}
            if self.kind in ("binary", "multiclass"):
                row.update({c: float(x) for c, x in zip(cols[:-1], v, strict=True)})
                row["prediction"] = self.encoding.classes[int(np.argmax(v))]
            else:
                row.update({c: float(x) for c, x in zip(cols, v, strict=True)})
            row["clinical_present"] = int(clinical_present[k])
            for name, vals in (extra or {}).items():
                row[name] = vals[k]
            row["model_id"] = self.model_id
            rows.append(row)
        return rows


def run_state(*, model_id: str, config: PipelineConfig, model: torch.nn.Module, model_kwargs: Mapping[str, Any],
              encoding: TargetEncoding, clinical: Any, loader: Any, best_epoch: int,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """state.json of a finished run (what :meth:`RunSpec.load` reads back), written by the engine.

    ``loader``: the training ImageLoader (its fitted intensity statistics and the modalities it
    read); ``extra``: more entries (e.g. the survival baseline under ``survival``)."""
    import monai

    import mmai
    from mmai.data.provenance import run_image_state

    return {
        "runspec_version": STATE_VERSION,
        "model_id": model_id, "fusion": config.model.fusion, "model_kwargs": dict(model_kwargs),
        "uses_image": bool(getattr(model, "uses_image", True)),
        "target": encoding.to_state(), "task": dataclasses.asdict(config.task),
        "clinical": clinical.to_state() if clinical is not None else None,
        "image": None if config.image is None else run_image_state(config.image, loader),
        "best_epoch": best_epoch,
        "versions": {"mmai": mmai.__version__, "torch": torch.__version__, "monai": monai.__version__},
        **(extra or {}),
    }


def _image_key(spec: RunSpec) -> tuple[Any, ...]:
    from mmai.transforms.intensity import stats_digest

    img = spec.image_state or {}
    stats = img.get("intensity_stats")
    return img.get("pipeline_id"), img.get("modality"), stats_digest(stats) if stats else None


def _survival(run_dir: Path, config: PipelineConfig, encoding: TargetEncoding, state: Mapping[str, Any]
              ) -> tuple[tuple[float, ...], dict[str, Any] | None]:
    """Horizons of ``surv_<t>`` columns and the Breslow baseline (survival runs with task.horizons)."""
    horizons = tuple(float(h) for h in config.task.horizons) if encoding.kind == "survival" else ()
    if not horizons:
        return (), None
    bad = [h for h in horizons if not h > 0]
    if bad:
        raise CheckpointError(f"{run_dir}/config.yaml: task.horizons {bad} must be positive times")
    base = (state.get(STATE_KEY) or {}).get("baseline")
    if base is None:
        raise CheckpointError(f"{run_dir}/state.json has no Breslow baseline hazard, so surv_<t> cannot "
                              "be computed; retrain with this mmai, or remove task.horizons from config.yaml")
    survival_probability(base, [0.0], horizons)  # a horizon past the training follow-up fails here
    return horizons, base
