"""Volumes handed from predict's preprocessing workers to the model process without pickling them.

A worker's result travels back through the pool's pipe, pickled: a 512 x 512 x 400 chest CT's
model-ready volume is ~80 MB, copied several times on the way (into the pickle, through the
pipe in 64 KiB pieces, out of it, into the unpickled array): ~0.2 CPU-s per study of the two
processes. Here (Linux) the worker writes the volume once into an anonymous memory file
(``memfd_create``) and sends only its address (:class:`Shipped`: pid, descriptor, shape, dtype);
the model process opens it through ``/proc/<pid>/fd/<fd>`` and reads it once into its own array.

Each worker keeps the files of its last ``keep`` results open and reuses the oldest for the next
one (its pages stay allocated: no fresh memory per study). ``keep`` is the prefetch window
(:class:`mmai.inference.pipelined.PrefetchLoader`'s ``ahead``) + 1: at most ``ahead`` results are
in flight at once, so a file is only reused after the model process has read it. Anything that
goes wrong on either side (no memfd, a file that cannot be opened or is short) falls back to the
pickled array, or for the receiver to loading the case in place, never to another volume. The
files are anonymous: they vanish with the worker (a killed ``mmai predict`` leaves nothing in
``/dev/shm``).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: volumes smaller than this travel pickled (a file per result would cost more than it saves)
MIN_BYTES = 1 << 20

_FILES: deque[int] = deque()  # in a worker: the memory files of its recent results, oldest first
_KEEP = 0  # in a worker: how many of them to keep (0: none, everything travels pickled)


@dataclass(frozen=True)
class Shipped:
    """Where a worker left a volume: its process, the descriptor of the memory file, the array's
    shape and dtype (C order)."""

    pid: int
    fd: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


def set_keep(keep: int) -> None:
    """In a worker (its initializer): keep the memory files of the last ``keep`` results."""
    global _KEEP
    _KEEP = keep if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") else 0


def ship(arr: np.ndarray) -> np.ndarray | Shipped:
    """In a worker: ``arr`` (C-contiguous) written to a memory file -> its :class:`Shipped` address,
    or ``arr`` itself when it is small or no file can be written."""
    if _KEEP <= 0 or arr.nbytes < MIN_BYTES or not arr.flags.c_contiguous:
        return arr
    fd = -1
    try:
        fd = _FILES.popleft() if len(_FILES) >= _KEEP else os.memfd_create("mmai-volume", os.MFD_CLOEXEC)
        os.ftruncate(fd, arr.nbytes)
        view, done = memoryview(arr).cast("B"), 0
        while done < arr.nbytes:
            done += os.pwrite(fd, view[done:], done)
    except OSError as exc:  # no memory file here: the pickled array instead
        log.debug("volume sent pickled: %s", exc)
        if fd >= 0:
            os.close(fd)
        return arr
    _FILES.append(fd)
    return Shipped(os.getpid(), fd, tuple(int(n) for n in arr.shape), arr.dtype.str, int(arr.nbytes))


def receive(value: np.ndarray | Shipped) -> np.ndarray | None:
    """In the model process: the array a worker shipped (read once into a new array), the array
    itself when it came pickled, or None when the worker's file cannot be read (load in place)."""
    if not isinstance(value, Shipped):
        return value
    out = np.empty(value.shape, dtype=np.dtype(value.dtype))
    view, done = memoryview(out).cast("B"), 0
    try:
        with open(f"/proc/{value.pid}/fd/{value.fd}", "rb", buffering=0) as fh:
            while done < value.nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    break
                done += n
    except OSError as exc:
        log.warning("a preprocessing worker's volume could not be read (%s); loading the case in place", exc)
        return None
    if done != value.nbytes:
        log.warning("a preprocessing worker's volume was short (%d of %d bytes); loading the case in place",
                    done, value.nbytes)
        return None
    return out
