"""One-way vs bidirectional cross-attention (``model.bidirectional``), windowed image tokens.

A synthetic task where the image and the clinical table must be read together: every volume holds
two blobs (one in each half along the first axis) of random brightness, and a clinical flag says
which blob matters; the label is 1 when that blob is brighter than the median (plus noise in the
other clinical value). Both models share everything else (sliding windows with millimetre
positions, same seed, same steps); test AUROC and training seconds per model, averaged over seeds.
The last line is JSON.

    python benchmarks/bidirectional.py [--seeds 0 1] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from mmai.clinical.preprocess import FeatureSpec
from mmai.models.heads import task_loss
from mmai.models.registry import create_model

SIZE = (24, 24, 24)


def cohort(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, *SIZE, generator=g) * 0.2
    bright = torch.rand(n, 2, generator=g)  # blob brightness, left / right
    image[:, :, 4:10, 9:15, 9:15] += bright[:, 0, None, None, None, None]
    image[:, :, 14:20, 9:15, 9:15] += bright[:, 1, None, None, None, None]
    flag = torch.randint(0, 2, (n,), generator=g)
    chosen = bright[torch.arange(n), flag]
    y = (chosen > 0.5).float()
    clinical = torch.stack([flag.float(), torch.randn(n, generator=g)], dim=1)
    return {"image": image, "clinical": clinical, "mask": torch.ones(n, 2), "present": torch.ones(n), "y": y}


def run(bidirectional: bool, seed: int, epochs: int) -> tuple[float, float]:
    tr, te = cohort(128, seed), cohort(128, seed + 1000)
    torch.manual_seed(seed)
    specs = [FeatureSpec("flag", "categorical", 2), FeatureSpec("noise", "numeric")]
    model = create_model("cross_attention", n_outputs=1, feature_specs=specs, widths=(4, 8, 8, 16), dim=32,
                         heads=2, windows={"roi_size": [16, 16, 16], "overlap": 0.5, "batch": 64},
                         bidirectional=bidirectional)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(128).split(16):
            out = model(tr["image"][idx], tr["present"][idx], tr["clinical"][idx], tr["mask"][idx])
            loss = task_loss("binary", out, {"target": tr["y"][idx]})
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        score = model(te["image"], te["present"], te["clinical"], te["mask"])[:, 0]
    return float(roc_auc_score(te["y"].numpy(), score.numpy())), train_s


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=15)
    a = ap.parse_args(argv)
    res: dict[str, dict[str, list[float]]] = {"one_way": {"auroc": [], "train_s": []},
                                              "bidirectional": {"auroc": [], "train_s": []}}
    for seed in a.seeds:
        for name in res:
            auc, secs = run(name == "bidirectional", seed, a.epochs)
            res[name]["auroc"].append(round(auc, 4))
            res[name]["train_s"].append(round(secs, 1))
    out: dict[str, object] = {name: {"auroc_mean": round(float(np.mean(v["auroc"])), 4), **v} for name, v in res.items()}
    out["seeds"] = a.seeds
    out["epochs"] = a.epochs
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
