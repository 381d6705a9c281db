"""Volumes handed from predict's preprocessing workers to the model process without pickling them.

A worker's result travels back through the pool's pipe, pickled: a 512 x 512 x 400 chest CT's
model-ready volume is ~80 MB, copied several times on the way (into the pickle, through the
pipe in 64 KiB pieces, out of it, into the unpickled array): ~0.2 CPU-s per study of the two
processes. Here (Linux) the worker writes the volume once into an anonymous memory file
(``memfd_create``) and sends only its address (:class:`Shipped`: pid, descriptor, shape, dtype);
the model process opens it through ``/proc/<pid>/fd/<fd>`` and reads it once into its own array.

Each worker keeps the files of its last ``keep`` results open and reuses the oldest for the next
one (its pages stay allocated: no fresh memory per study). ``keep`` is the prefetch window
(:class:`mmai.inference.pipelined.PrefetchLoader`'s ``ahead``) + 1, so in the normal flow a file
is read before it is reused. A result asked for long after it was made (a case skipped, then the
same path again) may find its file reused: every file starts with a token unique to its content
(the worker clears it before rewriting and sets it after), the address carries the token, and the
receiver checks it before and after reading, so it never takes another study's volume. Anything
that goes wrong on either side (no memfd, a file that cannot be opened, is short or was reused)
falls back to the pickled array, or for the receiver to loading the case in place. The files are
anonymous: they vanish with the worker (a killed ``mmai predict`` leaves nothing in ``/dev/shm``).
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
_SEQ = 0  # in a worker: results shipped so far (part of each file's token)
_HEAD = 8  # bytes of the token at the start of each file; the array follows


@dataclass(frozen=True)
class Shipped:
    """Where a worker left a volume: its process, the descriptor of the memory file, the array's
    shape and dtype (C order)."""

    pid: int
    fd: int
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    token: bytes = b""


def set_keep(keep: int) -> None:
    """In a worker (its initializer): keep the memory files of the last ``keep`` results."""
    global _KEEP
    _KEEP = keep if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd") else 0


def ship(arr: np.ndarray) -> np.ndarray | Shipped:
    """In a worker: ``arr`` (C-contiguous) written to a memory file -> its :class:`Shipped` address,
    or ``arr`` itself when it is small or no file can be written."""
    if _KEEP <= 0 or arr.nbytes < MIN_BYTES or not arr.flags.c_contiguous:
        return arr
    global _SEQ
    _SEQ += 1
    token = ((os.getpid() << 32) | (_SEQ & 0xFFFFFFFF)).to_bytes(_HEAD, "little")
    fd = -1
    try:
        fd = _FILES.popleft() if len(_FILES) >= _KEEP else os.memfd_create("mmai-volume", os.MFD_CLOEXEC)
        _write_all(fd, bytes(_HEAD), 0)  # the old content is no longer valid from here on
        os.ftruncate(fd, _HEAD + arr.nbytes)
        _write_all(fd, arr.data.cast("B"), _HEAD)
        _write_all(fd, token, 0)
    except OSError as exc:  # no memory file here: the pickled array instead
        log.debug("volume sent pickled: %s", exc)
        if fd >= 0:
            os.close(fd)
        return arr
    _FILES.append(fd)
    return Shipped(os.getpid(), fd, tuple(int(n) for n in arr.shape), arr.dtype.str, int(arr.nbytes), token)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def receive(value: np.ndarray | Shipped) -> np.ndarray | None:
    """In the model process: the array a worker shipped (read once into a new array), the array
    itself when it came pickled, or None when the worker's file cannot be read (load in place)."""
    if not isinstance(value, Shipped):
        return value
    out = np.empty(value.shape, dtype=np.dtype(value.dtype))
    view, done = out.data.cast("B"), 0
    try:
        with open(f"/proc/{value.pid}/fd/{value.fd}", "rb", buffering=0) as fh:
            before = os.pread(fh.fileno(), _HEAD, 0)
            fh.seek(_HEAD)
            while done < value.nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    break
                done += n
            after = os.pread(fh.fileno(), _HEAD, 0)
    except OSError as exc:
        log.warning("a preprocessing worker's volume could not be read (%s); loading the case in place", exc)
        return None
    if not value.token or before != value.token or after != value.token:
        log.debug("a preprocessing worker reused the volume's file; loading the case in place")
        return None
    if done != value.nbytes:
        log.warning("a preprocessing worker's volume was short (%d of %d bytes); loading the case in place",
                    done, value.nbytes)
        return None
    return out
