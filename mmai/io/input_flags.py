"""The input-quality contract: what the loader and the preprocessing chain repaired in one case.

ONE structure travels from the reader to every output: a mapping ``{name: value}`` kept in
``DicomVolume.meta["input_flags"]``, written as the string form (``;``-separated ``name=value``
items, sorted by name, e.g. ``dropped_files=1;interpolated_slices=1;nonfinite_voxels=72000``) into
the image's MONAI metadata, the chain's output dict (``data["input_flags"]``), the preprocessed
volume's provenance, the preprocess manifest, the convert sidecar and predictions.csv. An empty
string means a clean input. docs/manifest.md lists every flag.

Flags (values are counts unless said otherwise):

- ``interpolated_slices``: slices filled by linear interpolation where the series had gaps
  (missing or unreadable files); ``resampled_spacing=1``: an uneven stack resampled onto a
  uniform grid; ``tilt_resampled=1``: a gantry-tilted stack resampled onto an orthogonal grid.
- ``dropped_files``: files of the series that could not be read (truncated, undecodable) and
  were left out; ``dropped_file_names``: their file names (``,``-joined, at most 3 + ``+N``).
- ``nonfinite_voxels``: NaN / inf voxels filled (``image.nonfinite: fill``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

META_KEY = "input_flags"
MAX_NAMES = 3


def format_flags(flags: Mapping[str, Any] | None) -> str:
    """``{name: value}`` -> ``"a=1;b=2"`` (sorted by name; ``""`` for no flags).

    Args:
        flags: flag name -> value (an int, or a short text without ``;`` and ``=``).
    """
    if not flags:
        return ""
    items = []
    for name in sorted(flags):
        value = str(flags[name]).replace(";", ",").replace("=", ":")
        items.append(f"{name}={value}")
    return ";".join(items)


def parse_flags(text: Any) -> dict[str, str]:
    """``"a=1;b=2"`` -> ``{"a": "1", "b": "2"}`` (``""``, None or NaN -> ``{}``)."""
    if text is None or (isinstance(text, float) and text != text) or not str(text).strip():
        return {}
    out: dict[str, str] = {}
    for item in str(text).split(";"):
        name, _, value = item.partition("=")
        if name.strip():
            out[name.strip()] = value.strip()
    return out


def merge_flags(*parts: Any) -> str:
    """Union of flag strings or mappings (a later value of the same name wins); the string form."""
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update(p if isinstance(p, Mapping) else parse_flags(p))
    return format_flags(merged)


def add_flag(flags: dict[str, Any], name: str, value: int | str) -> None:
    """Add ``value`` to a counter flag (ints add up; text replaces)."""
    old = flags.get(name)
    if isinstance(value, int) and isinstance(old, int):
        flags[name] = old + value
    else:
        flags[name] = value


def file_names(paths: Sequence[Any]) -> str:
    """Short ``a.dcm,b.dcm,c.dcm+2`` list of file names (no folders: they may hold PHI)."""
    names = [Path(str(p)).name for p in paths]
    text = ",".join(names[:MAX_NAMES])
    return text + (f"+{len(names) - MAX_NAMES}" if len(names) > MAX_NAMES else "")
