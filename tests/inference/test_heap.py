"""mmai predict keeps freed memory for the next study (glibc): a large block freed and allocated
again is not faulted in page by page again; the defaults come back afterwards."""

from __future__ import annotations

import resource

import pytest
import torch

from mmai.inference.heap import _libc, keep_freed_memory

pytestmark = pytest.mark.skipif(_libc() is None, reason="glibc's mallopt only")


def _faults_of_churn() -> int:
    """Minor page faults of allocating, filling and freeing a 96 MB tensor four times (torch's CPU allocator: malloc, 4 KiB pages)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        a = torch.empty(12_000_000, dtype=torch.float64)  # 96 MB: over glibc's largest mmap threshold
        a.fill_(1.0)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_while_kept_and_given_back_after():
    pages = 96e6 / resource.getpagesize()
    assert _faults_of_churn() > 3 * pages * 0.9  # each allocation faults its pages in again (mmap / munmap)
    restore = keep_freed_memory()
    try:
        for _ in range(3):  # the heap grows until the freed blocks fit the next ones
            _faults_of_churn()
        kept = _faults_of_churn()
    finally:
        restore()
    assert kept < 0.5 * pages  # reused: no page faulted in again
    assert _faults_of_churn() > pages  # the defaults are back: freed blocks go back to the system
