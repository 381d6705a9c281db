"""Series selection rules: pick the one stack per study that a pipeline wants.

A rule comes from the pipeline YAML's ``image.select`` mapping, e.g.::

    select: {modality: CT, description: "chest|thorax", orientation: axial, min_slices: 40,
             thickness: [0.5, 3.0], exclude_image_type: [LOCALIZER], prefer: thinnest}

Keys (all optional; every given key must hold):

- ``modality``: a string or a list (any of them).
- ``description`` / ``exclude_description``: regular expression searched in SeriesDescription,
  case-insensitive; the stack matches if it is found / is not found.
- ``orientation``: axial | coronal | sagittal | oblique, or a list of them.
- ``min_slices`` / ``max_slices``: bounds on the stack's number of slices (inclusive).
- ``thickness``: ``[low, high]`` mm, inclusive bounds on SliceThickness.
- ``image_type``: ImageType values that must all be present (e.g. ``[ORIGINAL, PRIMARY]``).
- ``exclude_image_type``: ImageType values of which none may be present.
- ``exclude_problems``: problem names (see docs/dicom_scan.md) that disqualify a stack,
  e.g. ``["missing slices", "gantry tilt"]`` (matched as prefixes).
- ``phase``: 1-based phase/echo index within a multi-phase series (1 also matches a series
  without phases).
- ``localizer``: true = only localizers; absent or false = localizers never match.
- ``any``: a list of sub-rules, at least one must hold (OR); ``all``: all must hold (AND).
- ``prefer`` (top level only): tie-breaker(s) among several matches, applied in order:
  most_slices | fewest_slices | thinnest | thickest | highest_series_number | lowest_series_number.

Rows are index rows (see mmai.io.dicom_scan.INDEX_COLUMNS): dicts, or pandas rows of an index CSV.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmai.errors import ConfigError, SeriesSelectionError
from mmai.io.dicom_scan import SeriesStack

log = logging.getLogger(__name__)

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
PREFER = ("most_slices", "fewest_slices", "thinnest", "thickest", "highest_series_number",
          "lowest_series_number")
RULE_KEYS = ("modality", "description", "exclude_description", "orientation", "min_slices", "max_slices",
             "thickness", "image_type", "exclude_image_type", "exclude_problems", "phase", "localizer",
             "any", "all", "prefer")


def _str_list(value: Any, key: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{source}: {key!r} must be a string or a non-empty list of strings, got {value!r}")


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _regex(value: Any, key: str, source: str) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key!r} must be a regular expression string, got {value!r}")
    try:
        return re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"{source}: {key!r} = {value!r} is not a valid regular expression: {exc}") from exc


def _get(row: Any, key: str) -> Any:
    """row[key], with NaN / pandas NA (index CSVs, DataFrame rows) as None."""
    value = row.get(key) if hasattr(row, "get") else None
    try:
        if value is None or bool(value != value):  # NaN is the only value unequal to itself
            return None
    except (TypeError, ValueError):  # pandas.NA refuses bool()
        return None
    return value


@dataclass(frozen=True)
class SelectionRule:
    """A parsed ``image.select`` rule. Build it with :meth:`from_dict`; test rows with :meth:`matches`."""

    source: str = "<rule>"
    modality: tuple[str, ...] | None = None
    description: re.Pattern[str] | None = None
    exclude_description: re.Pattern[str] | None = None
    orientation: tuple[str, ...] | None = None
    min_slices: int | None = None
    max_slices: int | None = None
    thickness: tuple[float, float] | None = None
    image_type: tuple[str, ...] = ()
    exclude_image_type: tuple[str, ...] = ()
    exclude_problems: tuple[str, ...] = ()
    phase: int | None = None
    localizer: bool | None = None
    top: bool = True
    any_of: tuple[SelectionRule, ...] = ()
    all_of: tuple[SelectionRule, ...] = ()
    prefer: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str, *, top: bool = True) -> SelectionRule:
        """Parse a rule mapping.

        Args:
            d: the mapping (None or {} = match every image stack except localizers).
            source: where it came from, for messages (e.g. "pipelines/ct.yaml: image.select").
            top: False for sub-rules of ``any``/``all`` (``prefer`` is top-level only).

        Raises:
            ConfigError: unknown key (names it, the allowed keys and ``source``), wrong type or value.
        """
        d = {} if d is None else d
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: a selection rule must be a mapping, got {type(d).__name__} {d!r}")
        for key in d:
            if key not in RULE_KEYS or (key == "prefer" and not top):
                allowed = [k for k in RULE_KEYS if top or k != "prefer"]
                raise ConfigError(f"{source}: unknown selection key {key!r}; allowed keys: {allowed}")
        kw: dict[str, Any] = {"source": source, "raw": dict(d), "top": top}
        if "modality" in d:
            kw["modality"] = tuple(m.upper() for m in _str_list(d["modality"], "modality", source))
        for key in ("description", "exclude_description"):
            if key in d:
                kw[key] = _regex(d[key], key, source)
        if "orientation" in d:
            values = tuple(v.lower() for v in _str_list(d["orientation"], "orientation", source))
            bad = [v for v in values if v not in ORIENTATIONS]
            if bad:
                raise ConfigError(f"{source}: orientation {bad[0]!r} is not one of {list(ORIENTATIONS)}")
            kw["orientation"] = values
        for key in ("min_slices", "max_slices", "phase"):
            if key in d:
                kw[key] = _int(d[key], key, source)
        if "thickness" in d:
            t = d["thickness"]
            if (not isinstance(t, Sequence) or isinstance(t, str) or len(t) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in t)
                    or t[0] > t[1]):
                raise ConfigError(f"{source}: 'thickness' must be [low, high] in mm with low <= high, got {t!r}")
            kw["thickness"] = (float(t[0]), float(t[1]))
        for key in ("image_type", "exclude_image_type"):
            if key in d:
                kw[key] = tuple(v.upper() for v in _str_list(d[key], key, source))
        if "exclude_problems" in d:
            kw["exclude_problems"] = _str_list(d["exclude_problems"], "exclude_problems", source)
        if "localizer" in d:
            if not isinstance(d["localizer"], bool):
                raise ConfigError(f"{source}: 'localizer' must be true or false, got {d['localizer']!r}")
            kw["localizer"] = d["localizer"]
        for key, attr in (("any", "any_of"), ("all", "all_of")):
            if key in d:
                subs = d[key]
                if not isinstance(subs, Sequence) or isinstance(subs, str) or not subs:
                    raise ConfigError(f"{source}: {key!r} must be a non-empty list of rule mappings, got {subs!r}")
                kw[attr] = tuple(cls.from_dict(s, f"{source}.{key}[{i}]", top=False) for i, s in enumerate(subs))
        if "prefer" in d:
            prefer = _str_list(d["prefer"], "prefer", source)
            bad = [p for p in prefer if p not in PREFER]
            if bad:
                raise ConfigError(f"{source}: prefer {bad[0]!r} is not one of {list(PREFER)}")
            kw["prefer"] = prefer
        return cls(**kw)

    # ------------------------------------------------------------------ matching

    def why_not(self, row: Any) -> str | None:
        """Return None if ``row`` matches, else the first reason it does not (for messages)."""
        kind = _get(row, "kind") or "image"
        if kind != "image":
            return f"{kind} stack"
        is_loc = bool(_get(row, "is_localizer"))
        if is_loc and (self.localizer is False or (self.localizer is None and self.top)):
            return "localizer"
        if self.localizer and not is_loc:
            return "not a localizer"
        mod = str(_get(row, "modality") or "").upper()
        if self.modality is not None and mod not in self.modality:
            return f"modality {mod or '(none)'} not in {list(self.modality)}"
        desc = str(_get(row, "series_description") or "")
        if self.description is not None and not self.description.search(desc):
            return f"description {desc!r} does not match {self.description.pattern!r}"
        if self.exclude_description is not None and self.exclude_description.search(desc):
            return f"description {desc!r} matches excluded {self.exclude_description.pattern!r}"
        ori = str(_get(row, "orientation") or "")
        if self.orientation is not None and ori not in self.orientation:
            return f"orientation {ori or '(unknown)'} not in {list(self.orientation)}"
        n = int(_get(row, "n_instances") or 0)
        if self.min_slices is not None and n < self.min_slices:
            return f"{n} slices < min_slices {self.min_slices}"
        if self.max_slices is not None and n > self.max_slices:
            return f"{n} slices > max_slices {self.max_slices}"
        if self.thickness is not None:
            th = _get(row, "slice_thickness")
            if th is None:
                return "no SliceThickness"
            if not self.thickness[0] <= float(th) <= self.thickness[1]:
                return f"thickness {float(th):g} mm outside {list(self.thickness)}"
        types = {t.strip().upper() for t in str(_get(row, "image_type") or "").split("\\") if t.strip()}
        missing = [t for t in self.image_type if t not in types]
        if missing:
            return f"ImageType lacks {missing}"
        present = [t for t in self.exclude_image_type if t in types]
        if present:
            return f"ImageType has excluded {present}"
        problems = [p for p in str(_get(row, "problems") or "").split(";") if p]
        hit = [p for p in problems if any(p.startswith(x) for x in self.exclude_problems)]
        if hit:
            return f"problem {hit[0]!r} is excluded"
        if self.phase is not None:
            pi = int(_get(row, "phase_index") or 0)
            if not (pi == self.phase or (pi == 0 and self.phase == 1)):
                return f"phase {pi or 1} is not {self.phase}"
        for sub in self.all_of:
            why = sub.why_not(row)
            if why is not None:
                return f"all[]: {why}"
        if self.any_of:
            whys = [sub.why_not(row) for sub in self.any_of]
            if all(w is not None for w in whys):
                return "any[]: none holds (" + "; ".join(str(w) for w in whys) + ")"
        return None

    def matches(self, row: Any) -> bool:
        """True if the index row satisfies every key of the rule."""
        return self.why_not(row) is None


def _describe(stack: SeriesStack) -> str:
    r = stack.row
    th = _get(r, "slice_thickness")
    return (f"series {r.get('series_number')} {str(r.get('series_description') or '')!r} "
            f"{r.get('modality') or '?'} {r.get('orientation') or '?'} {r.get('n_instances')} slices"
            f"{f' {float(th):g} mm' if th is not None else ''}"
            f" [problems: {r.get('problems') or 'none'}] ({r.get('stack_id')}, {r.get('path')})")


def _prefer_key(name: str, stack: SeriesStack) -> float:
    r = stack.row
    n = float(_get(r, "n_instances") or 0)
    th = _get(r, "slice_thickness")
    sn = _get(r, "series_number")
    th_f = float(th) if th is not None else math.inf
    sn_f = float(sn) if sn is not None else math.inf
    return {"most_slices": -n, "fewest_slices": n, "thinnest": th_f,
            "thickest": -th_f if th is not None else math.inf,
            "highest_series_number": -sn_f if sn is not None else math.inf,
            "lowest_series_number": sn_f}[name]


def filter_stacks(stacks: Sequence[SeriesStack], rule: SelectionRule) -> list[SeriesStack]:
    """All stacks whose rows match ``rule`` (no tie-breaking)."""
    return [s for s in stacks if rule.matches(s.row)]


def select_one(stacks: Sequence[SeriesStack], rule: SelectionRule, study_label: str) -> SeriesStack:
    """Pick exactly one stack of one study.

    Args:
        stacks: the stacks of one study (see :func:`group_by_study`).
        rule: the selection rule.
        study_label: how to name the study in messages (a case id, never a patient name).

    Returns:
        The single matching stack (after the rule's ``prefer`` tie-breakers).

    Raises:
        SeriesSelectionError: no stack matches, or several tie; the message lists every
            candidate with its description, orientation, slices and problems, and why it failed
            or that it tied.
    """
    matched = filter_stacks(stacks, rule)
    if len(matched) == 1:
        return matched[0]
    if not matched:
        lines = [f"  - {_describe(s)}: {rule.why_not(s.row)}" for s in stacks]
        raise SeriesSelectionError(
            f"study {study_label}: no series matches the rule from {rule.source} "
            f"({dict(rule.raw)}); {len(stacks)} candidate(s):\n" + ("\n".join(lines) or "  (none)"))
    tied = list(matched)
    for name in rule.prefer:
        best = min(_prefer_key(name, s) for s in tied)
        tied = [s for s in tied if _prefer_key(name, s) == best]
        if len(tied) == 1:
            log.info("study %s: %d series match; picked %s by prefer=%s", study_label, len(matched),
                     tied[0].row.get("stack_id"), name)
            return tied[0]
    lines = [f"  - {_describe(s)}: matches{' and ties' if s in tied else ', lost the tie-break'}"
             for s in matched]
    hint = ("add a narrower key (description, thickness, phase ...) or prefer: "
            f"{' | '.join(PREFER)}") if not rule.prefer else f"prefer {list(rule.prefer)} left a tie; narrow the rule"
    raise SeriesSelectionError(
        f"study {study_label}: {len(matched)} series match the rule from {rule.source} ({dict(rule.raw)}) "
        f"and mmai never picks one silently; {hint}:\n" + "\n".join(lines))


def study_key(stack: SeriesStack) -> str:
    """The study a stack belongs to: its StudyInstanceUID, else its folder."""
    return str(stack.row.get("study_uid") or f"no-study-uid:{stack.row.get('path')}")


def group_by_study(stacks: Sequence[SeriesStack]) -> dict[str, list[SeriesStack]]:
    """Group stacks by study (StudyInstanceUID), keeping their order."""
    out: dict[str, list[SeriesStack]] = {}
    for s in stacks:
        out.setdefault(study_key(s), []).append(s)
    return out
