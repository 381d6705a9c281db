"""Rows of ``mmai predict``'s output files: error rows (short, no file lists) and resuming a
predictions CSV (a row torn by a kill is cut off and redone, never glued to the next one)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from mmai.errors import MmaiError

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300
ERROR_COLUMNS = ["case_id", "stage", "series", "error"]
_LIST = re.compile(r"\[(?:\s*(?:PosixPath\()?'[^']*[/\\][^']*'\)?\s*,?)+\]")  # a printed list of paths


def error_row(case_id: Any, stage: str, reason: Any, *, series: str = "", files: Any = None) -> dict[str, str]:
    """One errors.csv row: the case, the stage, the series (UID or folder under the root), the reason.

    The reason is one line of at most :data:`MAX_ERROR_CHARS` characters; printed lists of files
    become ``[N files]`` and each of the case's own file paths is cut to its file name, so no
    folder (which may be named after a patient) is repeated.
    """
    text = " ".join(str(reason).split())
    text = _LIST.sub(lambda m: f"[{m.group(0).count(chr(39)) // 2} files]", text)
    if isinstance(files, list | tuple):
        for f in sorted({str(f) for f in files}, key=len, reverse=True):
            text = text.replace(f, Path(f).name)
        if files:
            parent = str(Path(str(files[0])).parent)
            if len(parent) > 1:
                text = text.replace(parent, "<series folder>")
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3] + "..."
    return {"case_id": str(case_id), "stage": stage, "series": series, "error": text}


def resume_done(out_csv: Path, columns: list[str], model_id: str) -> set[str]:
    """Case ids already in ``out_csv`` (a previous, maybe killed, run of the same model).

    A last row without its line end (the run was killed while writing it) is cut off, so the case
    is predicted again and the next row starts on a new line.

    Raises:
        MmaiError: the file has other columns, or rows of another model.
    """
    out_csv = Path(out_csv)
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return set()
    data = out_csv.read_bytes()
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: the last row is incomplete (a killed run); it is removed and that case predicted again",
                    out_csv)
        with out_csv.open("r+b") as fh:
            fh.truncate(keep)
        if keep == 0:
            return set()
    try:
        prev = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MmaiError(f"{out_csv} exists but is not a predictions CSV ({str(exc).splitlines()[0]}); "
                        "choose another --out or delete it") from exc
    if list(prev.columns) != columns:
        raise MmaiError(f"{out_csv} exists with columns {list(prev.columns)}, not this run's {columns}; "
                        "choose another --out or delete it")
    other = sorted(set(prev["model_id"]) - {model_id})
    if other:
        raise MmaiError(f"{out_csv} holds predictions of model {other[0]!r}, not this run's {model_id!r}; "
                        "choose another --out or delete it")
    return set(prev["case_id"].astype(str))
