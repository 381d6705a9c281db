"""The output column rule of predictions (torch-free): what ``mmai predict`` writes, what the
out-of-fold tables hold, and how ``mmai evaluate`` reads a predictions file back.

Classification: ``prob_<class>`` per class (training-class order: sorted labels) and
``prediction`` (the argmax class); regression: ``prediction`` (target units); survival: ``risk``
(log-hazard, higher = earlier event) and ``surv_<t>`` (P(no event by t)) per horizon. predictions.csv
frames them as ``case_id``, the task's columns, ``clinical_present``, pass-through columns (e.g.
``input_flags``), ``model_id``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmai.engine.survival import horizon_column
from mmai.errors import ManifestError
from mmai.labels import class_sort_key


def prediction_columns(kind: str, classes: Sequence[str], horizons: Sequence[float] = ()) -> list[str]:
    """The prediction columns of a task (between ``case_id`` and the bookkeeping columns)."""
    if kind in ("binary", "multiclass"):
        return [f"prob_{c}" for c in classes] + ["prediction"]
    if kind == "regression":
        return ["prediction"]
    return ["risk", *[horizon_column(t) for t in horizons]]


def task_of_columns(columns: Sequence[str], source: str = "predictions") -> tuple[str, list[str]]:
    """Task kind and class names (in prob-column order: sorted labels) from a predictions file's
    columns, the inverse of :func:`prediction_columns`.

    Returns:
        (kind, classes): kind in binary | multiclass | regression | survival; classes [] unless
        classification.

    Raises:
        ManifestError: columns no task writes.
    """
    columns = list(columns)
    probs = [c for c in columns if c.startswith("prob_")]
    if probs and "risk" in columns:
        raise ManifestError(f"{source}: has both prob_* columns {probs} and a risk column; "
                            "a predictions file holds one task")
    if probs:
        classes = sorted((c[len("prob_"):] for c in probs), key=class_sort_key)
        if len(classes) < 2:
            raise ManifestError(f"{source}: classification needs one prob_<class> column per class "
                                f"(binary: prob_<neg> and prob_<pos>); found only {probs}")
        return ("binary" if len(classes) == 2 else "multiclass"), classes
    if "risk" in columns:
        return "survival", []
    if "prediction" in columns:
        return "regression", []
    raise ManifestError(f"{source}: no recognisable prediction columns: expected prob_<class> "
                        f"(classification), risk (survival) or prediction (regression); got {list(columns)}")
