"""``mmai predict --dicomweb URL | --dimse AET@HOST:PORT``: the folder predictor, study by study.

Per study: retrieve into the cache, pick the series with the folder rule and load its volume (the
next studies while the model predicts a batch: :mod:`mmai.pacs.pipeline`), predict with
:class:`mmai.inference.predictor.Predictor`, append the row to the predictions CSV, build the result
SR (:mod:`mmai.pacs.sr`) and store it (on a store thread, batched), then release the study's cache
folder. Resumable and idempotent: a study whose row is in the CSV (and whose SR is in
``<out>.stored.csv`` for this destination, when storing) is skipped; a study that fails at any stage
is an error row (``retrieve``, ``select``, ``image``, ``clinical``, ``store``) and the others go on.
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmai.errors import MmaiError
from mmai.inference.dicom_cases import SERIES
from mmai.inference.pipelined import model_threads
from mmai.inference.predictor import (
    Predictor,
    PredictSummary,
    _write_errors,  # one errors-file writer for both sources
    errors_path_for,
    join_path_for,
)
from mmai.inference.rows import error_row, resume_done
from mmai.pacs.cache import StudyCache
from mmai.pacs.pipeline import Prepared, Storer, StudyPrefetch, prepare
from mmai.pacs.retry import RetryPolicy, TransientPacsError
from mmai.pacs.store import FolderSink, Ledger, make_peer
from mmai.pacs.studies import STUDY, find_studies, study_cases
from mmai.utils import atomic_write_json, shard_rows

log = logging.getLogger(__name__)
GB = 1024**3
FETCH_THREADS = 2  # studies retrieved at once (network I/O; 1 for C-MOVE)


@dataclass(frozen=True)
class PacsRequest:
    """The PACS options of one ``mmai predict`` / ``mmai preprocess`` (docs/pacs.md)."""

    address: str  # a DICOMweb URL or AET@HOST:PORT
    query: dict[str, str] = field(default_factory=dict)
    studies_file: Path | None = None
    calling_aet: str = "MMAI"
    move_port: int | None = None
    cache_dir: Path | None = None
    cache_max_gb: float = 10.0
    keep_cache: bool = False
    policy: RetryPolicy = RetryPolicy()
    store_results: bool = False
    store_to: str | None = None
    dry_run: bool = False

    def source(self) -> Any:
        option = "--dicomweb" if self.address.startswith(("http://", "https://")) else "--dimse"
        return make_peer(self.address, self.policy, calling_aet=self.calling_aet, move_port=self.move_port,
                         option=option)

    def cache(self, default: Path) -> StudyCache:
        if not self.cache_max_gb > 0:
            raise MmaiError(f"--cache-max-gb must be > 0, got {self.cache_max_gb}")
        return StudyCache(self.cache_dir or default, max_bytes=int(self.cache_max_gb * GB), keep=self.keep_cache)


def _sink(req: PacsRequest, source: Any, out_csv: Path) -> tuple[Any, str] | None:
    """Where SRs go and how the ledger names it; None when results are not stored."""
    if req.dry_run:
        folder = out_csv.with_name(out_csv.name.removesuffix(".csv") + ".dicom")
        return FolderSink(folder), f"folder:{folder}"
    if req.store_to:
        peer = make_peer(req.store_to, req.policy, calling_aet=req.calling_aet)
        return peer, str(peer)
    if req.store_results:
        return source, str(source)
    return None


def _prev_rows(out_csv: Path) -> dict[str, dict[str, Any]]:
    """Rows already in the predictions CSV by case_id (a resumed study's SR is built from its row)."""
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return {}
    prev = pd.read_csv(out_csv, keep_default_na=False)
    return {str(r["case_id"]): r for r in prev.to_dict("records")}


def _finished(rec: dict[str, Any], done: set[str], model_id: str, sink: tuple[Any, str] | None,
              ledger: Ledger | None) -> bool:
    """A study needs no work: its row is in the CSV and, when results are stored, its SR is in the
    ledger for this destination."""
    from mmai.pacs.sr import derived_uid

    if rec["case_id"] not in done:
        return False
    return sink is None or ledger is None or ledger.has(rec[STUDY], derived_uid(rec[STUDY], model_id, "sr"), sink[1])


def predict_from_pacs(run_dir: Path, out_csv: Path, req: PacsRequest, *, clinical_path: Path | None = None,
                      device: str | None = None, shard: tuple[int, int] | None = None,
                      progress: bool = True, explain_dir: Path | None = None,
                      workers: int | None = None) -> PredictSummary:
    """Predict the studies a PACS search selects; store one result SR per study when asked (with
    ``explain_dir``: the explanation file set of each study there, and its saliency as a Parametric
    Map stored beside the SR).

    Retrieval, series selection and image loading of the next studies overlap the model's batch
    (:mod:`mmai.pacs.pipeline`): ``workers`` preparing processes (None: the usable cores, at most 8,
    as for a folder; 1: the volume is loaded in place), the folder path's studies per model call
    (:func:`mmai.inference.pipelined.predict_chunk`: ``infer.batch_size``, 1 for full-resolution volumes)
    and its torch threads while the preparing processes live (:func:`~mmai.inference.pipelined.model_threads`).

    Raises:
        MmaiError: bad options, an unreachable PACS at search time (after the retries), a run that does
            not load, or a table-level problem of the clinical table; per-study failures are error rows.
    """
    from mmai import __version__
    from mmai.inference.pipelined import default_workers, predict_chunk

    out_csv = Path(out_csv)
    predictor = Predictor(run_dir, device=device)
    source = req.source()
    sink = _sink(req, source, out_csv)
    selection = find_studies(source, req.query, req.studies_file)
    cases, report = study_cases(selection.refs, clinical_path, predictor.config)
    cases = shard_rows(cases, shard)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(join_path_for(out_csv), {"clinical": str(clinical_path) if clinical_path else None,
                                               "source": str(source), **report.to_json()})
    columns = predictor.columns()
    done = resume_done(out_csv, columns, predictor.model_id)
    prev = _prev_rows(out_csv)
    ledger = Ledger(out_csv.with_name(out_csv.name.removesuffix(".csv") + ".stored.csv")) if sink else None
    errors: list[dict[str, str]] = [error_row(e["case_id"], e["stage"], e["error"]) for e in selection.errors]

    records = cases.to_dict("records")
    todo = [r for r in records if not _finished(r, done, predictor.model_id, sink, ledger)]
    cache = req.cache(out_csv.with_name(out_csv.name.removesuffix(".csv") + ".cache"))
    n_workers = default_workers() if workers is None else workers
    run = _Run(predictor, source, cache, todo, done, n_workers, header=sink is not None)  # forks before threads start
    storer = None
    if sink is not None and ledger is not None:
        storer = Storer(partial(_send, sink, ledger, predictor, __version__), lambda item: cache.release(item.study))
    n_pred = 0
    new_file = not out_csv.exists() or out_csv.stat().st_size == 0
    bs = max(1, predict_chunk(predictor))  # 1 for full-resolution volumes, as for a folder: the model overlaps loading
    step = _Step(predictor, cache, done, prev, errors, explain_dir, __version__)
    try:
        with out_csv.open("a", newline="") as fh, \
                tqdm(total=len(todo), desc="predict (PACS)", unit="study", disable=not progress) as bar:
            writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
            if new_file:
                writer.writeheader()
            for start in range(0, len(todo), bs):
                ready = run.batch(start, bs, errors, bar)
                rows = step.predict(ready, writer, fh)
                n_pred += len(rows)
                step.explain(ready, rows)
                step.hand_over(ready, rows, storer, bar)
            if storer is not None:
                errors += storer.close()
                storer = None
    finally:
        if storer is not None:
            storer.close()
        run.close()
        _close(source)
    cache.remove_if_empty()
    err_path = errors_path_for(out_csv)
    _write_errors(errors, err_path)
    if sink is not None:
        log.info("%d result object(s) recorded as stored to %s", len(ledger.done) if ledger else 0, sink[1])
    n_skipped = len(records) - len(todo)
    return PredictSummary(n_cases=len(records) + len(selection.errors), n_predicted=n_pred, n_skipped=n_skipped,
                          n_failed=len(errors), out=str(out_csv), errors=str(err_path) if errors else None,
                          join=str(join_path_for(out_csv)))


@dataclass
class _Step:
    """What happens to one model call's studies once they are prepared: their rows predicted and
    appended to the CSV, their explanation file sets made (with ``explain_dir``), and each study handed
    to the store thread (which releases its cache folder once its SR is sent) or released."""

    predictor: Predictor
    cache: StudyCache
    done: set[str]  # case_ids already in the CSV (a resumed study is not predicted again)
    prev: dict[str, dict[str, Any]]  # their rows (a resumed study's SR is built from its row)
    errors: list[dict[str, str]]
    explain_dir: Path | None
    version: str

    def _frame(self, pairs: list[tuple[dict[str, Any], Prepared]]) -> pd.DataFrame:
        """The predictor's input rows: each study's record with its series' files as the image column."""
        cfg = self.predictor.config
        image_col = cfg.image.column if cfg.image is not None else "image"
        frame = pd.DataFrame([{**rec, image_col: prep.files, SERIES: prep.series} for rec, prep in pairs])
        return frame.drop(columns=[STUDY])

    def predict(self, ready: list[tuple[dict[str, Any], Prepared]], writer: csv.DictWriter, fh: Any
                ) -> dict[str, dict[str, Any]]:
        """Predict the studies not yet in the CSV, append their rows -> the new rows by case_id."""
        new = [(rec, prep) for rec, prep in ready if rec["case_id"] not in self.done]
        if not new:
            return {}
        got = self.predictor.predict_batch(self._frame(new), self.errors)
        writer.writerows(got)
        fh.flush()
        return {str(r["case_id"]): r for r in got}

    def explain(self, ready: list[tuple[dict[str, Any], Prepared]], rows: dict[str, dict[str, Any]]) -> None:
        """The missing explanation file sets of the studies that have a row (a resumed study's too)."""
        explained = [(rec, prep) for rec, prep in ready
                     if str(rec["case_id"]) in rows or rec["case_id"] in self.done]
        if self.explain_dir is None or not explained:
            return
        from mmai.inference.explain import explain_cases

        explain_cases(self.predictor, self._frame(explained), Path(self.explain_dir), progress=False)

    def hand_over(self, ready: list[tuple[dict[str, Any], Prepared]], rows: dict[str, dict[str, Any]],
                  storer: Storer | None, bar: Any) -> None:
        """Each study with a row to the store thread (what needs the cached files is read now; the SR is
        built there), every other study's cache folder released."""
        for rec, prep in ready:
            case_id, study = str(rec["case_id"]), rec[STUDY]
            row = self.prev[case_id] if case_id in self.done else rows.get(case_id)
            if row is not None and storer is not None:
                try:
                    pmap = (_saliency_map(Path(self.explain_dir), case_id, prep.files, self.predictor.model_id,
                                          self.version) if self.explain_dir is not None else [])
                except (MmaiError, OSError, ValueError) as exc:
                    self.errors.append(error_row(case_id, "store", exc, series=prep.series))
                else:
                    storer.put(_Item(study, row, prep.header, prep.files, pmap))
                    bar.update(1)
                    continue  # the store thread releases the study's cache folder once it is sent
            self.cache.release(study)
            bar.update(1)


class _Run:
    """The studies to do, retrieved and prepared ahead of the batch being predicted (:mod:`mmai.pacs.pipeline`).

    At most ``batch + workers + 2`` studies are in flight (retrieving, preparing, or prepared with their
    volume waiting): the folder path's bound on the volumes held (a batch and the prefetch window), so
    memory and cache stay bounded; before each retrieval the cache is brought under its bound (the
    studies in flight are kept)."""

    def __init__(self, predictor: Predictor, source: Any, cache: StudyCache, todo: list[dict[str, Any]],
                 done: set[str], workers: int, *, header: bool) -> None:
        self.predictor, self.source, self.cache, self.todo, self.done = predictor, source, cache, todo, done
        self.header = header
        self.workers = workers
        self.prefetch: StudyPrefetch | None = None
        self._loader = predictor.loader
        cfg = predictor.config.image
        if workers >= 2 and predictor.loader is not None and predictor.uses_image and cfg is not None and todo:
            on_cpu = str(getattr(predictor, "device", "cpu")).startswith("cpu")
            self.prefetch = StudyPrefetch(predictor.loader, predictor.config, workers,
                                          threads=model_threads(workers) if on_cpu else None)
            predictor.loader = self.prefetch
            log.info("predict (PACS): %d preparing process(es)", workers)
        one = getattr(source, "move_port", None) is not None  # one C-MOVE at a time (one storage SCP sink)
        self.fetchers = ThreadPoolExecutor(max_workers=1 if one else FETCH_THREADS, thread_name_prefix="mmai-pacs-fetch")
        self.submitted: dict[int, Future] = {}
        self.next = 0

    def _stage(self, rec: dict[str, Any]) -> Future:
        """On a retrieval thread: fetch the study, then hand it to a preparing process."""
        study = rec[STUDY]
        self.source.retrieve(study, self.cache)
        folder = self.cache.study_dir(study)
        if self.prefetch is not None:
            return self.prefetch.submit(folder, load=rec["case_id"] not in self.done, header=self.header)
        out: Future = Future()
        out.set_result(prepare(str(folder), self.predictor.config, False, self.header))
        return out

    def _top_up(self, first: int, upto: int) -> None:
        while self.next < min(upto, len(self.todo)):
            self.cache.make_room(busy={r[STUDY] for r in self.todo[first:self.next + 1]})
            self.submitted[self.next] = self.fetchers.submit(self._stage, self.todo[self.next])
            self.next += 1

    def batch(self, start: int, size: int, errors: list[dict[str, str]], bar: Any
              ) -> list[tuple[dict[str, Any], Prepared]]:
        """The studies ``start .. start + size`` retrieved and prepared, in order; a failing study is
        an error row (stage ``retrieve`` or ``select``), its cache folder released."""
        self._top_up(start, start + size + self.workers + 2)
        ready = []
        for k in range(start, min(start + size, len(self.todo))):
            rec = self.todo[k]
            study, case_id = rec[STUDY], rec["case_id"]
            try:
                inner = self.submitted.pop(k).result()
            except (MmaiError, OSError, ValueError) as exc:
                errors.append(error_row(case_id, "retrieve", exc, series=f"study {study}"))
                self.cache.release(study)
                bar.update(1)
                continue
            folder = self.cache.study_dir(study)
            prep = self.prefetch.result(inner, folder, header=self.header) if self.prefetch else inner.result()
            if prep.errors:
                errors += [error_row(case_id, e["stage"], e["error"], series=e.get("series", "")) for e in prep.errors]
                self.cache.release(study)
                bar.update(1)
                continue
            if self.prefetch is not None:
                self.prefetch.ready(prep)
            ready.append((rec, prep))
            self._top_up(start, start + size + self.workers + 2)
        return ready

    def close(self) -> None:
        self.fetchers.shutdown(wait=True, cancel_futures=True)
        if self.prefetch is not None:
            self.prefetch.close()
            self.predictor.loader = self._loader


@dataclass
class _Item:
    """A predicted study waiting for the store thread."""

    study: str
    row: dict[str, Any]
    header: Any  # the first source file's header (patient and study modules of the SR)
    files: list[str]  # the source series (evidence: each file is named by its SOPInstanceUID)
    extra: list[Any]  # other objects to send with the SR (parametric map, overlay)


def _evidence(first: Any, files: list[str]) -> list[Any]:
    """Evidence for the SR: the first file's full header (patient and study modules are copied from it)
    and, for the others, their UIDs (a cache file is named by its SOPInstanceUID, so no other read)."""
    from mmai.pacs.sr import InstanceRef

    study, series, sop_class = str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPClassUID)
    return [first, *(InstanceRef(study, series, sop_class, Path(f).stem) for f in files[1:])]


def _send(sink: tuple[Any, str], ledger: Ledger, predictor: Predictor, version: str,
          items: list[_Item]) -> list[dict[str, str]]:
    """On the store thread: build the SRs of ``items``, send them (with their extra objects) in one
    request, record each object; the error rows of the studies that failed. When the server refuses
    part of a batch, each study is sent again alone, so only the refused ones are error rows."""
    from mmai.pacs.sr import build_sr

    errs: list[dict[str, str]] = []
    built: list[tuple[_Item, list[Any]]] = []
    for it in items:
        try:
            sr = build_sr(it.row, _evidence(it.header, it.files), model_id=predictor.model_id, version=version,
                          kind=predictor.encoding.kind)
        except (MmaiError, ValueError) as exc:  # ValueError: highdicom refused the content
            errs.append(_store_error(it, exc))
            continue
        built.append((it, [sr, *it.extra]))
    groups = [built]
    while groups:
        group = groups.pop(0)
        if not group:
            continue
        try:
            sink[0].store([obj for _, objs in group for obj in objs])
        except (MmaiError, ValueError) as exc:
            if len(group) > 1 and not isinstance(exc.__cause__, TransientPacsError):
                groups += [[g] for g in group]  # refused content, not an unreachable server: find which
            else:
                errs += [_store_error(it, exc) for it, _ in group]
            continue
        ledger.add_many([(it.study, str(obj.SOPInstanceUID), sink[1]) for it, objs in group for obj in objs])
    return errs


def _store_error(it: _Item, exc: Exception) -> dict[str, str]:
    return error_row(it.row["case_id"], "store", exc, series=f"series {it.header.SeriesInstanceUID}")


def _saliency_map(explain_dir: Path, case_id: str, files: list[str], model_id: str, version: str) -> list[Any]:
    """The study's saliency as a Parametric Map over the source instances and a Secondary Capture
    overlay ([] when explain made no map)."""
    import pydicom

    from mmai.inference.explain import case_files
    from mmai.pacs.pmap import build_overlay, build_parametric_map, sample_on_series

    path = case_files(explain_dir, case_id)["saliency"]
    if not path.exists():
        return []
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    values = sample_on_series(path, headers)
    return [build_parametric_map(values, headers, model_id=model_id, version=version),
            build_overlay(values, files, model_id=model_id, version=version)]


def _close(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


