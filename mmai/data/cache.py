"""Disk cache of model-ready volumes, keyed by input file content + pipeline id.

Full-resolution volumes are too big to hold a cohort in RAM: with ``image.cache: disk`` each
volume is written once as an uncompressed ``.npy`` (memory-mapped on read) + a JSON sidecar with
its affine, under ``cache_dir/<key[:2]>/<key>``. The key hashes the bytes of the input (a file,
or every file of a DICOM folder / file list, with their relative names), the pipeline id, the
intensity statistics and the ROI source, so a changed file or pipeline misses. No pickle:
``np.load(allow_pickle=False)`` and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmai.utils import atomic_path

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def content_hash(source: str | Path | Sequence[str]) -> str:
    """SHA-1 of the bytes of a file, of every file under a folder (with relative names), or of a file list."""
    h = hashlib.sha1()
    if isinstance(source, (list, tuple)):
        for p in source:
            h.update(os.path.basename(str(p)).encode())
            _hash_file(h, Path(p))
        return h.hexdigest()
    path = Path(str(source))
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            _hash_file(h, p)
    else:
        _hash_file(h, path)
    return h.hexdigest()


def cache_key(source: str | Sequence[str], pipeline_id: str, extra: dict[str, Any] | None = None) -> str:
    """The cache key of one case: content hash + pipeline id (+ ROI source, statistics)."""
    blob = json.dumps({"content": content_hash(source), "pipeline": pipeline_id, "extra": extra or {}},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


class DiskCache:
    """``get``/``put`` of (array, affine) pairs under a folder; counts ``hits`` and ``misses``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.folder / key[:2]
        return d / f"{key}.npy", d / f"{key}.json"

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]] | None:
        """(array, affine (4, 4), the provenance note stored with it) or None when absent (or
        unreadable: then recomputed)."""
        arr_path, meta_path = self._paths(key)
        if not (arr_path.exists() and meta_path.exists()):
            self.misses += 1
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arr = np.load(arr_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("disk cache entry %s unreadable (%s); recomputing", arr_path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return (np.asarray(arr, dtype=np.float32), np.asarray(meta["affine"], dtype=np.float64),
                dict(meta.get("note") or {}))

    def put(self, key: str, arr: np.ndarray, affine: np.ndarray, note: dict[str, Any] | None = None) -> None:
        """Write one entry atomically (array first, then the sidecar that marks it complete).
        ``note``: what loading the source taught (modality, intensity statistics), replayed on a hit."""
        arr_path, meta_path = self._paths(key)
        arr_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(arr_path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
        with atomic_path(meta_path) as tmp:
            Path(tmp).write_text(json.dumps({"affine": np.asarray(affine).tolist(), "shape": list(arr.shape),
                                             "note": note or {}}))
