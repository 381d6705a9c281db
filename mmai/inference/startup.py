"""Start-up of ``mmai predict``: what the process pays before its first study, and for its memory.

Two process-wide settings, both measured on the 6-study benchmark (benchmarks/study_throughput.py,
docs/benchmarks.md, "Fourth 2026-12-05 session"):

- :func:`quiet_imports`: Python's cyclic garbage collector stays off while predict imports torch,
  MONAI and mmai (about 380,000 objects: every generation-2 pass walks all of them, ~0.5 CPU-s of
  a ~2.9 s import on 2 cores), then the survivors are frozen (:func:`gc.freeze`) and the
  collector turned back on (only the first time: a process that already has torch is left as it
  is). This is the recipe of Python's ``gc`` documentation for a parent that
  forks workers: later collections, in the parent and in the forked preprocessing workers, no
  longer walk (and copy-on-write) the long-lived module objects. The ~12,000 unreachable objects
  the imports leave behind stay until the process exits (a few MB).
- :func:`prefer_small_pages`: numpy asks the kernel for transparent huge pages for its large
  arrays (``madvise``) unless ``NUMPY_MADVISE_HUGEPAGE=0``. Where the kernel backs fresh memory
  slowly (a virtual machine that hands freed memory back to its host), a first touch of huge
  pages cost ~2.4 s of kernel time per GB against ~0.4 s with 4 KiB pages; each preprocessing
  worker touches ~1.3 GB fresh for its first studies (the DICOM pixels, the resampling passes),
  so this was ~2 s of the run's ~4 s kernel time. With ``mmai.inference.heap`` keeping freed
  memory for reuse, the memory is touched once, so huge pages save nothing later. A value the
  user set is kept; it must be set before numpy is imported (it is read once, at import), so
  :func:`prefer_small_pages` runs first thing in ``mmai predict``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

HUGEPAGE_ENV = "NUMPY_MADVISE_HUGEPAGE"


def prefer_small_pages() -> bool:
    """Ask numpy not to ``madvise`` huge pages for its arrays in this process (and the processes it
    forks or starts), unless ``NUMPY_MADVISE_HUGEPAGE`` is set already. True when the setting is in
    force for this process's numpy (False: the user's own value, or numpy was imported before)."""
    if HUGEPAGE_ENV in os.environ:
        return os.environ[HUGEPAGE_ENV] == "0"
    if "numpy" in sys.modules:  # read at numpy's import: too late for this process
        log.debug("numpy already imported: %s not applied", HUGEPAGE_ENV)
        return False
    os.environ[HUGEPAGE_ENV] = "0"
    return True


@contextlib.contextmanager
def quiet_imports(heavy: tuple[str, ...] = ("torch",)) -> Iterator[None]:
    """Run the block (the heavy imports) with the cyclic garbage collector off, then freeze what
    survived and turn the collector back on (if it was on before).

    Only in a process that has not imported ``heavy`` yet (``mmai predict`` from the shell): in a
    long-lived process that calls ``mmai.cli.main`` several times (tests, a notebook) the block
    runs as it is, so nothing of that process is frozen for good."""
    if all(m in sys.modules for m in heavy):
        yield
        return
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_on:
            gc.enable()
