"""Freed memory kept for reuse while ``mmai predict`` streams full-resolution volumes (glibc only).

Every study allocates and frees the same large arrays: the DICOM pixels (~200 MB for 512 x 512 x
400 int16), the resampling passes, the model-ready volume (~80 MB) handed from a worker to the
model, the encoder's activations. glibc serves each block over 32 MB with a fresh ``mmap`` and
gives it back with ``munmap`` when freed, so every study pays its memory again in page faults:
the kernel zeroes each 4 KiB page on first touch. On 6 chest CTs that was ~1.5 M minor faults and
about a third of the workers' CPU time in the kernel (docs/benchmarks.md, "Study throughput
(issue 18): the main process only runs the model"). :func:`keep_freed_memory` makes the process
(and the workers it forks afterwards, which inherit the setting) take large blocks from the heap
and keep freed ones for the next study; its return value restores glibc's defaults and hands the
kept memory back.

The peak memory does not grow in practice (the same blocks are reused: 1.16 GB for the 6-study
benchmark); what changes is that the memory stays with the process until the batch ends. After
the restore glibc's mmap threshold no longer adapts (any ``mallopt`` of these parameters turns
that off for the process): blocks over 128 KiB are ``mmap``ed as on a fresh start. Elsewhere
(macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
# glibc's defaults (restored at the end): 128 KiB trim threshold and top pad, 65536 mmaps
DEFAULTS = {M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024, M_MMAP_MAX: 65536}
KEEP = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 256 * 2**20}  # mallopt takes a C int


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # this process's own symbols: the C library it runs on
        libc.mallopt  # noqa: B018 - glibc (musl has no mallopt)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> Callable[[], None]:
    """Make glibc keep freed memory for reuse (no ``mmap`` per large block, no trimming) in this
    process and the processes it forks from now on; returns the function that restores the
    defaults and gives the kept memory back to the system (a no-op where glibc is absent)."""
    libc = _libc()
    if libc is None:
        return lambda: None
    if not all(libc.mallopt(param, value) for param, value in KEEP.items()):
        log.debug("mallopt refused a setting; freed memory is handled as before")
        _set(libc, DEFAULTS)
        return lambda: None

    def restore() -> None:
        _set(libc, DEFAULTS)
        libc.malloc_trim(0)

    return restore


def _set(libc: ctypes.CDLL, values: dict[int, int]) -> None:
    for param, value in values.items():
        libc.mallopt(param, value)
