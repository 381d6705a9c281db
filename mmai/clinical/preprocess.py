"""Leak-free clinical preprocessing: fit on training rows only, save as JSON, reload at inference.

One output column per declared clinical column (so one token per feature):

- numeric: optional ``log1p``, then imputation (median or mean of the training rows) and
  scaling (``robust``: median / IQR, ``standard``: mean / std), all fitted with scikit-learn
  on the training rows (NaN ignored in the fit);
- ordinal: the level rank (0..K-1), then imputed and scaled like a numeric;
- binary: 0/1, missing filled with the training prevalence (mean), not scaled;
- categorical: the level index stored as a float: 1..K for the vocabulary (the declared
  ``levels``, else the levels seen in training at least ``min_frequency`` times, sorted),
  0 = the "unknown" bucket for anything else.

Where a value is missing the output is the fill value (numerics, already scaled) or 0
(categorical) and the mask is 0. Each row is transformed on its own: a prediction never
depends on the other rows of the prediction set.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mmai.clinical.schema import ClinicalColumn, ClinicalSchema
from mmai.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1
SCALINGS = ("robust", "standard")
IMPUTES = ("median", "mean")


@dataclass(frozen=True)
class FeatureSpec:
    """What a model needs to know about one preprocessed feature.

    Attributes:
        name: the clinical column.
        kind: ``numeric`` (a float; numeric, binary and ordinal columns) or ``categorical``
            (an integer index stored as float).
        cardinality: categorical only: number of indices including the unknown bucket 0
            (vocabulary size + 1); 0 for numeric features.
    """

    name: str
    kind: str
    cardinality: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "cardinality": self.cardinality}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(name=str(d["name"]), kind=str(d["kind"]), cardinality=int(d.get("cardinality", 0)))


class ClinicalPreprocessor:
    """Imputation, scaling and vocabularies for the clinical columns of a schema.

    Args:
        schema: the declared clinical columns.
        scaling: ``robust`` (sklearn RobustScaler: median / IQR) or ``standard`` (StandardScaler).
        impute: ``median`` or ``mean`` (sklearn SimpleImputer) for numeric and ordinal columns.
        min_frequency: categorical levels seen fewer times in training (and not declared in
            ``levels``) go to the unknown bucket.
    """

    def __init__(self, schema: ClinicalSchema, *, scaling: str = "robust", impute: str = "median",
                 min_frequency: int = 1) -> None:
        if scaling not in SCALINGS:
            raise ConfigError(f"clinical scaling {scaling!r} is not allowed; choose one of {list(SCALINGS)}")
        if impute not in IMPUTES:
            raise ConfigError(f"clinical impute {impute!r} is not allowed; choose one of {list(IMPUTES)}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ConfigError(f"clinical min_frequency must be an integer >= 1, got {min_frequency!r}")
        self.schema = schema
        self.scaling = scaling
        self.impute = impute
        self.min_frequency = min_frequency
        self._stats: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def fitted(self) -> bool:
        return self._stats is not None

    @property
    def feature_names(self) -> list[str]:
        return self.schema.names

    @property
    def num_features(self) -> int:
        return len(self.schema.columns)

    @property
    def feature_specs(self) -> list[FeatureSpec]:
        self._check_fitted()
        out = []
        for col, st in zip(self.schema.columns, self._stats or [], strict=True):
            if col.kind == "categorical":
                out.append(FeatureSpec(col.name, "categorical", len(st["vocabulary"]) + 1))
            else:
                out.append(FeatureSpec(col.name, "numeric", 0))
        return out

    @property
    def statistics(self) -> list[dict[str, Any]]:
        """The fitted statistics, one dict per feature (a copy; see :meth:`to_state`)."""
        self._check_fitted()
        return [dict(s) for s in self._stats or []]

    # ------------------------------------------------------------------ fit / transform

    def fit(self, df_train: pd.DataFrame, *, source: str = "training rows",
            id_column: str = "case_id") -> ClinicalPreprocessor:
        """Learn fill values, scales and vocabularies from the training rows only.

        Args:
            df_train: the training rows (one row per case); every declared column must exist.
            source: names the table in error messages.
            id_column: the column that names rows in error messages.

        Raises:
            ClinicalError: a declared column is absent or a value is invalid.
        """
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import RobustScaler, StandardScaler

        parsed = self.schema.parse_frame(df_train, source, id_column)
        stats: list[dict[str, Any]] = []
        for col in self.schema.columns:
            values = parsed[col.name]
            st: dict[str, Any] = {"name": col.name, "kind": col.kind}
            if col.kind == "categorical":
                st["vocabulary"] = self._vocabulary(col, values)
                st["had_missing"] = bool(any(v is None for v in values))
                stats.append(st)
                continue
            x = _forward(col, values.astype(np.float64))
            observed = ~np.isnan(x)
            st["had_missing"] = bool((~observed).any())
            if not observed.any():
                log.warning("clinical column %r has no value in the %d training rows; its fill is 0 and "
                            "the model can only use its missing mask", col.name, len(x))
                st.update(fill=0.0, center=0.0, scale=1.0)
                stats.append(st)
                continue
            strategy = "mean" if col.kind == "binary" else self.impute
            imputer = SimpleImputer(strategy=strategy, keep_empty_features=True).fit(x[:, None])
            st["fill"] = float(imputer.statistics_[0])
            if col.kind == "binary":
                st.update(center=0.0, scale=1.0)
            else:
                scaler = RobustScaler() if self.scaling == "robust" else StandardScaler()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    scaler.fit(x[:, None])
                center = scaler.center_[0] if self.scaling == "robust" else scaler.mean_[0]
                st.update(center=float(center), scale=float(scaler.scale_[0]))
            stats.append(st)
        self._stats = stats
        log.debug("fitted the clinical preprocessor on %d rows, %d features", len(df_train), len(stats))
        return self

    def _vocabulary(self, col: ClinicalColumn, values: np.ndarray) -> list[str]:
        if col.levels is not None:
            return list(col.levels)
        counts = pd.Series([v for v in values if v is not None], dtype=object).value_counts()
        return sorted(str(k) for k, n in counts.items() if n >= self.min_frequency)

    def transform(self, df: pd.DataFrame, *, source: str = "clinical table",
                  id_column: str = "case_id") -> tuple[np.ndarray, np.ndarray]:
        """Apply the fitted state to each row independently.

        Args:
            df: N rows with every declared column.

        Returns:
            ``values`` float32 (N, F) and ``mask`` float32 (N, F) (1 = observed, 0 = missing),
            F = :attr:`num_features`, in schema order.

        Raises:
            ClinicalError: a declared column is absent or a value is invalid (row and column named).
        """
        self._check_fitted()
        parsed = self.schema.parse_frame(df, source, id_column)
        n = len(df)
        values = np.zeros((n, self.num_features), dtype=np.float32)
        mask = np.zeros((n, self.num_features), dtype=np.float32)
        for f, (col, st) in enumerate(zip(self.schema.columns, self._stats or [], strict=True)):
            raw = parsed[col.name]
            if col.kind == "categorical":
                index = {lvl: i + 1 for i, lvl in enumerate(st["vocabulary"])}
                observed = np.array([v is not None for v in raw], dtype=bool)
                values[:, f] = [index.get(v, 0) if v is not None else 0 for v in raw]
            else:
                x = _forward(col, raw.astype(np.float64))
                observed = ~np.isnan(x)
                x = np.where(observed, x, st["fill"])
                values[:, f] = (x - st["center"]) / st["scale"]
            mask[:, f] = observed
        return values, mask

    def fit_transform(self, df_train: pd.DataFrame, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.fit(df_train, **kwargs).transform(df_train, **kwargs)

    def transform_onehot(self, df: pd.DataFrame, *, source: str = "clinical table",
                         id_column: str = "case_id") -> np.ndarray:
        """A flat design matrix for the MLP or a scikit-learn baseline.

        Numeric features give their scaled value plus a missing indicator (only for features
        that had missing values in training, like sklearn's ``add_indicator``); categorical
        features give ``cardinality`` one-hot columns (unknown first; all zero when missing).

        Returns:
            float32 (N, D), columns named by :attr:`onehot_names`.
        """
        values, mask = self.transform(df, source=source, id_column=id_column)
        blocks: list[np.ndarray] = []
        for f, (spec, st) in enumerate(zip(self.feature_specs, self._stats or [], strict=True)):
            if spec.kind == "categorical":
                onehot = np.zeros((len(values), spec.cardinality), dtype=np.float32)
                onehot[np.arange(len(values)), values[:, f].astype(np.int64)] = 1.0
                blocks.append(onehot * mask[:, f : f + 1])
            else:
                blocks.append(values[:, f : f + 1])
                if st["had_missing"]:
                    blocks.append(1.0 - mask[:, f : f + 1])
        return np.concatenate(blocks, axis=1) if blocks else np.zeros((len(values), 0), np.float32)

    @property
    def onehot_names(self) -> list[str]:
        """Column names of :meth:`transform_onehot`."""
        names: list[str] = []
        for spec, st in zip(self.feature_specs, self._stats or [], strict=True):
            if spec.kind == "categorical":
                names += [f"{spec.name}=<unknown>"] + [f"{spec.name}={v}" for v in st["vocabulary"]]
            else:
                names.append(spec.name)
                if st["had_missing"]:
                    names.append(f"{spec.name}__missing")
        return names

    # ------------------------------------------------------------------ state

    def to_state(self) -> dict[str, Any]:
        """Plain JSON-able state (schema + fitted statistics) for the run directory."""
        self._check_fitted()
        return {
            "version": STATE_VERSION,
            "schema": self.schema.to_dict(),
            "scaling": self.scaling,
            "impute": self.impute,
            "min_frequency": self.min_frequency,
            "features": [dict(s) for s in self._stats or []],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str = "state.json") -> ClinicalPreprocessor:
        """Rebuild a fitted preprocessor from :meth:`to_state`'s dict; nothing is refitted.

        Raises:
            CheckpointError: the state is incomplete or does not match its schema.
        """
        if not isinstance(state, dict):
            raise CheckpointError(f"{source}: clinical preprocessor state must be a mapping, got {type(state).__name__}")
        required = ("version", "schema", "scaling", "impute", "features")
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"{source}: clinical preprocessor state lacks {missing} (needs {list(required)})")
        if state["version"] != STATE_VERSION:
            raise CheckpointError(f"{source}: clinical preprocessor state version {state['version']!r} is not "
                                  f"supported (this mmai reads version {STATE_VERSION})")
        try:
            schema = ClinicalSchema.from_dict(state["schema"], source)
            pre = cls(schema, scaling=state["scaling"], impute=state["impute"],
                      min_frequency=int(state.get("min_frequency", 1)))
        except ConfigError as exc:
            raise CheckpointError(f"{source}: invalid clinical preprocessor state: {exc}") from exc
        feats = state["features"]
        names = [f.get("name") for f in feats] if isinstance(feats, list) and all(isinstance(f, dict) for f in feats) else None
        if names != schema.names:
            raise CheckpointError(f"{source}: clinical preprocessor features {names} do not match the schema "
                                  f"columns {schema.names}")
        for col, st in zip(schema.columns, feats, strict=True):
            need = ("vocabulary",) if col.kind == "categorical" else ("fill", "center", "scale")
            bad = [k for k in need if k not in st]
            if bad:
                raise CheckpointError(f"{source}: clinical feature {col.name!r} state lacks {bad}")
        pre._stats = [dict(f) for f in feats]
        return pre

    def _check_fitted(self) -> None:
        if self._stats is None:
            raise CheckpointError("the clinical preprocessor is not fitted: call fit() on the training rows "
                                  "or load it with ClinicalPreprocessor.from_state()")


def _forward(col: ClinicalColumn, x: np.ndarray) -> np.ndarray:
    """The pre-imputation transform of a numeric-like column: log1p where declared."""
    return np.log1p(x) if col.kind == "numeric" and col.log else x
