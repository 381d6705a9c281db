"""The statistician's model as a frozen base term: a penalised GLM on the clinical features.

Every fusion with a clinical path adds :class:`GLMTerm` to its output (``model.base: glm``):
a linear predictor on the design matrix a statistician would feed a logistic regression,
fitted once on the training rows before the deep model trains and then frozen (buffers, so it
travels in model.safetensors). The deep clinical model and the image enter as residuals whose
last layer starts at zero, so the initial model *is* the GLM and training has to earn every
change (docs/models.md "The GLM base term").

Design matrix (:meth:`GLMTerm.design`), from the clinical preprocessor's ``values`` / ``mask``:

- numeric feature (numeric, binary, ordinal columns): the preprocessed value (0 where missing);
- categorical feature with cardinality K: K one-hot columns of the level index (index 0 = the
  unknown bucket; all zero where missing);
- one missing indicator per feature (1 = missing).

Fitting (:func:`fit_glm`), penalty chosen by inner cross-validation on the training rows:

- binary / multiclass: scikit-learn ``LogisticRegressionCV`` (L2, lbfgs, multinomial for K > 2),
  stratified folds, scored by log-loss;
- regression: ``RidgeCV`` on the standardised target the trainer uses (efficient leave-one-out);
- survival: ridge Cox PH (Breslow ties, :mod:`mmai.models.ridge_cox`), folds stratified by
  event, scored by the cross-validated partial likelihood (Verweij & van Houwelingen 1993).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmai.clinical.preprocess import FeatureSpec
from mmai.errors import ConfigError

log = logging.getLogger(__name__)

#: ``model.base`` values: ``glm`` (the default in a pipeline) or ``none`` (no base term, the deep model alone)
BASES: tuple[str, ...] = ("glm", "none")
#: inverse penalties tried for logistic regression (scikit-learn's C)
LOGISTIC_CS = np.logspace(-4, 4, 17)
#: ridge penalties tried for linear regression (scikit-learn's alpha, on the summed squared error)
RIDGE_ALPHAS = np.logspace(-3, 5, 17)
#: ridge penalties tried for Cox PH (on the mean negative log partial likelihood, lifelines' ``penalizer``)
COX_PENALTIES = tuple(np.logspace(-4, 1, 11).tolist())
MAX_FOLDS = 5


def check_base(base: str) -> str:
    """``base`` if it is one of :data:`BASES`, else a :class:`~mmai.errors.ConfigError`."""
    if base not in BASES:
        raise ConfigError(f"model.base = {base!r} is not allowed; choose one of {list(BASES)}")
    return base


class GLMTerm(nn.Module):
    """Frozen linear predictor on the one-hot + missing-indicator design of the clinical features.

    ``forward(values (B, F), mask (B, F)) -> (B, n_outputs) = design(values, mask) @ weight + bias``.
    ``weight`` (D, n_outputs) and ``bias`` (n_outputs,) are persistent buffers: zero until
    :func:`fit_base_term` sets them, never touched by the optimizer, saved with the model.

    Args:
        feature_specs: the clinical preprocessor's feature specs (F entries, column order).
        n_outputs: raw output width of the task.

    Attributes:
        n_design: D, the number of design columns.
        column_names: the D design column names (``age``, ``sex=2``, ``age__missing``, ...).
    """

    weight: Tensor
    bias: Tensor
    num_idx: Tensor
    cat_idx: Tensor
    cat_offset: Tensor
    cat_card: Tensor
    cat_slots: Tensor

    def __init__(self, feature_specs: Sequence[FeatureSpec], n_outputs: int) -> None:
        super().__init__()
        specs = list(feature_specs)
        if not specs:
            raise ConfigError("the GLM base term needs at least one clinical feature (the clinical: section is empty)")
        num_idx = [i for i, s in enumerate(specs) if s.kind == "numeric"]
        cat_idx = [i for i, s in enumerate(specs) if s.kind == "categorical"]
        cards = [max(1, specs[i].cardinality) for i in cat_idx]
        offsets = np.concatenate([[0], np.cumsum(cards)[:-1]]).astype(int).tolist() if cards else []
        self.register_buffer("num_idx", torch.tensor(num_idx, dtype=torch.long), persistent=False)
        self.register_buffer("cat_idx", torch.tensor(cat_idx, dtype=torch.long), persistent=False)
        self.register_buffer("cat_offset", torch.tensor(offsets, dtype=torch.long), persistent=False)
        self.register_buffer("cat_card", torch.tensor(cards, dtype=torch.long), persistent=False)
        self.register_buffer("cat_slots", torch.arange(sum(cards), dtype=torch.long), persistent=False)
        self.column_names = ([specs[i].name for i in num_idx]
                             + [f"{specs[i].name}={k}" for i, c in zip(cat_idx, cards, strict=True) for k in range(c)]
                             + [f"{s.name}__missing" for s in specs])
        self.n_design = len(self.column_names)
        self.n_outputs = n_outputs
        self.register_buffer("weight", torch.zeros(self.n_design, n_outputs))
        self.register_buffer("bias", torch.zeros(n_outputs))

    def design(self, values: Tensor, mask: Tensor) -> Tensor:
        """The design matrix. values, mask: (B, F) -> (B, D) float (D = :attr:`n_design`)."""
        observed = mask > 0.5                                                  # (B, F)
        obs = observed.to(self.weight.dtype)
        values = torch.where(observed, values, torch.zeros_like(values)).to(self.weight.dtype)
        parts = [values[:, self.num_idx]]                                      # (B, Fn)
        if self.cat_idx.numel():
            idx = values[:, self.cat_idx].round().long()                       # (B, Fc)
            idx = torch.where((idx >= 0) & (idx < self.cat_card), idx, torch.zeros_like(idx))
            hit = (idx + self.cat_offset)[:, :, None] == self.cat_slots       # (B, Fc, sum K)
            parts.append((hit.to(obs.dtype) * obs[:, self.cat_idx, None]).sum(dim=1))  # (B, sum K)
        parts.append(1.0 - obs)                                                # (B, F)
        return torch.cat(parts, dim=1)

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        """values, mask: (B, F) -> linear predictor (B, n_outputs), in float32 also under autocast
        (a bf16 matmul would round the fitted GLM's predictions)."""
        if torch.is_autocast_enabled(values.device.type):
            with torch.autocast(values.device.type, enabled=False):
                return self.design(values.float(), mask.float()) @ self.weight + self.bias
        return self.design(values, mask) @ self.weight + self.bias

    @torch.no_grad()
    def set_coefficients(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Store fitted coefficients: weight (D, n_outputs), bias (n_outputs,)."""
        w = torch.as_tensor(np.asarray(weight, dtype=np.float64), dtype=self.weight.dtype)
        b = torch.as_tensor(np.asarray(bias, dtype=np.float64), dtype=self.bias.dtype)
        if w.shape != self.weight.shape or b.shape != self.bias.shape:
            raise ValueError(f"GLM coefficients of shape {tuple(w.shape)}, {tuple(b.shape)}; this model needs "
                             f"{tuple(self.weight.shape)}, {tuple(self.bias.shape)}")
        self.weight.copy_(w.to(self.weight.device))
        self.bias.copy_(b.to(self.bias.device))


# ----------------------------------------------------------------------------- fitting


def _n_folds(counts: Sequence[int]) -> int:
    """Inner CV folds: at most 5, at most the smallest stratum's size (0/1 = no CV possible)."""
    return int(min(MAX_FOLDS, *counts)) if len(counts) else 0


def _fit_logistic(x: np.ndarray, y: np.ndarray, n_outputs: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    folds = _n_folds(np.bincount(y.astype(int)).tolist())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # lbfgs convergence notes on separable data
        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            model = LogisticRegressionCV(Cs=LOGISTIC_CS, l1_ratios=(0.0,), cv=cv, scoring="neg_log_loss", tol=1e-6,
                                         max_iter=5000, use_legacy_attributes=False).fit(x, y)
            c, score = float(model.C_), float(np.max(model.scores_.mean(axis=0)))
        else:
            c, score = 1.0, None
            model = LogisticRegression(C=c, max_iter=5000, tol=1e-6).fit(x, y)
    coef, intercept = model.coef_, model.intercept_  # (1 or K, D), (1 or K,)
    if n_outputs == 1 and coef.shape[0] != 1:
        raise ValueError(f"binary task but {coef.shape[0]} logistic coefficient rows")
    summary = {"model": "logistic" if n_outputs == 1 else "multinomial logistic", "penalty": "l2",
               "C": c, "cv_metric": "log_loss", "cv_score": -score if score is not None else None, "folds": folds}
    return coef.T, intercept, summary


def _fit_ridge(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.linear_model import RidgeCV

    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(x, y)
    summary = {"model": "ridge linear (standardised target)", "penalty": "l2", "alpha": float(model.alpha_),
               "cv_metric": "mse (leave-one-out)", "cv_score": -float(model.best_score_), "folds": len(y)}
    return model.coef_[:, None], np.array([model.intercept_]), summary


def _fit_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from mmai.models.ridge_cox import cross_validate_penalty, fit_ridge_cox

    event = (event > 0).astype(int)
    folds = _n_folds(np.bincount(event, minlength=2).tolist())
    if folds >= 2 and event.sum() >= 2:
        lam, score = cross_validate_penalty(x, time, event, COX_PENALTIES, folds=folds, seed=seed)
    else:
        lam, score = 0.1, None
    beta = fit_ridge_cox(x, time, event, lam)
    summary = {"model": "cox ph (breslow ties)", "penalty": "l2", "penalizer": float(lam),
               "cv_metric": "cross-validated partial log-likelihood per event", "cv_score": score, "folds": folds}
    return beta[:, None], np.zeros(1), summary


def fit_glm(kind: str, x: np.ndarray, targets: dict[str, np.ndarray], n_outputs: int, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit the penalised GLM of a task on a design matrix.

    Args:
        kind: ``binary``, ``multiclass``, ``regression`` or ``survival``.
        x: (N, D) design matrix of the training rows.
        targets: the trainer's encoded targets: ``target`` (N,) (class index / standardised
            value) or ``time`` and ``event`` (N,).
        n_outputs: raw output width (1, or K classes).
        seed: shuffles the inner cross-validation folds.
    Returns:
        weight (D, n_outputs), bias (n_outputs,) and a JSON-able summary (model, penalty, CV score).
    """
    x = np.asarray(x, dtype=np.float64)
    if kind in ("binary", "multiclass"):
        weight, bias, summary = _fit_logistic(x, np.asarray(targets["target"]).astype(int), n_outputs, seed)
    elif kind == "regression":
        weight, bias, summary = _fit_ridge(x, np.asarray(targets["target"], dtype=np.float64))
    elif kind == "survival":
        weight, bias, summary = _fit_cox(x, np.asarray(targets["time"], dtype=np.float64),
                                         np.asarray(targets["event"], dtype=np.float64), seed)
    else:
        raise ConfigError(f"task.kind {kind!r} has no GLM; allowed: binary, multiclass, regression, survival")
    return weight, bias, {**summary, "n_train": int(len(x)), "n_features": int(x.shape[1])}


def glm_term(model: nn.Module) -> GLMTerm | None:
    """The model's :class:`GLMTerm` (None for ``model.base: none`` or a model without a clinical path)."""
    term = getattr(model, "glm", None)
    return term if isinstance(term, GLMTerm) else None


def fit_base_term(model: nn.Module, kind: str, values: np.ndarray, mask: np.ndarray,
                  targets: dict[str, np.ndarray], seed: int = 0) -> dict[str, Any] | None:
    """Fit the model's GLM base term on the training rows and freeze it into its buffers.

    Args:
        model: a fusion model (does nothing and returns None if it has no :class:`GLMTerm`).
        kind: the task kind.
        values, mask: (N, F) the clinical preprocessor's output for the training rows.
        targets: the trainer's encoded training targets (see :func:`fit_glm`).
        seed: inner cross-validation seed.
    Returns:
        The summary (model, penalty, CV score, n_features, n_train), or None.
    """
    term = glm_term(model)
    if term is None:
        return None
    with torch.no_grad():
        x = term.design(torch.as_tensor(values, dtype=torch.float32, device=term.weight.device),
                        torch.as_tensor(mask, dtype=torch.float32, device=term.weight.device)).cpu().numpy()
    weight, bias, summary = fit_glm(kind, x, targets, term.n_outputs, seed)
    term.set_coefficients(weight, bias)
    log.info("GLM base term: %s, %s, %d design columns, %d training rows", summary["model"],
             {k: summary[k] for k in ("C", "alpha", "penalizer") if k in summary}, summary["n_features"],
             summary["n_train"])
    return summary
