"""A trained epoch must beat the GLM base term significantly (docs/training.md, "Best epoch").

A run whose model has a fitted GLM base term validates it as epoch 0 (the initial model is
exactly the GLM). A trained epoch replaces it as the shipped model only when it beats the GLM on
the selection score by more than Z_ONE_SIDED bootstrap standard errors of the paired difference
over the validation cases: a one-sided paired test at the 5 % level, the GLM being the simpler
model (in the spirit of Breiman's one-SE rule), Bonferroni-corrected for the number of epochs the
run has validated so far (each epoch is one more look at the same validation cases: the best of
m looks clears a 5 % test by chance far more often than 5 %, so epoch m must clear the 5 / m %
level, :func:`z_threshold`). On the small validation sets of a few hundred
patients the best of N noisy epochs beats the GLM by chance alone (measured: a nodule lesion box
picked on 40-67 validation cases fell from AUROC 0.79 to 0.57 at 100 patients without any rule;
with one SE a semi-real image-only CNN that cleared it by 0.06 / 0.06 on 67 validation cases
scored 0.572 on the test patients against the GLM's 0.592; at 1.645 SEs without the correction
the semi-real image-only residual that cleared it at epoch 11 of 13 looks scored 0.584 against the
GLM's 0.608, docs/benchmarks.md, "Fourth 2026-12-05 session"). Every rank computes the same decision
(same outputs, same seed).
"""

from __future__ import annotations

import numpy as np
import torch

from mmai.engine.trainer import evaluate_outputs, headline, selection_score
from mmai.models.heads import task_loss

N_BOOT = 100
ALPHA = 0.05  # one-sided level of the whole run's comparison with the GLM
Z_ONE_SIDED = 1.645  # the one-sided 95 % normal quantile (the first look's threshold)


def z_threshold(looks: int) -> float:
    """The one-sided normal quantile an epoch must clear after ``looks`` validated epochs: 1 - ALPHA /
    looks (Bonferroni over the looks; 1.645 at the first, 2.58 at the 10th, 2.87 at the 24th)."""
    from scipy.stats import norm

    return float(norm.ppf(1.0 - ALPHA / max(1, int(looks))))


def outputs_doc(out: torch.Tensor) -> list[list[float]]:
    """Validation outputs (N, Q) as JSON-able lists (kept in the checkpoint's counters)."""
    return out.float().tolist()


def _score(kind: str, select_metric: str, classes: list[str], out: torch.Tensor,
           targets: dict[str, torch.Tensor]) -> float | None:
    """The selection score (lower is better, :func:`selection_score`) of a set of outputs; None when
    the metric is undefined on it (e.g. one class in a resample)."""
    uses_metric = select_metric in ("auto", "metric") and kind != "regression"
    if not uses_metric:
        return float(task_loss(kind, out, targets))
    m = evaluate_outputs(kind, out, targets, classes)
    head = m.get(headline(kind))
    if head is None:
        return None
    return selection_score({"val_loss": m["loss"], f"val_{headline(kind)}": head}, kind, select_metric)


def clears_initial(kind: str, select_metric: str, classes: list[str], out: torch.Tensor,
                   targets: dict[str, torch.Tensor], initial: list[list[float]], *, seed: int = 0,
                   looks: int = 1) -> tuple[bool, float, float]:
    """Whether ``out`` beats the epoch-0 outputs by more than :func:`z_threshold` (``looks``) bootstrap
    SEs of the paired difference.

    Args:
        out: (N, Q) this epoch's validation outputs; targets: their targets (as predict_outputs gives).
        initial: :func:`outputs_doc` of epoch 0 on the same validation cases.
        looks: how many trained epochs the run has validated, this one included (its epoch number).

    Returns:
        (clears, difference, se): difference = this epoch's score minus epoch 0's (negative = better).
    """
    out0 = torch.tensor(initial, dtype=torch.float32)
    if out0.shape != out.shape:  # another validation set (cannot happen within a run): no guard
        return True, float("nan"), float("nan")
    s1 = _score(kind, select_metric, classes, out, targets)
    s0 = _score(kind, select_metric, classes, out0, targets)
    if s1 is None or s0 is None:
        return True, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n = out.shape[0]
    diffs = []
    for _ in range(N_BOOT):
        idx = torch.from_numpy(rng.integers(0, n, n))
        sub = {k: v[idx] for k, v in targets.items()}
        a, b = _score(kind, select_metric, classes, out[idx], sub), _score(kind, select_metric, classes, out0[idx], sub)
        if a is not None and b is not None:
            diffs.append(a - b)
    se = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("inf")
    diff = s1 - s0
    return bool(diff + z_threshold(looks) * se < 0), float(diff), se
