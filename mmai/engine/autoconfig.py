"""Self-configuring defaults: from the training split's fingerprint to the settings a user would tune.

Every rule below fills ONE setting the user did not write (``PipelineConfig.explicit``, filled
from the YAML by :func:`mmai.config.config_from_dict`; command-line overrides count as written),
and gives its reason. A value the user wrote always wins: the rule is then skipped and listed
under ``kept``. The resolved config goes to RUN_DIR/config.yaml (reloading it reproduces the
run: every key of that file counts as written), the choices with their reasons to state.json and
metrics.json (``autoconfig``) and one log line each. docs/training.md, "Self-configuring
defaults", explains each rule; the numbers are the recipes measured in docs/benchmarks.md.

Two entry points: :func:`resolve_image` (the lesion box: called by ``mmai preprocess``, which
cuts the box, and by training) and :func:`autoconfigure` (everything, called by ``mmai train``).
:func:`resolve_select_metric` decides, per split, what ``train.select_metric: auto`` selects on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.config import PipelineConfig
from mmai.config_typed import to_plain
from mmai.engine.fingerprint import Fingerprint, fingerprint

log = logging.getLogger(__name__)

#: a validation set smaller than this (cases, or cases of its rarest class / events) selects on loss
SMALL_VAL_CASES = 100
SMALL_VAL_EVENTS = 30
#: optimisation steps the automatic epoch count aims at (the measured recipes: 500-1300 steps)
TARGET_STEPS = 600
MIN_EPOCHS, MAX_EPOCHS = 20, 200
#: EMA horizon (1 / (1 - decay)) as a fraction of all optimisation steps of the run
EMA_FRACTION = 1 / 6
#: a lesion box is BOX_MARGIN x the 95th percentile lesion extent (longest bounding-box side),
#: cut on a BOX_VOXELS^3 grid: the fullres recipe's 24 mm box at 1.5 mm for nodules up to 16 mm
BOX_MARGIN = 1.5
BOX_VOXELS = 16
SPACING_STEP = 0.25  # mm: automatic box spacings are multiples of this (exact, reproducible)
SMALL_WIDTHS = (8, 16, 32, 64)
LARGE_COHORT = 2000
COARSE_MM = 4.0


@dataclasses.dataclass(frozen=True)
class Choice:
    """One automatic setting: its key path, the value chosen and why."""

    key: str
    value: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": to_plain(self.value), "reason": self.reason}


class _Resolver:
    """Applies rules to a config, skipping (and recording) the keys the user wrote."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.choices: list[Choice] = []
        self.kept: list[str] = []

    def set(self, key: str, value: Any, reason: str) -> None:
        if self.config.is_explicit(key):
            self.kept.append(key)
            return
        self.config = _replace_path(self.config, key, value)
        self.choices.append(Choice(key, value, reason))

    def get(self, key: str) -> Any:
        obj: Any = self.config
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj


def _replace_path(config: Any, key: str, value: Any) -> Any:
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _replace_path(getattr(config, head), rest, value)})


def _train_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that may inform a fitted choice: not test, not a written validation split."""
    if "split" not in df.columns:
        return df
    keep = [str(v).strip().lower() not in ("test", "val") for v in df["split"]]
    return df[np.asarray(keep, dtype=bool)]


def _grid(mm: float) -> float:
    """``mm`` rounded up to a multiple of :data:`SPACING_STEP`."""
    return max(SPACING_STEP, math.ceil(mm / SPACING_STEP - 1e-9) * SPACING_STEP)


def _snap(mm: float) -> float:
    """A voxel size read back from an affine, snapped to 0.05 mm when it is that close."""
    snapped = round(mm * 20) / 20
    return snapped if abs(snapped - mm) < 1e-3 else round(mm, 4)


# ----------------------------------------------------------------------------- the lesion box


def _image_rules(r: _Resolver, fp: Fingerprint) -> None:
    image = r.config.image
    if image is None or image.roi is None:
        return
    seen = fp.image or {}
    if seen.get("preprocessed") and not (r.config.is_explicit("image.spacing")
                                         and r.config.is_explicit("image.roi.size_mm")):
        # the box was cut by `mmai preprocess` (with these rules, or with the written values):
        # read it back so the pipeline id, and so the volumes, stay the ones preprocessed
        shape, zooms = seen["preprocessed_shape"], seen["preprocessed_spacing_mm"]
        spacing = tuple(_snap(z) for z in zooms)
        r.set("image.spacing", spacing, "the voxel size of the volumes `mmai preprocess` cut")
        sp = r.get("image.spacing")
        r.set("image.roi.size_mm", tuple(float(n * s) for n, s in zip(shape, sp, strict=True)),
              f"the box of the preprocessed volumes ({'x'.join(map(str, shape))} voxels)")
        return
    if image.roi.mask is None or fp.lesion is None:
        return
    extent = float(fp.lesion["extent_mm_p95"])
    box = BOX_MARGIN * extent
    if not r.config.is_explicit("image.roi.size_mm"):
        if not r.config.is_explicit("image.spacing"):
            s = _grid(box / BOX_VOXELS)
            r.set("image.spacing", (s, s, s),
                  f"a {BOX_VOXELS}^3-voxel lesion box: {box:.1f} mm / {BOX_VOXELS} rounded up to {SPACING_STEP} mm")
        sp = r.get("image.spacing")
        auto_spacing = not r.config.is_explicit("image.spacing")
        size = tuple(float((BOX_VOXELS if auto_spacing else math.ceil(box / p - 1e-9)) * p) for p in sp)
        r.set("image.roi.size_mm", size,
              f"{BOX_MARGIN:g} x the 95th percentile lesion extent ({extent:.1f} mm over "
              f"{fp.lesion['n_masks']} training masks), a whole number of voxels")
    elif not r.config.is_explicit("image.spacing"):
        s = _grid(max(image.roi.size_mm) / BOX_VOXELS)
        r.set("image.spacing", (s, s, s), f"the written box on a {BOX_VOXELS}^3-voxel grid")


def resolve_image(config: PipelineConfig, df: pd.DataFrame, *, base_dir: Path | None = None
                  ) -> tuple[PipelineConfig, list[Choice]]:
    """The lesion box (``image.spacing``, ``image.roi.size_mm``) from the training rows' masks,
    unless written. ``mmai preprocess`` calls this before cutting boxes (same rows as its
    intensity statistics: ``split`` not test/val), so training infers the same box back."""
    image = config.image
    if image is None or image.roi is None or image.roi.mask is None:
        return config, []
    if config.is_explicit("image.spacing") and config.is_explicit("image.roi.size_mm"):
        return config, []
    fp = fingerprint(config, _train_rows(df), base_dir=base_dir)
    r = _Resolver(config)
    _image_rules(r, fp)
    for c in r.choices:
        log.info("autoconfig: %s = %s (%s)", c.key, c.to_dict()["value"], c.reason)
    return r.config, r.choices


# ----------------------------------------------------------------------------- training


def _uses_image(config: PipelineConfig) -> bool:
    return config.image is not None and config.model.fusion != "clinical_only"


def _split_sizes(config: PipelineConfig, df: pd.DataFrame) -> tuple[list[int], Any]:
    """Training-set sizes of every split the run will fit (folds + final), and the final split."""
    from mmai.data.splits import make_splits

    t, tc = config.task, config.train
    final = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=1,
                        val_fraction=tc.val_fraction, seed=tc.seed)[0]
    sizes = [len(final.train)]
    if tc.folds > 1:
        sizes += [len(s.train) for s in make_splits(df, kind=t.kind, target=t.target, event=t.event,
                                                   folds=tc.folds, val_fraction=tc.val_fraction, seed=tc.seed)]
    return sizes, final


def _batch_size(base: int, sizes: list[int]) -> int:
    """The batch size nearest ``base`` that leaves no training set a last batch of one case."""
    for delta in (0, 1, -1, 2, -2, 3, -3, 4):
        bs = base + delta
        if bs >= 2 and all(n % bs != 1 for n in sizes):
            return bs
    return base


def _training_rules(r: _Resolver, fp: Fingerprint, sizes: list[int], n_dev: int) -> None:
    image = _uses_image(r.config)
    n = fp.n_train
    base = 16 if n >= 160 else 8
    r.set("train.batch_size", _batch_size(base, sizes),
          f"{base} for {n} training cases ({'>= 160' if base == 16 else '< 160: more steps an epoch'}), "
          "moved so that no split leaves a last batch of one case (BatchNorm cannot train on it)")
    tc = r.config.train
    if any(m % tc.batch_size == 1 for m in sizes):
        log.warning("train.batch_size = %d leaves a last batch of one case in a split of %s training cases",
                    tc.batch_size, sizes)
    steps_per_epoch = max(1, math.ceil(math.ceil(n / tc.batch_size) / tc.accumulate))
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    r.set("train.epochs", epochs,
          f"about {TARGET_STEPS} optimisation steps at {steps_per_epoch} steps an epoch "
          f"(within {MIN_EPOCHS}-{MAX_EPOCHS} epochs)")
    total = r.config.train.epochs * steps_per_epoch
    horizon = max(10, round(total * EMA_FRACTION))
    r.set("train.ema", round(1.0 - 1.0 / horizon, 4),
          f"an EMA horizon of {horizon} optimisation steps = {EMA_FRACTION:.2g} of the run's {total} steps")
    ema = r.config.train.ema
    if 0 < ema < 1 and 1 / (1 - ema) > total / 2:
        log.warning("train.ema = %s averages over ~%d optimisation steps, more than half of this run's %d: "
                    "early epochs stay close to the initial weights", ema, round(1 / (1 - ema)), total)
    r.set("train.patience", max(15, math.ceil(r.config.train.epochs / 3)),
          "a third of the epochs (at least 15): two EMA horizons without a better validation score")
    r.set("train.weight_decay", 0.05, "the measured recipes (demo, benchmarks/fullres.py) for a few hundred cases")
    if image:
        if r.config.model.encoder == "resnet" and n < LARGE_COHORT:
            r.set("model.widths", SMALL_WIDTHS,
                  f"a small ResNet for fewer than {LARGE_COHORT} training cases (the measured recipes)")
        _augment_rule(r)
    if r.config.train.folds == 1 and n_dev < 150:
        log.info("autoconfig: %d development cases: `--folds 5` trains a fold ensemble (6 trainings) and "
                 "reports the spread over folds", n_dev)


def _augment_rule(r: _Resolver) -> None:
    cfg = r.config
    image = cfg.image
    if image is None:
        return
    if cfg.is_explicit("image.augment") or any(p.startswith("image.augment.") for p in cfg.explicit):
        r.kept.append("image.augment")
        return
    a = image.augment
    if image.roi is not None:
        value = dataclasses.replace(a, flip=True, rotate90=True)
        reason = "a lesion box has no preferred orientation: flips on 3 axes + 90-degree turns"
    elif image.size is not None and image.spacing is not None and min(image.spacing) >= COARSE_MM:
        value = dataclasses.replace(a, translate=1)
        reason = (f"a coarse fixed grid (>= {COARSE_MM:g} mm): whole-voxel shifts, so a structure is seen at "
                  "every grid offset")
    else:
        value = dataclasses.replace(a, flip=True)
        reason = "mirroring on 3 axes (nnU-Net's default)"
    r.set("image.augment", value, reason)
    if not cfg.is_explicit("model.dropout"):
        r.set("model.dropout", 0.0, "the augmentation regularises; dropout on top slowed learning in the recipes")


def _val_rule(r: _Resolver, df: pd.DataFrame, n_dev: int) -> None:
    has_val_rows = "split" in df.columns and bool((df["split"] == "val").any())
    if r.config.train.folds > 1 or has_val_rows:
        return
    frac = round(min(0.25, max(0.15, 40 / max(n_dev, 1))), 2)
    r.set("train.val_fraction", frac,
          f"at least ~40 validation cases for {n_dev} development cases (between 0.15 and 0.25)")


def autoconfigure(config: PipelineConfig, df: pd.DataFrame, *, base_dir: Path | None = None
                  ) -> tuple[PipelineConfig, dict[str, Any]]:
    """The resolved config for training on the validated manifest ``df``, and the record of what
    was chosen (``{"fingerprint", "choices": [{key, value, reason}], "kept": [keys written]}``)."""
    r = _Resolver(config)
    fp_rows = _train_rows(df)
    if _uses_image(config) and config.image is not None and config.image.roi is not None:
        _image_rules(r, fingerprint(config, fp_rows, base_dir=base_dir))
    dev = df[(df["split"] != "test").to_numpy()] if "split" in df.columns else df
    n_dev = len(dev)
    _val_rule(r, df, n_dev)
    sizes, final = _split_sizes(r.config, df)
    fp = fingerprint(r.config, df.iloc[final.train], base_dir=base_dir)
    _training_rules(r, fp, sizes, n_dev)
    for c in r.choices:
        log.info("autoconfig: %s = %s (%s)", c.key, c.to_dict()["value"], c.reason)
    if r.kept:
        log.info("autoconfig: kept as written: %s", ", ".join(sorted(set(r.kept))))
    record = {"fingerprint": fp.to_dict(), "n_development": n_dev, "choices": [c.to_dict() for c in r.choices],
              "kept": sorted(set(r.kept))}
    return r.config, record


# ----------------------------------------------------------------------------- selection


def resolve_select_metric(kind: str, select_metric: str, n_val: int, n_minority: int | None) -> tuple[str, str]:
    """What best-epoch selection uses on a split: ``"loss"`` or the headline metric.

    ``auto``: the validation loss for regression, and for a SMALL validation set (fewer than
    :data:`SMALL_VAL_CASES` cases, or fewer than :data:`SMALL_VAL_EVENTS` cases of its rarest
    class / events): one AUROC or C-index on a few dozen cases moves by +-0.1 from epoch to epoch
    by chance, and the best of 30 such draws is mostly noise (docs/benchmarks.md: best epochs
    1-4); the loss uses every case's predicted probability. Otherwise the AUROC / C-index.

    Returns:
        (``"loss"`` | ``"metric"``, the reason).
    """
    if select_metric == "loss":
        return "loss", "train.select_metric: loss"
    if kind == "regression":
        return "loss", "regression selects on the validation loss"
    if select_metric == "metric":
        return "metric", "train.select_metric: metric"
    if n_val == 0:
        return "loss", "no validation rows: the training loss"
    small = n_val < SMALL_VAL_CASES or (n_minority is not None and n_minority < SMALL_VAL_EVENTS)
    what = "events" if kind == "survival" else "cases of the rarest class"
    if small:
        return "loss", (f"small validation set ({n_val} cases, {n_minority} {what}; < {SMALL_VAL_CASES} "
                        f"or < {SMALL_VAL_EVENTS}): its {'C-index' if kind == 'survival' else 'AUROC'} is noise")
    return "metric", f"validation set of {n_val} cases, {n_minority} {what}"


def val_minority(kind: str, targets: dict[str, np.ndarray]) -> int | None:
    """Cases of the rarest class (classification) or events (survival) in encoded targets."""
    if kind in ("binary", "multiclass") and "target" in targets and len(targets["target"]):
        _, counts = np.unique(np.asarray(targets["target"]), return_counts=True)
        return int(counts.min()) if len(counts) > 1 else 0
    if kind == "survival" and "event" in targets:
        return int(np.asarray(targets["event"]).astype(bool).sum())
    return None
