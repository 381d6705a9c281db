"""``mmai predict --dicomweb URL | --dimse AET@HOST:PORT``: the folder predictor, study by study.

Per study: retrieve into the cache (the next study is fetched while this one is predicted), pick the
series with the folder rule, predict with :class:`mmai.inference.predictor.Predictor`, append the row
to the predictions CSV, build the result SR (:mod:`mmai.pacs.sr`) and store it, then release the
study's cache folder. Resumable and idempotent: a study whose row is in the CSV (and whose SR is in
``<out>.stored.csv`` for this destination, when storing) is skipped; a study that fails at any stage
is an error row (``retrieve``, ``select``, ``image``, ``clinical``, ``store``) and the others go on.
"""

from __future__ import annotations

import csv
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmai.errors import MmaiError
from mmai.inference.dicom_cases import SERIES
from mmai.inference.predictor import (
    Predictor,
    PredictSummary,
    _write_errors,  # one errors-file writer for both sources
    errors_path_for,
    join_path_for,
)
from mmai.inference.rows import error_row, resume_done
from mmai.pacs.cache import StudyCache
from mmai.pacs.retry import RetryPolicy
from mmai.pacs.store import FolderSink, Ledger, make_peer
from mmai.pacs.studies import STUDY, find_studies, pick_series, study_cases
from mmai.utils import atomic_write_json, shard_rows

log = logging.getLogger(__name__)
GB = 1024**3


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


def predict_from_pacs(run_dir: Path, out_csv: Path, req: PacsRequest, *, clinical_path: Path | None = None,
                      device: str | None = None, shard: tuple[int, int] | None = None,
                      progress: bool = True, explain_dir: Path | None = None) -> PredictSummary:
    """Predict the studies a PACS search selects; store one result SR per study when asked (with
    ``explain_dir``: the explanation file set of each study there, and its saliency as a Parametric
    Map stored beside the SR).

    Raises:
        MmaiError: bad options, an unreachable PACS at search time (after the retries), a run that does
            not load, or a table-level problem of the clinical table; per-study failures are error rows.
    """
    from mmai import __version__
    from mmai.pacs.sr import derived_uid

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

    def finished(row: dict[str, Any]) -> bool:
        if row["case_id"] not in done:
            return False
        return sink is None or ledger is None or ledger.has(row[STUDY], derived_uid(row[STUDY],
                                                            predictor.model_id, "sr"), sink[1])

    records = cases.to_dict("records")
    todo = [r for r in records if not finished(r)]
    cache = req.cache(out_csv.with_name(out_csv.name.removesuffix(".csv") + ".cache"))
    n_pred = 0
    new_file = not out_csv.exists() or out_csv.stat().st_size == 0
    image_col = predictor.config.image.column if predictor.config.image is not None else "image"
    sending: list[Future] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmai-pacs-fetch") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmai-pacs-store") as storer, \
                out_csv.open("a", newline="") as fh, \
                tqdm(total=len(todo), desc="predict (PACS)", unit="study", disable=not progress) as bar:
            writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
            if new_file:
                writer.writeheader()

            def fetch(k: int) -> Future | None:
                if k >= len(todo):
                    return None
                cache.make_room(busy={todo[k][STUDY]} | ({todo[k - 1][STUDY]} if k else set()))
                return pool.submit(source.retrieve, todo[k][STUDY], cache)

            nxt = fetch(0)
            for k, rec in enumerate(todo):
                fut, nxt = nxt, fetch(k + 1)
                study, case_id = rec[STUDY], rec["case_id"]
                try:
                    if fut is not None:
                        fut.result()
                except (MmaiError, OSError, ValueError) as exc:
                    errors.append(error_row(case_id, "retrieve", exc, series=f"study {study}"))
                    cache.release(study)
                    bar.update(1)
                    continue
                try:
                    files, series, sel_errors = pick_series(cache.study_dir(study), predictor.config)
                except MmaiError as exc:
                    sel_errors = [{"case_id": case_id, "stage": "select", "series": f"study {study}", "error": str(exc)}]
                if sel_errors:
                    errors += [error_row(case_id, e["stage"], e["error"], series=e.get("series", ""))
                               for e in sel_errors]
                    cache.release(study)
                    bar.update(1)
                    continue
                chunk = pd.DataFrame([{**rec, image_col: files, SERIES: series}]).drop(columns=[STUDY])
                if case_id in done:
                    row = prev[case_id]
                else:
                    rows = predictor.predict_batch(chunk, errors)
                    if not rows:
                        cache.release(study)
                        bar.update(1)
                        continue
                    row = rows[0]
                    writer.writerow(row)
                    fh.flush()
                    n_pred += 1
                if explain_dir is not None:
                    from mmai.inference.explain import explain_cases

                    explain_cases(predictor, chunk, Path(explain_dir), progress=False)
                if sink is not None and ledger is not None:
                    try:  # what needs the cached files is read now; building and sending overlap the next study
                        headers = _headers(files)
                        pmap = (_saliency_map(Path(explain_dir), case_id, files, predictor.model_id, __version__)
                                if explain_dir is not None else [])
                    except (MmaiError, OSError, ValueError) as exc:
                        errors.append(error_row(case_id, "store", exc, series=series))
                    else:
                        sending.append(storer.submit(_send, sink, ledger, study, row, headers, pmap, predictor,
                                                     __version__))
                        sending = _collect(sending, errors, block=False)
                cache.release(study)
                bar.update(1)
            sending = _collect(sending, errors, block=True)
    finally:
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


def _headers(files: list[str]) -> list[Any]:
    """Evidence for the SR: the first file's full header (patient and study modules are copied from it)
    and, for the others, their UIDs (a cache file is named by its SOPInstanceUID, so no other read)."""
    import pydicom
    from pydicom import Dataset

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    out: list[Any] = [first]
    for f in files[1:]:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
        ds.SOPClassUID, ds.SOPInstanceUID = first.SOPClassUID, Path(f).stem
        out.append(ds)
    return out


def _send(sink: tuple[Any, str], ledger: Ledger, study: str, row: dict[str, Any], headers: list[Any],
          extra: list[Any], predictor: Predictor, version: str) -> dict[str, str] | None:
    """Build the study's SR, send it (with ``extra`` objects), record it; an error row on failure.
    Runs on the one store thread, so the ledger has one writer."""
    from mmai.pacs.sr import build_sr

    try:
        objects = [build_sr(row, headers, model_id=predictor.model_id, version=version,
                            kind=predictor.encoding.kind), *extra]
        sink[0].store(objects)
    except (MmaiError, ValueError) as exc:  # ValueError: highdicom refused the content
        return error_row(row["case_id"], "store", exc, series=f"series {headers[0].SeriesInstanceUID}")
    for obj in objects:
        ledger.add(study, str(obj.SOPInstanceUID), sink[1])
    return None


def _collect(pending: list[Future], errors: list[dict[str, str]], *, block: bool) -> list[Future]:
    """Move the error rows of finished sends into ``errors``; the sends still running (all, if ``block``)."""
    left = []
    for fut in pending:
        if block or fut.done():
            err = fut.result()
            if err is not None:
                errors.append(err)
        else:
            left.append(fut)
    return left


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


