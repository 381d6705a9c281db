"""TensorBoard image summaries of validation overlays during training.

Every :data:`EVERY` epochs (and after epoch 1) the first :data:`N_CASES` validation cases that have
an image are explained by the model being validated: saliency (|grad x input|, the same map as
``mmai explain``) and, for cross-attention models, the [CLS] attention, drawn over the model grid
with :func:`mmai.figures.overlay.overlay_figure` (radiological convention, letters, mm positions,
colour bar, the prediction in the title). The images go to ``RUN_DIR/tensorboard/`` under
``val_overlay/<case_id>``. The cases are fixed (the validation set's order), so a map can be
followed across epochs. Nothing is computed when TensorBoard is not installed
(:meth:`mmai.engine.runlog.RunLog.write_images` only calls this when it has a writer).

Cost: one forward + one input-gradient pass per case on the model grid (no parameter gradient is
touched, no random state is drawn), so training is bit-for-bit the same with and without it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mmai.figures.overlay import MapLayer, figure_rgb, overlay_figure, prediction_title

log = logging.getLogger(__name__)

N_CASES = 2  #: validation cases drawn
EVERY = 5  #: draw at epoch 1 and every EVERY epochs


def due(epoch: int, every: int = EVERY) -> bool:
    """Whether epoch ``epoch`` gets overlays (epoch 1 and every ``every``-th)."""
    return epoch == 1 or (every > 0 and epoch % every == 0)


def validation_overlays(eng: Any, epoch: int, n_cases: int = N_CASES) -> dict[str, np.ndarray]:
    """{"val_overlay/<case_id>": (H, W, 3) uint8} for the first ``n_cases`` validation cases with an image.

    Args:
        eng: the training :class:`~mmai.engine.engine.Engine` (``val_loader``, ``eval_model``,
            ``kind``, ``classes``, ``device``).
        epoch: the epoch the model has just finished (in the titles).
        n_cases: how many cases.

    Returns:
        Empty when there is no validation set or the model reads no image.
    """
    from torch.utils.data import default_collate

    from mmai.engine.runspec import model_inputs
    from mmai.inference.explain import attention_map, saliency
    from mmai.models.heads import outputs_to_predictions

    model = eng.eval_model
    if eng.val_loader is None or not getattr(model, "uses_image", True):
        return {}
    ds = eng.val_loader.dataset
    was_training = model.training
    model.eval()
    images: dict[str, np.ndarray] = {}
    try:
        for i in range(len(ds)):
            if len(images) >= n_cases:
                break
            item = ds[i]
            if "image" not in item or float(item.get("image_present", 0.0)) <= 0:
                continue
            batch = {k: v.to(eng.device) if torch.is_tensor(v) else v
                     for k, v in default_collate([item]).items()}
            args, kw = model_inputs(model, batch)
            image, present, values, mask = args
            with torch.no_grad():
                out = model(image, present, values, mask, **kw).float().cpu()  # (1, n_outputs)
            sal = saliency(model, eng.kind, image, present, values, mask, **kw)[0].cpu().numpy()  # (D, H, W)
            layers = [MapLayer("saliency", sal, "saliency |grad x input|\nscaled to its maximum, not drawn < 0.1")]
            att = attention_map(model, tuple(image.shape[2:]))
            if att is not None:
                a = att[0].cpu().numpy()
                layers.append(MapLayer("attention", a / max(float(a.max()), 1e-12),
                                       "[CLS] attention\nscaled to its maximum, not drawn < 0.1", cmap="viridis",
                                       alpha=0.45))
            values_q = outputs_to_predictions(eng.kind, out)[0].numpy()
            truth = _true_label(eng, item)
            title = f"epoch {epoch} | " + prediction_title(str(item["case_id"]), "", eng.kind, eng.classes, values_q,
                                                            truth)
            affine = batch["affine"][0].double().cpu().numpy()
            fig = overlay_figure(image[0, 0].float().cpu().numpy(), affine, layers, title=title, row_height=2.2,
                                 dpi=72)
            images[f"val_overlay/{item['case_id']}"] = figure_rgb(fig)
    finally:
        model.train(was_training)
    return images


def _true_label(eng: Any, item: dict[str, Any]) -> str | None:
    if "target" not in item or eng.kind not in ("binary", "multiclass"):
        return None
    k = int(float(item["target"]))
    return str(eng.classes[k]) if 0 <= k < len(eng.classes) else None
