"""Patient-grouped, stratified, seeded splits.

A patient's cases always land on the same side of every split. The manifest's ``split``
column wins where present (``test`` rows are never trained on or used for model selection);
otherwise a validation part is carved out of the training rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from mmai.errors import ManifestError


@dataclass(frozen=True)
class Split:
    """Row indices (into the manifest) of one train/validation split, plus the held-out test rows."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    name: str = "main"


def _strata(df: pd.DataFrame, kind: str, target: str, event: str) -> np.ndarray | None:
    if kind in ("binary", "multiclass"):
        return df[target].astype(str).to_numpy()
    if kind == "survival":
        return df[event].astype(float).astype(int).astype(str).to_numpy()
    return None


def _grouped_holdout(idx: np.ndarray, groups: np.ndarray, strata: np.ndarray | None, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (keep, holdout) by patient, stratified where possible."""
    if fraction <= 0 or len(idx) < 4:
        return idx, idx[:0]
    n_splits = max(2, int(round(1.0 / fraction)))
    n_groups = len(np.unique(groups[idx]))
    if strata is not None and n_groups >= n_splits:
        sgk = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            keep, hold = next(sgk.split(idx, strata[idx], groups[idx]))
            return idx[keep], idx[hold]
        except ValueError:
            pass  # too few members in a stratum: fall back to an unstratified grouped split
    gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    keep, hold = next(gss.split(idx, groups=groups[idx]))
    return idx[keep], idx[hold]


def make_splits(df: pd.DataFrame, *, kind: str, target: str = "label", event: str = "event",
                folds: int = 1, val_fraction: float = 0.15, seed: int = 0) -> list[Split]:
    """Train/validation splits over the non-test rows of a validated manifest.

    Args:
        df: validated manifest (``patient_id``, targets, optional ``split``).
        kind: task kind (stratify by class, or by event for survival).
        folds: 1 = one split (the manifest's ``val`` rows, or a ``val_fraction`` carve-out);
            K > 1 = K patient-grouped stratified folds over all non-test rows.
        val_fraction: fraction of training patients held out for early stopping when folds == 1.
        seed: random seed.

    Returns:
        ``folds`` splits; every split shares the same ``test`` rows.
    """
    groups = df["patient_id"].astype(str).to_numpy()
    strata = _strata(df, kind, target, event)
    split_col = df["split"] if "split" in df.columns else pd.Series([None] * len(df))
    test = np.flatnonzero((split_col == "test").to_numpy())
    val_rows = np.flatnonzero((split_col == "val").to_numpy())
    pool = np.setdiff1d(np.arange(len(df)), test)
    _check_patients_disjoint(groups, test, pool)
    if len(pool) < 2:
        raise ManifestError(f"only {len(pool)} training case(s) after removing split == test rows; need at least 2")
    if folds > 1:
        n_groups = len(np.unique(groups[pool]))
        if n_groups < folds:
            raise ManifestError(f"--folds {folds} needs at least {folds} patients in the training rows, got {n_groups}")
        sgk = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        y = strata[pool] if strata is not None else np.zeros(len(pool), dtype=str)
        return [Split(pool[tr], pool[va], test, name=f"fold{k}")
                for k, (tr, va) in enumerate(sgk.split(pool, y, groups[pool]))]
    if len(val_rows):
        train = np.setdiff1d(pool, val_rows)
        _check_patients_disjoint(groups, val_rows, train)
        return [Split(train, val_rows, test)]
    train, val = _grouped_holdout(pool, groups, strata, val_fraction, seed)
    return [Split(np.sort(train), np.sort(val), test)]


def _check_patients_disjoint(groups: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    shared = np.intersect1d(groups[a], groups[b])
    if len(shared):
        raise ManifestError(f"patient(s) {list(shared[:5])} have cases on both sides of the manifest's split "
                            "column; a patient's cases must share one split")
