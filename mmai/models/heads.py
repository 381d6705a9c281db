"""Task heads and their losses: binary, multiclass, regression, survival (Cox).

A head maps a fused vector ``(B, D)`` to raw outputs ``(B, n_outputs)``; :func:`task_loss` turns
raw outputs and targets into a scalar loss; :func:`outputs_to_predictions` turns raw outputs
into the numbers written to predictions.csv.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def n_outputs_for(kind: str, n_classes: int = 2) -> int:
    """Raw output width: 1 logit (binary), K logits (multiclass), 1 value (regression, log-risk)."""
    return n_classes if kind == "multiclass" else 1


class Head(nn.Module):
    """LayerNorm -> dropout -> linear. ``(B, D) -> (B, n_outputs)``.

    ``zero_init=True`` starts the linear layer at zero, so the head outputs exactly 0 until
    training moves it (a residual term that must earn its place, as in the cross-attention
    fusion's image term).
    """

    def __init__(self, dim: int, n_outputs: int, dropout: float = 0.1, *, zero_init: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, n_outputs)
        if zero_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))


def cox_partial_likelihood(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    Args:
        risk: (B,) predicted log-hazard.
        time: (B,) follow-up time.
        event: (B,) 1 = event, 0 = censored.
    Returns:
        Scalar loss; 0 (with gradient) when the batch holds no event.
    """
    order = torch.argsort(time, descending=True)
    risk, time, event = risk[order], time[order], event[order].to(risk.dtype)
    log_cum = torch.logcumsumexp(risk, dim=0)  # log sum_{j: t_j >= t_i} exp(r_j) for sorted times
    # Breslow: tied times share the risk set of the first (largest index) among ties
    _, inverse, counts = torch.unique_consecutive(time, return_inverse=True, return_counts=True)
    last_of_group = torch.cumsum(counts, 0) - 1
    log_cum = log_cum[last_of_group[inverse]]
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((risk - log_cum) * event).sum() / n_events


def task_loss(kind: str, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Loss for ``kind`` given raw outputs ``out`` (B, n_outputs) and the batch's targets.

    Targets: ``target`` (B,) float 0/1 (binary), long class index (multiclass), standardised
    float (regression); ``time`` and ``event`` (B,) for survival.
    """
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(out[:, 0], batch["target"].float())
    if kind == "multiclass":
        return F.cross_entropy(out, batch["target"].long())
    if kind == "regression":
        return F.mse_loss(out[:, 0], batch["target"].float())
    if kind == "survival":
        return cox_partial_likelihood(out[:, 0], batch["time"].float(), batch["event"].float())
    raise ValueError(f"unknown task kind {kind!r}")


def outputs_to_predictions(kind: str, out: torch.Tensor) -> torch.Tensor:
    """Raw outputs -> probabilities (B, K) for classification; (B, 1) values otherwise."""
    if kind == "binary":
        p = torch.sigmoid(out[:, 0])
        return torch.stack([1 - p, p], dim=1)
    if kind == "multiclass":
        return torch.softmax(out, dim=1)
    return out[:, :1]
