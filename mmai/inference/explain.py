"""Explanations: 3D saliency and attention maps (NIfTI, in the model input's geometry) and
clinical attributions.

Per case, in ``OUT``:

- ``<case>_saliency.nii.gz``: |gradient x input| of the model's score (positive-class logit,
  log-risk or regression value) with respect to the image, normalised to [0, 1];
- ``<case>_attention.nii.gz`` (cross-attention models): the [CLS] query's attention over image
  tokens, upsampled to the input grid;
- ``<case>_overview.png`` (first :data:`MAX_PNG` cases): three orthogonal slices through the
  saliency peak, the map over the image;
- ``clinical_attributions.csv``: case_id, feature, observed, attribution, where attribution is
  score(all values) - score(this feature set to missing): what the value added relative to not
  knowing it (the model's learned missing token is the reference).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from mmai.errors import MmaiError
from mmai.utils import atomic_path

log = logging.getLogger(__name__)

MAX_PNG = 20


def _score(out: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, n_outputs) -> (B,) the scalar that is explained."""
    if kind == "multiclass":
        return out.max(dim=1).values
    return out[:, 0]


def _save_map(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(tmp))


def clinical_attributions(model: torch.nn.Module, kind: str, image: torch.Tensor | None, present: torch.Tensor,
                          values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, F) score(all) - score(feature f missing), for observed features (0 where missing)."""
    with torch.no_grad():
        base = _score(model(image, present, values, mask), kind)  # (B,)
        out = torch.zeros_like(values)
        for f in range(values.shape[1]):
            m = mask.clone()
            m[:, f] = 0
            out[:, f] = (base - _score(model(image, present, values, m), kind)) * mask[:, f]
    return out


def saliency(model: torch.nn.Module, kind: str, image: torch.Tensor, present: torch.Tensor, values: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
    """|d score / d image * image| per case, normalised to [0, 1]: (B, D, H, W)."""
    x = image.clone().requires_grad_(True)
    score = _score(model(x, present, values, mask), kind).sum()
    (grad,) = torch.autograd.grad(score, x)
    sal = (grad * x).abs().sum(dim=1).detach()  # (B, D, H, W)
    peak = sal.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return sal / peak[:, None, None, None]


def attention_map(model: Any, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The [CLS] attention over image tokens from the last forward pass, upsampled: (B, *shape)."""
    att = getattr(model, "last_attention", None)
    grid = getattr(model, "last_grid", None)
    if att is None or grid is None:
        return None
    cls_to_img = att[:, 0, 1:]  # (B, N) - key 0 is the missing-image token
    vol = cls_to_img.reshape(-1, 1, *grid)
    return F.interpolate(vol, size=shape, mode="trilinear", align_corners=False)[:, 0]


def explain_cases(predictor: Any, df: pd.DataFrame, out_dir: Path, *, progress: bool = True) -> Path:
    """Write maps and clinical attributions for every case of ``df``; returns the CSV path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, kind = predictor.model, predictor.encoding.kind
    rows: list[dict[str, Any]] = []
    names = predictor.pre.feature_names if predictor.pre is not None else []
    n_png = 0
    for i in tqdm(range(len(df)), desc="explain", unit="case", disable=not progress):
        case = df.iloc[i : i + 1]
        cid = str(case["case_id"].iloc[0])
        errors: list[dict[str, str]] = []
        values, mask, ok = predictor._clinical(case, errors)
        if not ok[0]:
            continue
        v = torch.from_numpy(values).to(predictor.device)
        m = torch.from_numpy(mask).to(predictor.device)
        image, present, affine = None, torch.zeros(1, device=predictor.device), None
        path = case[predictor.config.image.column].iloc[0] if predictor.uses_image else None
        if predictor.uses_image and isinstance(path, str | list):
            try:
                arr, affine = predictor.loader.load(path)
            except MmaiError as exc:
                log.warning("explain: case %s skipped: %s", cid, exc)
                continue
            image = torch.from_numpy(arr[None]).to(predictor.device)
            present = torch.ones(1, device=predictor.device)
        elif predictor.uses_image:
            image = torch.zeros((1, 1, *predictor.config.image.size), device=predictor.device)
        if image is not None and affine is not None:
            sal = saliency(model, kind, image, present, v, m)[0].cpu().numpy()
            _save_map(sal, affine, out_dir / f"{cid}_saliency.nii.gz")
            att = attention_map(model, tuple(predictor.config.image.size))
            if att is not None:
                att_np = att[0].cpu().numpy()
                _save_map(att_np / max(float(att_np.max()), 1e-12), affine, out_dir / f"{cid}_attention.nii.gz")
            if n_png < MAX_PNG:
                _overview_png(arr[0], sal, out_dir / f"{cid}_overview.png", cid)
                n_png += 1
        if names:
            attr = clinical_attributions(model, kind, image, present, v, m)[0].cpu().numpy()
            for f, name in enumerate(names):
                rows.append({"case_id": cid, "feature": name, "observed": int(mask[0, f]),
                             "attribution": float(attr[f])})
    csv_path = out_dir / "clinical_attributions.csv"
    with atomic_path(csv_path) as tmp:
        pd.DataFrame(rows, columns=["case_id", "feature", "observed", "attribution"]).to_csv(tmp, index=False)
    return csv_path


def _overview_png(image: np.ndarray, sal: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = np.unravel_index(int(np.argmax(sal)), sal.shape)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    views = [(image[peak[0], :, :], sal[peak[0], :, :], "sagittal"),
             (image[:, peak[1], :], sal[:, peak[1], :], "coronal"),
             (image[:, :, peak[2]], sal[:, :, peak[2]], "axial")]
    for ax, (img, s, name) in zip(axes, views, strict=True):
        ax.imshow(img.T, cmap="gray", origin="lower")
        ax.imshow(np.ma.masked_less(s.T, 0.1), cmap="inferno", alpha=0.6, origin="lower", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title}: saliency (|grad x input|) through its peak")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
