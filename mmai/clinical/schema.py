"""Typed clinical columns: the `clinical:` section of a pipeline YAML.

Every clinical column is declared once, by kind (a fixed form, docs/clinical.md)::

    clinical:
      numeric: [age, {name: creatinine, log: true, range: [0, 20], unit: mg/dL}]
      categorical: [sex, {name: smoking, levels: [never, former, current], strict: true}]
      binary: [diabetes]
      ordinal: {grade: [I, II, III]}

Parsing rules (shared by :meth:`ClinicalSchema.validate` and the preprocessor):

- empty cells (``""``, whitespace, NaN, None) are missing values, never zeros;
- numeric: a finite number; outside ``range`` is an error; ``log: true`` needs values >= 0;
- binary: 0/1, true/false, yes/no, y/n (case-insensitive); anything else is an error;
- ordinal: one of ``levels`` (their order is the rank); anything else is an error;
- categorical: any value; with ``strict: true`` a value outside ``levels`` is an error.

:func:`propose_schema` drafts the section from a table for the user to edit.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mmai.errors import ClinicalError, ConfigError

log = logging.getLogger(__name__)

KINDS = ("numeric", "categorical", "binary", "ordinal")
_ALLOWED_KEYS = {
    "numeric": ("name", "unit", "range", "log"),
    "categorical": ("name", "levels", "strict"),
    "binary": ("name",),
    "ordinal": ("name", "levels"),
}
BINARY_TRUE = frozenset({"1", "true", "yes", "y"})
BINARY_FALSE = frozenset({"0", "false", "no", "n"})
DEFAULT_EXCLUDE = ("case_id", "patient_id", "label", "time", "event", "split", "fold", "image")
MAX_PROBLEMS = 10
_INT_FLOAT = re.compile(r"^[+-]?\d+\.0*$")


# ----------------------------------------------------------------------------- value helpers


def is_missing(value: Any) -> bool:
    """True for None, NaN/NA/NaT and empty or whitespace-only strings."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def normalize_level(value: Any) -> str:
    """Canonical text of a categorical/ordinal value: ``2``, ``2.0`` and ``"2.0"`` all become ``"2"``."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(f)
    text = str(value).strip()
    if _INT_FLOAT.match(text):
        text = text.split(".")[0].lstrip("+")
        return "0" if text in ("-0", "") else text
    return text


def _parse_number(value: Any) -> float | None:
    """A finite float, or None when the value is not a number."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _parse_binary(value: Any) -> float | None:
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value) if float(value) in (0.0, 1.0) else None
    text = str(value).strip().lower()
    if text in BINARY_TRUE:
        return 1.0
    if text in BINARY_FALSE:
        return 0.0
    f = _parse_number(text)
    return f if f in (0.0, 1.0) else None


# ----------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class ClinicalColumn:
    """One declared clinical column.

    Attributes:
        name: column name in the manifest / clinical table.
        kind: ``numeric``, ``categorical``, ``binary`` or ``ordinal``.
        unit: free-text unit (numeric; documentation only).
        range: plausible ``(low, high)`` (numeric; either end may be None = open); outside = error.
        log: apply ``log1p`` before imputation and scaling (numeric; values must be >= 0).
        levels: ordinal order (low to high) or the fixed categorical vocabulary, as canonical text.
        strict: categorical only: a value outside ``levels`` is an error instead of "unknown".
    """

    name: str
    kind: str
    unit: str | None = None
    range: tuple[float | None, float | None] | None = None
    log: bool = False
    levels: tuple[str, ...] | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"clinical column {self.name!r}: kind {self.kind!r} is not allowed; choose one of {list(KINDS)}")
        if self.kind == "ordinal" and not self.levels:
            raise ConfigError(f"ordinal clinical column {self.name!r} needs levels (low to high)")

    def to_entry(self) -> Any:
        """The YAML entry: the bare name when nothing else is set, else a mapping."""
        extra: dict[str, Any] = {}
        if self.kind == "numeric":
            if self.unit is not None:
                extra["unit"] = self.unit
            if self.range is not None:
                extra["range"] = list(self.range)
            if self.log:
                extra["log"] = True
        elif self.kind == "categorical":
            if self.levels is not None:
                extra["levels"] = list(self.levels)
            if self.strict:
                extra["strict"] = True
        return {"name": self.name, **extra} if extra else self.name

    def parse(self, series: pd.Series) -> tuple[np.ndarray, list[tuple[int, Any, str]]]:
        """Parse one column of a table.

        Args:
            series: the raw column (any dtype), length N.

        Returns:
            ``(values, problems)``. ``values`` is float64 (N,) for numeric (raw units, no log),
            binary (0/1) and ordinal (rank 0..K-1), NaN where missing; for categorical it is an
            object array (N,) of canonical text, None where missing. ``problems`` lists
            ``(position, value, reason)`` for every invalid cell.
        """
        raw = series.to_numpy(dtype=object)
        problems: list[tuple[int, Any, str]] = []
        if self.kind == "categorical":
            out_c = np.empty(len(raw), dtype=object)
            allowed = set(self.levels) if self.levels is not None else None
            for i, v in enumerate(raw):
                if is_missing(v):
                    out_c[i] = None
                    continue
                text = normalize_level(v)
                if self.strict and allowed is not None and text not in allowed:
                    problems.append((i, v, f"is not one of the declared levels {list(self.levels or ())}"))
                out_c[i] = text
            return out_c, problems
        out = np.full(len(raw), np.nan, dtype=np.float64)
        ranks = {lvl: r for r, lvl in enumerate(self.levels or ())}
        for i, v in enumerate(raw):
            if is_missing(v):
                continue
            if self.kind == "numeric":
                f = _parse_number(v)
                if f is None:
                    problems.append((i, v, "is not a number"))
                    continue
                lo, hi = self.range if self.range is not None else (None, None)
                if (lo is not None and f < lo) or (hi is not None and f > hi):
                    problems.append((i, v, f"is outside the plausible range [{_fmt(lo, '-inf')}, {_fmt(hi, 'inf')}]"
                                     + (f" {self.unit}" if self.unit else "")))
                    continue
                if self.log and f < 0:
                    problems.append((i, v, "is negative but the column has log: true (needs values >= 0)"))
                    continue
                out[i] = f
            elif self.kind == "binary":
                b = _parse_binary(v)
                if b is None:
                    problems.append((i, v, "is not binary (allowed: 0/1, true/false, yes/no, y/n)"))
                    continue
                out[i] = b
            else:  # ordinal
                rank = ranks.get(normalize_level(v))
                if rank is None:
                    problems.append((i, v, f"is not one of the ordinal levels {list(self.levels or ())}"))
                    continue
                out[i] = float(rank)
        return out, problems


def _fmt(x: float | None, open_end: str) -> str:
    return open_end if x is None else f"{x:g}"


# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ClinicalSchema:
    """The typed clinical columns of a pipeline.

    ``from_dict`` orders them by kind (numeric, categorical, binary, ordinal), then as declared;
    this order is the feature (token) order of the preprocessor and the models.
    """

    columns: tuple[ClinicalColumn, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ClinicalColumn:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @classmethod
    def from_dict(cls, section: Any, source: str) -> ClinicalSchema:
        """Parse the YAML ``clinical:`` mapping.

        Raises:
            ConfigError: unknown kind or key, wrong type, duplicate column; the message names
                the key, ``source`` and the allowed set.
        """
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: clinical must be a mapping with keys {list(KINDS)}, "
                              f"got {type(section).__name__} {section!r}")
        columns: list[ClinicalColumn] = []
        for kind, entries in section.items():
            if kind not in KINDS:
                raise ConfigError(f"{source}: unknown key 'clinical.{kind}'; allowed keys in 'clinical': {list(KINDS)}")
            if entries is None:
                continue
            if kind == "ordinal" and isinstance(entries, dict):
                entries = [{"name": k, "levels": v} for k, v in entries.items()]
            if not isinstance(entries, list):
                raise ConfigError(f"{source}: clinical.{kind} must be a list of column names or mappings"
                                  + (" (or a mapping name: [levels])" if kind == "ordinal" else "")
                                  + f", got {entries!r}")
            for i, entry in enumerate(entries):
                columns.append(_parse_entry(kind, entry, f"clinical.{kind}[{i}]", source))
        seen: set[str] = set()
        for c in columns:
            if c.name in seen:
                raise ConfigError(f"{source}: clinical column '{c.name}' is declared more than once")
            seen.add(c.name)
        if not columns:
            raise ConfigError(f"{source}: clinical declares no columns; list them under {list(KINDS)}")
        # canonical order (kind, then declaration), so YAML key order never changes the features
        columns.sort(key=lambda c: KINDS.index(c.kind))
        return cls(columns=tuple(columns))

    def to_dict(self) -> dict[str, Any]:
        """The ``clinical:`` mapping; ``ClinicalSchema.from_dict(s.to_dict(), ...) == s``."""
        out: dict[str, Any] = {}
        for kind in KINDS:
            cols = [c for c in self.columns if c.kind == kind]
            if not cols:
                continue
            if kind == "ordinal":
                out[kind] = {c.name: list(c.levels or ()) for c in cols}
            else:
                out[kind] = [c.to_entry() for c in cols]
        return out

    def validate(self, df: pd.DataFrame, source: str, id_column: str = "case_id") -> None:
        """Check every declared column of ``df``.

        Raises:
            ClinicalError: a declared column is absent, or cells are invalid. Up to
                ``MAX_PROBLEMS`` problems are listed (row by ``id_column`` value, column, bad
                value, reason), with the count of the rest.
        """
        self.parse_frame(df, source, id_column)

    def parse_frame(self, df: pd.DataFrame, source: str,
                    id_column: str = "case_id") -> dict[str, np.ndarray]:
        """Parse every declared column (see :meth:`ClinicalColumn.parse`); raise on any problem."""
        absent = [c.name for c in self.columns if c.name not in df.columns]
        if absent:
            raise ClinicalError(f"{source}: clinical column(s) {absent} declared in the pipeline's clinical: "
                                f"section are not in the table; its columns are {list(map(str, df.columns))}")
        ids = df[id_column].tolist() if id_column in df.columns else None
        messages: list[str] = []
        n_problems = 0
        parsed: dict[str, np.ndarray] = {}
        for col in self.columns:
            values, problems = col.parse(df[col.name])
            parsed[col.name] = values
            n_problems += len(problems)
            for pos, value, reason in problems:
                if len(messages) >= MAX_PROBLEMS:
                    break
                where = f"{id_column} {ids[pos]!r}" if ids is not None else f"row {pos + 1}"
                messages.append(f"{where}, column '{col.name}': {value!r} {reason}")
        if messages:
            more = f"; ... and {n_problems - len(messages)} more" if n_problems > len(messages) else ""
            raise ClinicalError(f"{source}: {n_problems} invalid clinical value(s): "
                                + "; ".join(messages) + more)
        return parsed


def _parse_entry(kind: str, entry: Any, key: str, source: str) -> ClinicalColumn:
    allowed = _ALLOWED_KEYS[kind]
    if isinstance(entry, str):
        if kind == "ordinal":
            raise ConfigError(f"{source}: {key}: ordinal column '{entry}' needs its levels, "
                              f"e.g. ordinal: {{{entry}: [low, mid, high]}}")
        return ClinicalColumn(name=_name(entry, key, source), kind=kind)
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {key} must be a column name or a mapping with keys {list(allowed)}, "
                          f"got {entry!r}")
    for k in entry:
        if k not in allowed:
            raise ConfigError(f"{source}: unknown key '{key}.{k}'; allowed keys for a {kind} column: {list(allowed)}")
    if "name" not in entry:
        raise ConfigError(f"{source}: {key} needs a 'name' (allowed keys: {list(allowed)})")
    name = _name(entry["name"], f"{key}.name", source)
    unit = entry.get("unit")
    if unit is not None and not isinstance(unit, str):
        raise ConfigError(f"{source}: {key}.unit must be a string, got {unit!r}")
    log_flag = entry.get("log", False)
    strict = entry.get("strict", False)
    for flag, val in (("log", log_flag), ("strict", strict)):
        if not isinstance(val, bool):
            raise ConfigError(f"{source}: {key}.{flag} must be true or false, got {val!r}")
    rng = _range(entry["range"], f"{key}.range", source) if entry.get("range") is not None else None
    if rng is not None and log_flag and rng[0] is not None and rng[0] < 0:
        raise ConfigError(f"{source}: {key}: log: true needs values >= 0 but range starts at {rng[0]}")
    levels = _levels(entry["levels"], f"{key}.levels", source) if entry.get("levels") is not None else None
    if kind == "ordinal" and levels is None:
        raise ConfigError(f"{source}: {key}: ordinal column '{name}' needs levels (low to high)")
    if strict and levels is None:
        raise ConfigError(f"{source}: {key}: strict: true needs levels (the allowed values of '{name}')")
    return ClinicalColumn(name=name, kind=kind, unit=unit, range=rng, log=log_flag, levels=levels, strict=strict)


def _name(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: {key} must be a non-empty column name (a string), got {value!r}")
    return value


def _range(value: Any, key: str, source: str) -> tuple[float | None, float | None]:
    ok = isinstance(value, list | tuple) and len(value) == 2 and all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)) for v in value)
    if not ok:
        raise ConfigError(f"{source}: {key} must be [low, high] (numbers; null = open end), got {value!r}")
    lo, hi = (None if v is None else float(v) for v in value)
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{source}: {key} = {value!r}: low is greater than high")
    return lo, hi


def _levels(value: Any, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty list of values, got {value!r}")
    for v in value:
        if isinstance(v, bool):
            raise ConfigError(f"{source}: {key} contains the boolean {v!r}: YAML reads unquoted yes/no/true/"
                              "false/on/off as booleans; quote the level (e.g. 'yes') or use a binary column")
        if v is None or isinstance(v, dict | list):
            raise ConfigError(f"{source}: {key} must list plain values (text or numbers), got {v!r}")
    levels = tuple(normalize_level(v) for v in value)
    dup = sorted({x for x in levels if levels.count(x) > 1})
    if dup:
        raise ConfigError(f"{source}: {key} lists {dup} more than once")
    return levels
