"""Propose the typed ``clinical:`` section of a pipeline YAML from a table (``mmai clinical-schema``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.clinical.schema import DEFAULT_EXCLUDE, _parse_binary, _parse_number, is_missing, normalize_level
from mmai.errors import ManifestError
from mmai.io.manifest import read_table

log = logging.getLogger(__name__)


def propose_schema(df: pd.DataFrame, exclude: Iterable[str] | None = None,
                   max_levels: int = 20) -> dict[str, Any]:
    """Draft the ``clinical:`` mapping from a table, for the user to edit.

    Columns whose non-missing values are all binary tokens become ``binary``; all-numeric
    columns become ``numeric`` (with the observed range widened by 10%, a unit left for the
    user, and ``log: true`` for strongly right-skewed positive values), except two integer
    codes such as 1/2, which become ``categorical``; the rest become
    ``categorical`` with their observed levels (up to ``max_levels``). Ordinals cannot be
    guessed: change a categorical to ``ordinal: {name: [low, ..., high]}`` by hand.

    Args:
        df: the clinical table.
        exclude: columns to leave out (default: ids, targets, split and image columns).
        max_levels: above this many distinct values a categorical gets no ``levels``.

    Returns:
        A mapping that :meth:`ClinicalSchema.from_dict` accepts.
    """
    skip = set(DEFAULT_EXCLUDE if exclude is None else exclude)
    proposal: dict[str, list[Any]] = {k: [] for k in ("numeric", "categorical", "binary")}
    for name in df.columns:
        if name in skip:
            continue
        name_s = str(name)
        values = [v for v in df[name].tolist() if not is_missing(v)]
        if not values:
            log.warning("column %r is empty in every row; left out of the proposal", name_s)
            continue
        if all(_parse_binary(v) is not None for v in values):
            proposal["binary"].append(name_s)
            continue
        numbers = [_parse_number(v) for v in values]
        if all(n is not None for n in numbers) and len(set(numbers)) == 2 and all(
                float(n).is_integer() for n in numbers if n is not None):
            # two integer codes that are not 0/1 (e.g. sex coded 1/2): a category, not a quantity
            proposal["categorical"].append({"name": name_s, "levels": sorted({normalize_level(n) for n in numbers})})
            continue
        if all(n is not None for n in numbers):
            proposal["numeric"].append(_propose_numeric(name_s, np.asarray(numbers, dtype=float)))
            continue
        levels = sorted({normalize_level(v) for v in values})
        if len(levels) <= max_levels:
            proposal["categorical"].append({"name": name_s, "levels": levels})
        else:
            log.warning("column %r has %d distinct values (an identifier or free text?); proposed as "
                        "categorical without levels", name_s, len(levels))
            proposal["categorical"].append(name_s)
    return {k: v for k, v in proposal.items() if v}


def _propose_numeric(name: str, x: np.ndarray) -> Any:
    lo, hi = float(x.min()), float(x.max())
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    low = lo - pad
    if lo >= 0:
        low = max(0.0, low)
    entry: dict[str, Any] = {"name": name, "range": [_round_sig(low, down=True), _round_sig(hi + pad, down=False)]}
    if lo >= 0 and len(x) >= 10 and float(np.median(x)) > 0:
        skew = float(pd.Series(x).skew())
        if skew > 2.0 and hi / float(np.median(x)) > 10:
            entry["log"] = True
    return entry


def _round_sig(x: float, down: bool, sig: int = 2) -> float:
    if x == 0:
        return 0.0
    step = 10 ** (math.floor(math.log10(abs(x))) - sig + 1)
    r = (math.floor if down else math.ceil)(x / step) * step
    return float(f"{r:.12g}")


def propose_schema_from_file(path: Path, exclude: Sequence[str] | None = None) -> dict[str, Any]:
    """Read a table (:func:`mmai.io.manifest.read_table`) and return :func:`propose_schema`'s mapping.

    Raises:
        ManifestError: unreadable table, or no column left to propose.
    """
    df = read_table(Path(path), what="clinical table")
    proposal = propose_schema(df, exclude=exclude)
    if not proposal:
        raise ManifestError(f"{path}: no clinical column to propose (columns: {list(map(str, df.columns))}; "
                            f"excluded: {list(DEFAULT_EXCLUDE if exclude is None else exclude)})")
    return proposal
