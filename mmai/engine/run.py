"""``mmai train``: from a manifest + pipeline to a run folder (one split or K folds).

``train_from_files`` is what ``mmai train`` calls. It writes RUN_DIR/config.yaml (resolved),
model.safetensors (best validation epoch), state.json (everything inference needs:
clinical preprocessor, target encoding, image pipeline, model constructor arguments, versions),
metrics.json (validation and held-out test metrics with bootstrap CIs over patients; test rows
are never used for fitting or selection), log.jsonl (one line per epoch), plots/, ckpt/ (the
resume checkpoint) and, for K-fold runs, folds/foldK/ and oof_predictions.csv.

Under ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmai.config import PipelineConfig, load_config
from mmai.data.collate import PadCollate
from mmai.data.descriptors import attach_run_descriptors, resolve_mask_paths, run_descriptor_state
from mmai.data.splits import Split, make_splits
from mmai.engine import distributed as ddp
from mmai.engine.autoconfig import autoconfigure, resolve_select_metric, val_minority
from mmai.engine.checkpoint import CheckpointStore
from mmai.engine.data import oof_frame, shard_loader, train_loader
from mmai.engine.distributed import DistInfo, distributed_session
from mmai.engine.loop import build_engine, fit
from mmai.engine.prepare import TargetEncoding, build_dataset, feature_specs, fit_clinical
from mmai.engine.run_files import model_digest, write_run
from mmai.engine.survival import baseline_state
from mmai.engine.trainer import evaluate_outputs, headline, predict_outputs
from mmai.errors import CheckpointError, ConfigError
from mmai.io.manifest import load_manifest
from mmai.models.glm import fit_base_term
from mmai.models.heads import n_outputs_for
from mmai.models.pretrained import apply_pretrained
from mmai.models.registry import create_model
from mmai.transforms.pipelines import augment_transforms, background_value, image_channels
from mmai.utils import atomic_write_json, resolve_device, seed_everything

log = logging.getLogger(__name__)


def _settings(config: PipelineConfig, split: Split) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed (JSON round-tripped)."""
    return json.loads(json.dumps({"config": config.to_dict(), "split": split.name,
                                  "rows": [len(split.train), len(split.val), len(split.test)]}))


def _build_model(config: PipelineConfig, kind: str, n_classes: int, pre: Any) -> tuple[torch.nn.Module, dict]:
    mc = config.model
    in_channels = image_channels(config.image) if config.image is not None else 1
    kwargs: dict[str, Any] = dict(n_outputs=n_outputs_for(kind, n_classes), in_channels=in_channels,
                                  encoder=mc.encoder, widths=list(mc.widths), dim=mc.dim, heads=mc.heads,
                                  layers=mc.layers, dropout=mc.dropout, clinical_encoder=mc.clinical_encoder,
                                  windows=dataclasses.asdict(mc.windows) if mc.windows else None,
                                  bidirectional=mc.bidirectional, base=mc.base)
    if mc.fusion == "image_only" and pre is not None:  # its features are image descriptors (mmai.data.focal)
        kwargs["image_features"] = True
    try:
        model = create_model(mc.fusion, feature_specs=feature_specs(pre), **kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if model.uses_image and config.image is None:
        raise ConfigError(f"--fusion {mc.fusion} needs images, but the pipeline has image: null")
    return model, kwargs


def _evaluate_final(model: torch.nn.Module, config: PipelineConfig, frames: dict[str, pd.DataFrame],
                    loaders: dict[str, Any], enc: TargetEncoding, info: DistInfo) -> tuple[dict, dict]:
    """Metrics (bootstrap CIs over patients) and raw outputs of the kept model on val and test."""
    metrics: dict[str, Any] = {}
    outputs: dict[str, torch.Tensor] = {}
    for part, loader in loaders.items():
        out, tgt = predict_outputs(model, loader, info.device, None, info)
        df = frames[part]
        groups = df["patient_id"].astype(str).to_numpy() if "patient_id" in df else None
        metrics[part] = evaluate_outputs(config.task.kind, out, tgt, enc.classes, n_boot=1000,
                                         seed=config.train.seed, groups=groups)
        outputs[part] = out
    return metrics, outputs


def train_split(config: PipelineConfig, df: pd.DataFrame, split: Split, out_dir: Path, *, device: str,
                resume: bool = False, progress: bool = True, autoconfig: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Fit preprocessing + model on one split; write the run folder; return metrics.
    ``autoconfig``: the record of the self-configured settings (into metrics.json and state.json)."""
    with distributed_session(device) as info:
        return _train_split(config, df, split, Path(out_dir), info=info, resume=resume, progress=progress,
                            autoconfig=autoconfig)


def _train_split(config: PipelineConfig, df: pd.DataFrame, split: Split, out_dir: Path, *, info: DistInfo,
                 resume: bool, progress: bool, autoconfig: dict[str, Any] | None = None) -> dict[str, Any]:
    seed_everything(config.train.seed)
    kind, tc = config.task.kind, config.train
    frames = {name: df.iloc[idx].reset_index(drop=True)
              for name, idx in (("train", split.train), ("val", split.val), ("test", split.test))}
    enc = TargetEncoding.fit(config, frames["train"])
    pre = fit_clinical(config, frames["train"])
    model, model_kwargs = _build_model(config, kind, len(enc.classes), pre)
    pretrained = apply_pretrained(model, config)  # model.pretrained (None when unset)
    uses_image = bool(model.uses_image)
    data_seed = tc.seed + info.rank  # ranks augment differently; one process: the configured seed
    aug = augment_transforms(config.image, seed=data_seed) if uses_image and config.image else None
    train_ds = build_dataset(config, frames["train"], pre=pre, uses_image=uses_image,
                             targets=enc.encode(config, frames["train"]), augment=aug,
                             image_dropout=config.model.image_dropout, seed=data_seed)
    datasets = {p: build_dataset(config, frames[p], pre=pre, uses_image=uses_image,
                                 targets=enc.encode(config, frames[p]), loader=train_ds.loader)
                for p in ("val", "test") if len(frames[p])}
    for ds in (train_ds, *datasets.values()):
        ds.preload(progress=progress and info.is_main)
    # the frozen GLM base term (model.base: glm): fitted on the training rows' clinical features, as fed to the model
    glm_summary = fit_base_term(model, kind, train_ds.clinical, train_ds.clinical_mask, train_ds.targets,
                                seed=tc.seed)
    # channels-last 5-D weights (torch's stubs omit Module.to's memory_format keyword)
    model.to(info.device, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    wrapped = ddp.wrap_model(model, info, find_unused=False)
    collate = PadCollate(background_value(config.image)) if uses_image and config.image else None
    loader, generator = train_loader(train_ds, tc.batch_size, info, tc.seed, tc.num_workers, collate=collate)
    evals = {p: shard_loader(ds, tc.batch_size, info, tc.num_workers, collate=collate) for p, ds in datasets.items()}
    select, why = resolve_select_metric(kind, tc.select_metric, len(frames["val"]),
                                        val_minority(kind, enc.encode(config, frames["val"])))
    log.info("%s: best epoch selected on the validation %s (%s)", split.name, "loss" if select == "loss" else
             headline(kind), why)
    eng = build_engine(wrapped, model, config, loader, evals.get("val"), info=info, kind=kind, classes=enc.classes,
                       generator=generator, train_ds=train_ds, select_metric="loss" if select == "loss" else "auto")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    result = fit(eng, ckpt_dir=out_dir / "ckpt", resume=resume, log_path=out_dir / "log.jsonl", progress=progress,
                 settings=_settings(config, split))
    model.load_state_dict(result.best_state)
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "n_train": len(frames["train"]),
                               "n_val": len(frames["val"]), "n_test": len(frames["test"]),
                               "fusion": config.model.fusion, "split": split.name, "world_size": info.world,
                               "selection": {"on": "val_loss" if select == "loss" else f"val_{headline(kind)}",
                                             "reason": why}}
    if pretrained is not None:
        metrics["pretrained"] = pretrained
    if autoconfig is not None:
        metrics["autoconfig"] = autoconfig
    if glm_summary is not None:
        metrics["glm"] = {**glm_summary, "initial_validation": result.initial}
    part_metrics, outputs = _evaluate_final(model, config, frames, evals, enc, info)
    metrics.update(part_metrics)
    _check_ranks_agree(metrics, model, info)
    extra_state: dict[str, Any] = run_descriptor_state(config)  # which lesion descriptors it used
    if autoconfig is not None:
        extra_state["autoconfig"] = autoconfig
    if glm_summary is not None:
        extra_state["glm"] = glm_summary
    if kind == "survival":  # Breslow baseline hazard on the (unaugmented) training rows, in state.json
        fit_ds = build_dataset(config, frames["train"], pre=pre, uses_image=uses_image,
                               targets=enc.encode(config, frames["train"]), loader=train_ds.loader)
        out, tgt = predict_outputs(model, shard_loader(fit_ds, tc.batch_size, info, tc.num_workers, collate=collate),
                                   info.device, None, info)
        extra_state.update(baseline_state(out, tgt))
    if info.is_main:  # DONE is written last: a run folder with DONE has its complete state
        oof = oof_frame(config, frames["val"], outputs["val"], enc, split.name) if "val" in outputs else None
        write_run(out_dir, config, model, model_kwargs, enc, pre, metrics, result, oof=oof, loader=train_ds.loader,
                  extra_state=extra_state)
    return metrics


def _check_ranks_agree(metrics: dict[str, Any], model: torch.nn.Module, info: DistInfo) -> None:
    """Record every rank's weight and metrics digests in ``metrics`` (equal on a healthy DDP run;
    a difference is logged as an error)."""
    text = json.dumps(metrics, sort_keys=True, default=str).encode()
    mine = (model_digest(model), hashlib.sha1(text).hexdigest())
    ranks = ddp.gather_objects(mine, info)
    if len(set(ranks)) > 1:
        log.error("DDP ranks disagree (weights, metrics digests per rank): %s", ranks)
    metrics["rank_weight_digests"] = [w for w, _ in ranks]
    metrics["rank_metrics_digests"] = [m for _, m in ranks]


def apply_overrides(config: PipelineConfig, *, fusion: str | None = None, epochs: int | None = None,
                    folds: int | None = None, amp: str | None = None) -> PipelineConfig:
    """The config with the command line's overrides applied (validated)."""
    model, train = config.model, config.train
    if fusion is not None:
        model = dataclasses.replace(model, fusion=fusion)
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {epochs}")
        train = dataclasses.replace(train, epochs=epochs)
    if folds is not None:
        if folds < 1:
            raise ConfigError(f"--folds must be >= 1, got {folds}")
        train = dataclasses.replace(train, folds=folds)
    if amp is not None:
        if amp not in ("bf16", "fp16", "off"):
            raise ConfigError(f"--amp {amp!r} is not allowed; choose bf16, fp16 or off")
        train = dataclasses.replace(train, amp=amp)  # type: ignore[arg-type]  # checked just above
    written = [k for k, v in (("model.fusion", fusion), ("train.epochs", epochs), ("train.folds", folds),
                              ("train.amp", amp)) if v is not None]
    return config.replace(model=model, train=train).mark_explicit(*written)


def _run_fold(config: PipelineConfig, df: pd.DataFrame, split: Split, fold_dir: Path, *, device: str,
              resume: bool, progress: bool, autoconfig: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cross-validation fold: skipped when finished (resume), continued from its checkpoint
    when it has one, else trained from the start."""
    if resume and (fold_dir / "DONE").exists():
        log.info("cross-validation %s: finished before, skipped", split.name)
        return json.loads((fold_dir / "metrics.json").read_text())
    log.info("cross-validation %s: %d train / %d val", split.name, len(split.train), len(split.val))
    return train_split(config, df, split, fold_dir, device=device, progress=progress,
                       resume=resume and CheckpointStore(fold_dir / "ckpt").exists(), autoconfig=autoconfig)


def _train_kfold(config: PipelineConfig, df: pd.DataFrame, out_dir: Path, *, device: str, resume: bool,
                 progress: bool, autoconfig: dict[str, Any] | None = None) -> dict[str, Any]:
    t = config.task
    splits = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=config.train.folds,
                         val_fraction=config.train.val_fraction, seed=config.train.seed)
    if resume and not any((out_dir / "folds" / s.name).exists() for s in splits):
        raise CheckpointError(f"--resume: no cross-validation folds in {out_dir / 'folds'}")
    cv = [_run_fold(config, df, s, out_dir / "folds" / s.name, device=device, resume=resume, progress=progress,
                    autoconfig=autoconfig) for s in splits]
    final = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=1,
                        val_fraction=config.train.val_fraction, seed=config.train.seed)[0]
    metrics = train_split(config, df, final, out_dir, device=device, progress=progress,
                          resume=resume and CheckpointStore(out_dir / "ckpt").exists(), autoconfig=autoconfig)
    head = headline(t.kind)
    vals = [v for v in (m.get("val", {}).get(head) for m in cv) if v is not None]
    metrics["cv"] = {"folds": [m.get("val") for m in cv], f"mean_{head}": float(np.mean(vals)) if vals else None,
                     f"std_{head}": float(np.std(vals)) if vals else None,
                     "spread": fold_spread(cv)}
    if ddp.current().is_main:
        atomic_write_json(out_dir / "metrics.json", {**json.loads((out_dir / "metrics.json").read_text()),
                                                     "cv": metrics["cv"]})
        parts = [pd.read_csv(out_dir / "folds" / s.name / "val_predictions.csv") for s in splits
                 if (out_dir / "folds" / s.name / "val_predictions.csv").exists()]
        if parts:
            pd.concat(parts, ignore_index=True).to_csv(out_dir / "oof_predictions.csv", index=False)
    return metrics


def fold_spread(cv: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Spread over folds of every numeric headline metric: ``{part: {metric: {"mean", "sd",
    "folds": [per fold]}}}`` for the folds' validation rows and, where the manifest has them,
    the test rows (each fold model scored on the same test patients). ``sd`` is the sample
    standard deviation (ddof = 1; None for one fold)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for part in ("val", "test"):
        rows = [m.get(part) or {} for m in cv]
        if not any(rows):
            continue
        names = [k for k, v in rows[0].items() if isinstance(v, int | float) and not isinstance(v, bool)
                 and k not in ("n_boot", "seed", "n")]
        table: dict[str, dict[str, Any]] = {}
        for name in names:
            vals = [r.get(name) for r in rows]
            got = np.array([v for v in vals if isinstance(v, int | float)], dtype=float)
            table[name] = {"mean": float(got.mean()) if len(got) else None,
                           "sd": float(got.std(ddof=1)) if len(got) > 1 else None,
                           "folds": [None if v is None else float(v) for v in vals]}
        out[part] = table
    return out


def train(config: PipelineConfig, df: pd.DataFrame, out_dir: Path, *, device: str | None = None,
          resume: bool = False, progress: bool = True, base_dir: Path | None = None) -> dict[str, Any]:
    """Train on a validated manifest. With train.folds = K > 1, first K cross-validation runs
    (RUN_DIR/folds/foldK/, their validation predictions gathered in RUN_DIR/oof_predictions.csv),
    then the final model on all non-test rows; metrics.json gains ``cv`` (per-fold validation
    metrics, their mean, and ``spread``: mean, sd and per-fold values of every metric, see
    :func:`fold_spread`). ``resume``: continue from the checkpoints (finished folds skipped).

    Settings the config does not write are chosen from the training split's fingerprint first
    (:func:`mmai.engine.autoconfig.autoconfigure`; ``base_dir``: the manifest's folder, for
    relative lesion-mask paths); the resolved config is what RUN_DIR/config.yaml holds."""
    device = resolve_device(device)
    out_dir = Path(out_dir)
    config, record = autoconfigure(config, df, base_dir=base_dir)  # before the descriptors: it may size the box
    df = attach_run_descriptors(config, df)  # lesion descriptors as clinical columns (none without a mask)
    with distributed_session(device):
        if config.train.folds > 1:
            return _train_kfold(config, df, out_dir, device=device, resume=resume, progress=progress,
                                autoconfig=record)
        t = config.task
        split = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=1,
                            val_fraction=config.train.val_fraction, seed=config.train.seed)[0]
        if resume and not CheckpointStore(out_dir / "ckpt").exists():
            raise CheckpointError(f"--resume: no checkpoint in {out_dir / 'ckpt'}")
        return train_split(config, df, split, out_dir, device=device, resume=resume, progress=progress,
                           autoconfig=record)


def train_from_files(config_path: Path, manifest_path: Path, out_dir: Path, *, fusion: str | None = None,
                     folds: int | None = None, epochs: int | None = None, device: str | None = None,
                     resume: bool = False, progress: bool = True, amp: str | None = None) -> dict[str, Any]:
    """``mmai train``: load + validate the config and manifest, train, write RUN_DIR."""
    config = apply_overrides(load_config(config_path), fusion=fusion, epochs=epochs, folds=folds, amp=amp)
    df = resolve_mask_paths(config.image, load_manifest(manifest_path, config), Path(manifest_path).parent)
    metrics = train(config, df, Path(out_dir), device=device, resume=resume, progress=progress,
                    base_dir=Path(manifest_path).parent)
    head = headline(config.task.kind)
    summary = {k: metrics.get(k) for k in ("fusion", "best_epoch", "n_train", "n_val", "n_test", "world_size")}
    for part in ("val", "test"):
        if part in metrics:
            summary[f"{part}_{head}"] = metrics[part].get(head)
    return summary
