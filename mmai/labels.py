"""Class labels: one normalisation and one class order, used by manifests, training and evaluate.

A label is compared as text. Numbers are written without a trailing ``.0`` so ``1``, ``1.0`` and
``"1"`` (CSV, Parquet and JSON manifests) are one label; other text is stripped. Classes sort
numbers first, in numeric order (``2 < 9 < 10``), then text labels in text order, so a mixed set
such as ``["10", "2", "b", "a"]`` always becomes ``["2", "10", "a", "b"]`` wherever it is sorted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def _as_number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def label_text(value: Any) -> str:
    """One label as text: ``1``, ``1.0``, ``" 1 "`` -> ``"1"``; ``2.5`` -> ``"2.5"``; ``"yes"`` -> ``"yes"``."""
    text = str(value).strip()
    x = _as_number(text)
    if x is not None and x.is_integer():
        return str(int(x))
    return text


def class_sort_key(name: str) -> tuple[int, float, str]:
    """Sort key of a class name: numbers first (numeric order), then text (text order)."""
    x = _as_number(name)
    return (0, x, "") if x is not None else (1, 0.0, name)


def sort_classes(names: Iterable[Any]) -> list[str]:
    """Distinct class names, normalised by :func:`label_text`, in the one class order of mmai."""
    return sorted({label_text(n) for n in names}, key=class_sort_key)
