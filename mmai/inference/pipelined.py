"""Pipelined batch prediction: worker processes read and preprocess the next studies while the model
runs on the current ones.

:func:`attach` swaps the predictor's image loader for a :class:`PrefetchLoader`: a bounded window of
upcoming cases (``workers + 2`` volumes at most) is loaded by ``workers`` processes, each a copy of the
predictor's loader on the CPU with one torch thread. The predictor asks for a case's volume as
before; the answer is the worker's result for that path (found by path, so the order in which the
workers finish does not matter), else the case is loaded in place. Errors are the loader's own
(re-raised in the main process with their message), so a failing case still becomes a row of
``<out>.errors.csv`` and the CSV is written and resumed exactly as without workers.

A run that takes the mask-free focal inventory (:mod:`mmai.data.focal`) has it measured in the
worker, beside the volume, by the same function the main process would run
(:func:`mmai.data.focal.measure`): the main process then only runs the model (the inventory's LoG
filters cost about twice the model's time on a full-resolution CT).

``--workers`` (``mmai predict``) defaults to :func:`default_workers`: the cores this process may use,
capped at 8; 1 loads in place (no worker processes).

Threads: each worker runs torch with one thread, and while workers are loading, the model process
runs torch (on the CPU) with :func:`model_threads` threads, the cores the workers leave (at least 1),
never more than it had. Running the model with every core while the workers also use them
oversubscribes the cores, and torch's OpenMP threads then wait on each other: on 2 cores, the
window encoding of a 512 x 512 x 400 chest CT took 3.5-8 s with 2 threads next to the workers
against 1.2 s with one (docs/benchmarks.md). The threads come back when the workers stop, or
earlier, once every study is loaded and the workers are idle, if nothing else is running on the
machine at that moment (:func:`runnable_now`): the last studies then use the idle workers' cores.
On a busy machine the last studies keep one thread (there two threads cost the model several
times more than they save on an idle one).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from mmai.errors import MmaiError, PreprocessError
from mmai.inference.handover import receive

log = logging.getLogger(__name__)

_WORKER_LOADER: Any = None
_WORKER_MEASURE: Callable[[np.ndarray, np.ndarray], Any] | None = None


def default_workers() -> int:
    """Preprocessing processes for ``mmai predict`` when ``--workers`` is not given: the usable cores, 1..8."""
    return max(1, min(8, usable_cores()))


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runnable_now() -> int:
    """Processes and threads running or ready to run on the machine at this instant (this one
    included; Linux ``/proc/loadavg``), or a large number where that is not known."""
    try:
        with open("/proc/loadavg") as fh:
            return int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 1 << 30


def model_threads(workers: int, cores: int | None = None) -> int:
    """Torch threads for the model while ``workers`` preprocessing processes run: the cores left, >= 1."""
    return max(1, (usable_cores() if cores is None else cores) - workers)


def predict_chunk(predictor: Any) -> int:
    """Cases per model call of ``mmai predict``: ``infer.batch_size``, but 1 for full-resolution volumes
    (``image.size: null``).

    Those volumes differ in shape from study to study, so the model sees them one at a time anyway
    (a batch is never padded), and a chunk of 16 would hold 16 volumes of ~100 MB and keep the model
    waiting until the last of them is loaded: nothing would overlap the workers' loading. One case
    per call lets the model run on study k while the workers load k + 1, k + 2, ...
    """
    cfg = predictor.config
    if cfg.image is not None and cfg.image.size is None and getattr(predictor, "uses_image", True):
        return 1
    return int(cfg.infer.batch_size)


def _die_with_parent() -> None:
    """In a freshly started worker (Linux): ask the kernel to kill it when the thread that forked it
    dies, so a killed ``mmai predict`` leaves no process behind waiting for work."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the worker outlives a killed parent
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _init(loader: Any, measure: Callable[[np.ndarray, np.ndarray], Any] | None = None, keep: int = 0) -> None:
    import torch

    from mmai.inference.handover import set_keep

    _die_with_parent()
    torch.set_num_threads(1)
    set_keep(keep)  # volumes go back through memory files, not pickled (mmai.inference.handover)
    global _WORKER_LOADER, _WORKER_MEASURE
    _WORKER_LOADER, _WORKER_MEASURE = loader, measure


def _load(path: Any, shipped: bool = True) -> tuple[str, Any]:
    """In a worker: ("ok", (array, affine, note)) or ("error", (error class, message)); the array
    through a memory file when ``shipped`` (:mod:`mmai.inference.handover`), else pickled."""
    loader = _WORKER_LOADER
    try:
        arr, affine = loader.load(path)
    except MmaiError as exc:
        return "error", (type(exc), str(exc))
    note = {"modalities": sorted(loader.modalities_seen), "intensity_stats": loader.stats,
            "input_flags": loader.last_flags,  # what the worker's loader repaired (mmai.io.input_flags)
            "measured": _measure(arr, affine)}
    from mmai.inference.handover import ship

    arr = np.ascontiguousarray(arr)
    return "ok", (ship(arr) if shipped else arr, affine, note)


def _measure(arr: np.ndarray, affine: np.ndarray) -> Any:
    """In a worker: the measurement of the volume the model will get (the focal inventory), or None
    (none asked, or it failed: the main process measures again and reports the failure itself)."""
    if _WORKER_MEASURE is None:
        return None
    try:
        return _WORKER_MEASURE(arr, affine)
    except Exception:  # noqa: BLE001 - measured again in the main process, which names the failure
        return None


def _key(path: Any) -> Any:
    return tuple(str(p) for p in path) if isinstance(path, (list, tuple)) else str(path)


class PrefetchLoader:
    """The predictor's loader with a window of cases loaded ahead by worker processes.

    Args:
        loader: the predictor's :class:`mmai.data.dataset.ImageLoader` (copied to each worker).
        paths: the image paths of the cases to come, in the order they will be asked for.
        workers: worker processes (>= 1).
        ahead: how many volumes may be loaded and waiting at once (default ``workers + 2``).
        threads: torch threads of this process while the workers live (None: leave them); the
            previous number comes back at :meth:`close`.
        measure: ``f(array, affine)`` a worker runs on each volume it loads, its answer handed over
            with the volume (:meth:`peek_measured`): predict's focal inventory
            (:func:`mmai.data.focal.measure`), so the main process only runs the model.
    """

    def __init__(self, loader: Any, paths: Sequence[Any], workers: int, ahead: int | None = None,
                 threads: int | None = None, measure: Callable[[np.ndarray, np.ndarray], Any] | None = None
                 ) -> None:
        import copy

        import torch

        self.loader = loader
        self.last_flags = ""  # the input flags of the case just loaded, as ImageLoader.last_flags
        self.last_measured: Any = None  # the worker's measurement of the case just loaded (None: none)
        self.ahead = ahead or workers + 2
        self.queue: deque[Any] = deque(p for p in paths if p is not None and not (isinstance(p, float) and np.isnan(p)))
        self.futures: dict[Any, Future] = {}
        self._recent: dict[Any, tuple[np.ndarray, np.ndarray, str, Any]] = {}  # peeked volumes (:meth:`peek`)
        self._shipped = True  # volumes through memory files (False after one could not be read)
        worker_loader = copy.copy(loader)
        worker_loader.device = "cpu"  # the workers feed the model's device; they preprocess on the CPU
        worker_loader._chain = None
        self.pool: ProcessPoolExecutor | None = ProcessPoolExecutor(max_workers=workers, initializer=_init,
                                                                     initargs=(worker_loader, measure, self.ahead + 1))
        # a fork pool forks all its processes at the first submit: do it now, from this (long-lived)
        # thread, which the workers' death-with-parent signal is tied to
        self.pool.submit(int)
        self._threads_before: int | None = None
        if threads is not None and threads < torch.get_num_threads():
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
            log.debug("predict: model on %d torch thread(s) while %d worker(s) load", threads, workers)
        self._fill()

    def _restore_threads(self) -> None:
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def _fill(self) -> None:
        while self.pool is not None and self.queue and len(self.futures) < self.ahead:
            path = self.queue.popleft()
            key = _key(path)
            if key not in self.futures:
                try:
                    self.futures[key] = self.pool.submit(_load, path, self._shipped)
                except BrokenProcessPool:
                    self._broken()

    def _broken(self) -> None:
        log.warning("a preprocessing worker died (out of memory?); loading the remaining cases in place")
        self.close()

    def peek(self, path: Any) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`load`, keeping the volume for the next ``load`` of the same path (the focal
        inventory measures the volume the model then gets: one load, one preprocessing)."""
        key = _key(path)
        if key in self._recent:
            arr, affine, self.last_flags, self.last_measured = self._recent[key]
            return arr, affine
        arr, affine = self.load(path)
        if len(self._recent) >= self.ahead:  # bounded: volumes peeked but never asked for again
            self._recent.clear()
        self._recent[key] = (arr, affine, self.last_flags, self.last_measured)
        return arr, affine

    def peek_measured(self, path: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """:meth:`peek` plus the worker's ``measure`` of that volume (None when it was loaded in
        place, no measure was given, or the measure failed in the worker)."""
        arr, affine = self.peek(path)
        return arr, affine, self.last_measured

    def load(self, path: Any, roi: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(array (C, I, J, K), affine (4, 4)) of one case, from the workers when they loaded it."""
        if roi is None and (kept := self._recent.pop(_key(path), None)) is not None:
            arr, affine, self.last_flags, self.last_measured = kept
            self._threads_for_the_tail()  # the model's load of a peeked volume: the workers may be done now
            return arr, affine
        fut = self.futures.pop(_key(path), None) if roi is None else None
        self._fill()
        if fut is None:
            return self._in_place(path, roi)
        try:
            status, value = fut.result()
        except BrokenProcessPool:
            self._broken()
            return self._in_place(path, roi)
        if status == "error":
            cls, msg = value
            try:
                exc = cls(msg)
            except Exception:  # noqa: BLE001 - an error class with another signature
                exc = PreprocessError(msg)
            raise exc
        sent, affine, note = value
        got = receive(sent)  # the worker's memory file, read once (mmai.inference.handover)
        if got is None:  # unreadable here (e.g. a locked-down /proc): the next volumes come pickled
            self._shipped = False
            return self._in_place(path, roi)
        self.last_flags = str(note.get("input_flags") or "")
        self.last_measured = note.get("measured")
        for m in note["modalities"]:
            self.loader._note({"modality": m, "intensity_stats": note["intensity_stats"]})
        self._threads_for_the_tail()
        return got, affine

    def _threads_for_the_tail(self) -> None:
        """Once every study is loaded (nothing queued, every worker idle), give the model its threads
        back if nothing else runs on the machine now: the last studies then use the cores the idle
        workers left (on a quiet 2-core machine the window encoding of a chest CT takes ~0.35 s on
        2 threads against ~0.57 s on 1). On a busy machine the model keeps its one thread: there two
        threads cost it several times what they save (the module docstring)."""
        if self._threads_before is None or self.queue or any(not f.done() for f in self.futures.values()):
            return
        others = runnable_now() - 1  # besides this thread
        if others + self._threads_before <= usable_cores():  # a core for each thread, none taken
            self._restore_threads()
            log.debug("predict: workers idle on a quiet machine; the model gets its threads back")

    def _in_place(self, path: Any, roi: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
        self.last_flags, self.last_measured = "", None
        out = self.loader.load(path, roi)
        self.last_flags = self.loader.last_flags
        return out

    def __call__(self, path: Any) -> np.ndarray:
        return self.load(path)[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def close(self) -> None:
        """Stop the workers (cases not asked for yet are dropped) and give back the model's threads."""
        self._restore_threads()
        if self.pool is not None:
            for fut in self.futures.values():
                fut.cancel()
            self.futures.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def worker_measure(predictor: Any) -> Callable[[np.ndarray, np.ndarray], Any] | None:
    """What the workers measure beside each volume: the focal inventory of a run that takes it
    (:func:`mmai.data.focal.measure` on the run's channel), else None."""
    import functools

    from mmai.data.descriptors import is_focal

    names, cfg = getattr(predictor, "descriptors", None), predictor.config.image
    if not names or cfg is None or not is_focal(names):
        return None
    from mmai.data.focal import channel_for, measure

    return functools.partial(measure, channel=channel_for(cfg))


def attach(predictor: Any, todo: Any, workers: int | None) -> Callable[[], None]:
    """Give ``predictor`` a :class:`PrefetchLoader` over the image paths of ``todo`` (a manifest
    frame); returns the function that stops the workers and restores the loader. ``workers``: None
    -> :func:`default_workers`; 1, a run without images, or fewer than 2 images: nothing changes."""
    n = default_workers() if workers is None else workers
    cfg = predictor.config.image
    loader = getattr(predictor, "loader", None)
    if n < 2 or loader is None or cfg is None or not getattr(predictor, "uses_image", True) \
            or cfg.column not in todo.columns or len(todo) < 2:
        return lambda: None
    on_cpu = str(getattr(predictor, "device", "cpu")).startswith("cpu")
    from mmai.inference.heap import keep_freed_memory

    give_back = keep_freed_memory()  # before the workers fork: they inherit it (mmai.inference.heap)
    prefetch = PrefetchLoader(loader, list(todo[cfg.column]), n, threads=model_threads(n) if on_cpu else None,
                              measure=worker_measure(predictor))
    predictor.loader = prefetch
    log.info("predict: %d preprocessing worker(s), %d volume(s) ahead", n, prefetch.ahead)

    def stop() -> None:
        prefetch.close()
        predictor.loader = loader
        give_back()

    return stop
