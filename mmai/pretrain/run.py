"""``mmai pretrain``: self-supervised pretraining of the image encoder on unlabelled volumes.

    mmai pretrain --config PIPELINE.yaml --manifest UNLABELLED.csv --out DIR [--epochs N] [--resume]

The volumes go through the pipeline's own loader (preprocessed NIfTI or raw inputs; whole
volumes, lesion boxes, or for ``model.windows`` pipelines random windows of ``roi_size``), the
objective is :mod:`mmai.pretrain.ssl`, and the run reuses the training engine: AdamW with the
warm-up + cosine schedule, AMP, DDP under torchrun (rank 0 writes), one atomic checkpoint
commit per epoch in DIR/ckpt (exact resume, :mod:`mmai.engine.state`), log.jsonl.

DIR holds, when finished:

- ``encoder.safetensors``: the encoder's state dict (keys as ``ImageEncoder.state_dict()``);
- ``pretrain.json`` (written last): ``format: mmai-pretrain``, encoder name, widths,
  in_channels, the image pipeline id and modality, epochs, final losses: what ``model.pretrained:
  DIR`` checks before loading;
- ``config.yaml``, ``log.jsonl`` (per epoch: loss, inpaint, contrastive, lr, seconds),
  ``plots/pretrain_loss.png``, ``ckpt/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmai.config import PipelineConfig, dump_config, load_config
from mmai.data.collate import PadCollate
from mmai.engine import distributed as ddp
from mmai.engine.checkpoint import CheckpointStore, save_weights
from mmai.engine.data import train_loader
from mmai.engine.distributed import DistInfo, all_sum, distributed_session
from mmai.engine.loop import _optimizer_step, build_engine
from mmai.engine.runlog import RunLog
from mmai.engine.state import TrainState, load_checkpoint, save_checkpoint
from mmai.engine.trainer import autocast
from mmai.errors import CheckpointError, ConfigError, ManifestError
from mmai.io.manifest import load_manifest
from mmai.models.image_encoders import create_encoder
from mmai.models.pretrained import PRETRAIN_META, PRETRAIN_WEIGHTS
from mmai.pretrain.ssl import SSLModel, build_ssl_model, random_crop, ssl_loss
from mmai.transforms.pipelines import background_value, image_channels, image_pipeline_id
from mmai.utils import atomic_write_json, resolve_device, seed_everything

log = logging.getLogger(__name__)


def pretrain_config(config: PipelineConfig, epochs: int | None = None) -> PipelineConfig:
    """The pipeline with ``pretrain`` settings in the places the training engine reads them
    (train.epochs / batch_size / lr; no EMA, no accumulation) and ``model.pretrained`` unset
    (a YAML shared with ``mmai train`` may point it at this very output)."""
    if config.image is None:
        raise ConfigError(f"{config.source}: mmai pretrain needs an image section (image: null)")
    pc = config.pretrain
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {epochs}")
        pc = dataclasses.replace(pc, epochs=epochs)
    train = dataclasses.replace(config.train, epochs=pc.epochs, batch_size=pc.batch_size, lr=pc.lr, ema=0.0,
                                accumulate=1)
    return config.replace(pretrain=pc, train=train, model=dataclasses.replace(config.model, pretrained=None))


def _unlabelled_rows(config: PipelineConfig, manifest: Path) -> Any:
    # unlabelled: no targets, and no clinical columns needed
    df = load_manifest(manifest, config.replace(clinical=None), require_targets=False, check_clinical=False)
    col = config.image.column if config.image is not None else "image"
    keep = df[df[col].notna()].reset_index(drop=True)
    if len(keep) < 2:
        raise ManifestError(f"{manifest}: mmai pretrain needs at least 2 cases with an image in column '{col}', "
                            f"found {len(keep)}")
    if len(keep) < len(df):
        log.info("pretrain: %d of %d manifest rows have no image and are skipped", len(df) - len(keep), len(df))
    return keep


def _settings(config: PipelineConfig, n: int) -> dict[str, Any]:
    return json.loads(json.dumps({"config": config.to_dict(), "rows": n, "verb": "pretrain"}))


def pretrain(config: PipelineConfig, manifest: Path, out_dir: Path, *, device: str | None = None,
             resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the pretraining (``config`` from :func:`pretrain_config`); return the summary."""
    device = resolve_device(device)
    out_dir = Path(out_dir)
    if resume and not CheckpointStore(out_dir / "ckpt").exists():
        raise CheckpointError(f"--resume: no checkpoint in {out_dir / 'ckpt'}")
    with distributed_session(device) as info:
        return _pretrain(config, manifest, out_dir, info=info, resume=resume, progress=progress)


def _pretrain(config: PipelineConfig, manifest: Path, out_dir: Path, *, info: DistInfo, resume: bool,
              progress: bool) -> dict[str, Any]:
    from mmai.engine.prepare import build_dataset

    if config.image is None:
        raise ConfigError(f"{config.source}: mmai pretrain needs an image section (image: null)")
    seed_everything(config.train.seed)
    mc, pc, img = config.model, config.pretrain, config.image
    df = _unlabelled_rows(config, manifest)
    channels = image_channels(img)
    encoder = create_encoder(mc.encoder, in_channels=channels, widths=mc.widths)
    model = build_ssl_model(encoder, channels, mc.widths)
    ds = build_dataset(config, df, pre=None, targets=None, uses_image=True)
    ds.preload(progress=progress and info.is_main)
    model.to(info.device, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    wrapped = ddp.wrap_model(model, info, find_unused=False)
    loader, generator = train_loader(ds, pc.batch_size, info, config.train.seed, config.train.num_workers,
                                     collate=PadCollate(background_value(img)))
    eng = build_engine(wrapped, model, config, loader, None, info=info, kind="pretrain", classes=[],
                       generator=generator, train_ds=ds)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out_dir / "ckpt")
    settings = _settings(config, len(df))
    runlog = RunLog(out_dir / "log.jsonl", enabled=info.is_main, tensorboard=False)
    if resume:
        state = load_checkpoint(store, eng, settings)
        log.info("resumed pretraining from %s after epoch %d", store.folder, state.epoch)
    else:
        state = TrainState()
        if info.is_main:
            store.reset()
    runlog.start(state.log_pos, state.epoch + 1)
    bar = tqdm(total=pc.epochs, initial=state.epoch, desc="pretrain", unit="epoch",
               disable=not progress or not info.is_main)
    roi = mc.windows.roi_size if mc.windows is not None else None
    with contextlib.closing(runlog), contextlib.closing(bar):
        for epoch in range(state.epoch + 1, pc.epochs + 1):
            row = _epoch(eng, epoch, state, roi, background_value(img))
            state.history.append(row)
            runlog.write(row)
            state.epoch, state.log_pos = epoch, runlog.position()
            save_checkpoint(store, eng, state, settings)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4f}" for k in ("loss", "inpaint", "contrastive")})
    summary = {"epochs": pc.epochs, "n_volumes": len(df), "world_size": info.world,
               "first_loss": state.history[0]["loss"] if state.history else None,
               "final_loss": state.history[-1]["loss"] if state.history else None}
    if info.is_main:
        _write_outputs(out_dir, config, model, state, summary)
    return summary


def _epoch(eng: Any, epoch: int, state: TrainState, roi: Any, background: float) -> dict[str, Any]:
    """One pass over this rank's volumes; the row holds losses averaged over all ranks' cases."""
    pc, loader = eng.config.pretrain, eng.train_loader
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    eng.model.train()
    t0 = time.time()
    sums = torch.zeros(3, dtype=torch.float64)
    n = 0
    eng.opt.zero_grad(set_to_none=True)
    for batch in loader:
        x = batch["image"]  # (B, C, D, H, W)
        if roi is not None:
            x = random_crop(x, roi, background)
        with autocast(eng.device, eng.amp):
            loss, parts = ssl_loss(eng.model, x.to(eng.device), mask_fraction=pc.mask_fraction,
                                   mask_size=pc.mask_size, contrastive_weight=pc.contrastive_weight,
                                   temperature=pc.temperature)
        (eng.scaler.scale(loss) if eng.scaler is not None else loss).backward()
        _optimizer_step(eng)
        state.step += 1
        b = int(x.shape[0])
        sums += torch.tensor([float(loss.detach()), float(parts["inpaint"]), float(parts["contrastive"])],
                             dtype=torch.float64) * b
        n += b
    total = all_sum([*sums.tolist(), float(n)], eng.info)
    count = total[-1] or float("nan")
    return {"epoch": epoch, "loss": total[0] / count, "inpaint": total[1] / count, "contrastive": total[2] / count,
            "lr": eng.last_lr, "seconds": round(time.time() - t0, 2), "world_size": eng.info.world}


def _write_outputs(out_dir: Path, config: PipelineConfig, model: SSLModel, state: TrainState,
                   summary: dict[str, Any]) -> None:
    """encoder.safetensors, config.yaml, plots/pretrain_loss.png, then pretrain.json (last)."""
    import mmai

    img = config.image
    if img is None:
        raise ConfigError("mmai pretrain needs an image section")
    save_weights(model.encoder.state_dict(), out_dir / PRETRAIN_WEIGHTS, metadata={"format": "mmai-pretrain"})
    dump_config(config, out_dir / "config.yaml")
    try:
        from mmai.plots import plot_training_curves

        rows = [{k: r[k] for k in ("epoch", "loss", "inpaint", "contrastive")} for r in state.history]
        plot_training_curves(rows, out_dir / "plots" / "pretrain_loss.png", title="mmai pretrain")
    except ImportError:
        log.debug("plots unavailable")
    meta = {"format": "mmai-pretrain", "version": 1, "encoder": config.model.encoder,
            "widths": list(config.model.widths), "in_channels": image_channels(img),
            "pipeline_id": image_pipeline_id(img), "modality": img.modality,
            "windows_roi_size": list(config.model.windows.roi_size) if config.model.windows else None,
            "objective": {"inpainting": "L1, random cuboids", "contrastive": "NT-Xent",
                          **dataclasses.asdict(config.pretrain)},
            "mmai_version": mmai.__version__, **summary}
    atomic_write_json(out_dir / PRETRAIN_META, meta)


def pretrain_from_files(config_path: Path, manifest_path: Path, out_dir: Path, *, epochs: int | None = None,
                        device: str | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``mmai pretrain``: load the config, pretrain on the manifest's images, write DIR."""
    config = pretrain_config(load_config(config_path), epochs=epochs)
    summary = pretrain(config, Path(manifest_path), Path(out_dir), device=device, resume=resume, progress=progress)
    return {**summary, "out": str(out_dir)}
