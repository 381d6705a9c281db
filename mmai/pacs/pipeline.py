"""The overlap of ``mmai predict`` from a PACS: retrieval threads, preparing processes, one store thread.

While the model predicts a batch of studies:

- **retrieval** threads (network I/O; 2, or 1 for C-MOVE, whose storage SCP writes for one study at a
  time) fetch the next studies into the cache;
- **preparing** processes (``--workers``; the folder path's :class:`mmai.inference.pipelined.PrefetchLoader`
  pool, each with a copy of the predictor's image loader) pick each fetched study's series with the
  folder rule and read and preprocess its volume, so the model gets the volume the folder path
  would load (the same loader, the same transforms);
- the **store** thread builds the SRs of the studies already predicted and sends whatever has queued
  up in one request (STOW-RS or one C-STORE association), then records each object in the ledger
  and releases the study's cache folder.

A broken preparing process (out of memory) makes the remaining studies prepare in place, as the
folder path does. With ``workers`` 1 the series is picked on the retrieval thread and the volume is
loaded in place by the predictor.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmai.errors import MmaiError
from mmai.inference.pipelined import PrefetchLoader, _key, _load

log = logging.getLogger(__name__)
STORE_BATCH = 16  # result objects of at most this many studies go in one store request


@dataclass
class Prepared:
    """A fetched study made ready to predict: the selected series' files (sorted as the folder path
    sorts them), its label, selection errors (then no files), the first file's header (for the SR)
    and the loader's result for the files (``pipelined._load``'s tuple) when it was loaded ahead."""

    files: list[str] = field(default_factory=list)
    series: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)
    header: Any = None
    loaded: tuple[str, Any] | None = None


def prepare(study_dir: str, config: Any, load: bool, header: bool) -> Prepared:
    """Pick the study's series (:func:`mmai.pacs.studies.pick_series`); with ``load``, read and preprocess
    it with the worker's loader (in a preparing process); with ``header``, read its first header."""
    from mmai.pacs.studies import pick_series

    try:
        files, series, errors = pick_series(Path(study_dir), config)
    except MmaiError as exc:
        return Prepared(errors=[{"stage": "select", "series": f"study {Path(study_dir).name}", "error": str(exc)}])
    if errors:
        return Prepared(series=series, errors=errors)
    out = Prepared(files=files, series=series)
    if header:
        import pydicom

        out.header = pydicom.dcmread(files[0], stop_before_pixels=True)
    if load:
        out.loaded = _load(files)
    return out


class StudyPrefetch(PrefetchLoader):
    """The predictor's loader fed by preparing processes (a :class:`PrefetchLoader` whose window is
    filled study by study as studies arrive, instead of from a list known at the start).

    :meth:`submit` prepares a fetched study in a process; :meth:`ready` hands its loaded volume to the
    loader, so ``Predictor.predict_batch`` finds it by path like a prefetched folder case.
    """

    def __init__(self, loader: Any, config: Any, workers: int, threads: int | None = None) -> None:
        super().__init__(loader, [], workers, threads=threads)
        self.config = config

    def _threads_for_the_tail(self) -> None:
        """Never early: the folder path gives the model the idle workers' cores once every study of
        its list is loaded, but here an empty window only means the retrieval is behind (more
        studies may still arrive), so the model keeps the cores the preparing processes leave until
        they stop (:meth:`close`)."""

    def submit(self, study_dir: Path, *, load: bool, header: bool) -> Future:
        """Prepare a fetched study in a process (in place when the pool is gone)."""
        if self.pool is not None:
            try:
                return self.pool.submit(prepare, str(study_dir), self.config, load, header)
            except (BrokenProcessPool, RuntimeError):  # RuntimeError: the pool was shut down
                self._broken()
        done: Future = Future()
        done.set_result(prepare(str(study_dir), self.config, False, header))
        return done

    def result(self, fut: Future, study_dir: Path, *, header: bool) -> Prepared:
        """The prepared study; prepared again in place (no volume ahead) when its process died."""
        try:
            return fut.result()
        except BrokenProcessPool:
            if self.pool is not None:
                self._broken()
            return prepare(str(study_dir), self.config, False, header)

    def ready(self, prepared: Prepared) -> None:
        """Offer the study's loaded volume to the predictor (the next ``load`` of its files takes it)."""
        if prepared.loaded is not None and prepared.files:
            fut: Future = Future()
            fut.set_result(prepared.loaded)
            self.futures[_key(prepared.files)] = fut
            prepared.loaded = None


class Storer:
    """One background thread that builds and sends result objects in batches (see the module docstring).

    Args:
        send: ``send(items) -> error rows``, called on the thread with a list of queued items (at most
            :data:`STORE_BATCH`), in the order they were put.
        after: called on the thread with each item once its batch is done (the cache release).
    """

    def __init__(self, send: Callable[[list[Any]], list[dict[str, str]]], after: Callable[[Any], None]) -> None:
        self._send, self._after = send, after
        self._queue: queue.Queue = queue.Queue()
        self.errors: list[dict[str, str]] = []
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mmai-pacs-store", daemon=True)
        self._thread.start()

    def put(self, item: Any) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < STORE_BATCH and not self._queue.empty():
                items.append(self._queue.get())
            stop = items[-1] is None
            items = [i for i in items if i is not None]
            if items and self._failure is None:
                try:
                    self.errors += self._send(items)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread by close()
                    self._failure = exc
                for item in items:
                    self._after(item)
            if stop:
                return

    def close(self) -> list[dict[str, str]]:
        """Send what is queued, stop the thread; the error rows (an unexpected failure is re-raised)."""
        self._queue.put(None)
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self.errors
