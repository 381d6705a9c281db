"""The files of a finished run: model.safetensors, config.yaml, state.json, metrics.json,
plots/, val_predictions.csv, DONE (written last: its presence marks a complete run)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mmai.config import PipelineConfig, dump_config
from mmai.engine.checkpoint import save_weights
from mmai.engine.prepare import TargetEncoding
from mmai.utils import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def model_digest(model: torch.nn.Module) -> str:
    """SHA-1 over the names and bytes of a model's state dict (equal weights, equal digest)."""
    digest = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_run(out_dir: Path, config: PipelineConfig, model: torch.nn.Module, model_kwargs: dict[str, Any],
              enc: TargetEncoding, pre: Any, metrics: dict[str, Any], result: Any,
              oof: pd.DataFrame | None = None, loader: Any = None, extra_state: dict[str, Any] | None = None
              ) -> None:
    """Write the run folder (rank 0); ``loader`` (the training ImageLoader) supplies the fitted
    intensity statistics recorded with the image pipeline's provenance; ``extra_state`` entries
    (e.g. the survival baseline) go into state.json with the rest."""
    from mmai.engine.runspec import run_state

    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_id = f"{config.model.fusion}-{model_digest(model)[:10]}"
    save_weights(state_dict, out_dir / "model.safetensors", metadata={"format": "mmai", "model_id": model_id})
    dump_config(config, out_dir / "config.yaml")
    state = run_state(model_id=model_id, config=config, model=model, model_kwargs=model_kwargs, encoding=enc,
                      clinical=pre, loader=loader, best_epoch=result.best_epoch, extra=extra_state)
    atomic_write_json(out_dir / "state.json", state)
    atomic_write_json(out_dir / "metrics.json", {"model_id": model_id, **metrics})
    if oof is not None:
        with atomic_path(out_dir / "val_predictions.csv") as tmp:
            oof.to_csv(tmp, index=False)
    try:
        from mmai.plots import plot_training_curves

        plot_training_curves(result.history, out_dir / "plots" / "training_curves.png", best_epoch=result.best_epoch)
    except ImportError:
        log.debug("plots unavailable")
    atomic_write_text(out_dir / "DONE", model_id + "\n")
