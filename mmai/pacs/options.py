"""The PACS options of ``mmai predict`` and ``mmai preprocess`` (import-light: argparse only) and their
translation into a :class:`mmai.pacs.predict.PacsRequest`. docs/pacs.md describes each one."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mmai.errors import MmaiError

STORE_OPTIONS = ("store_results", "store_to", "dry_run")


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}") from exc
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {n}")
    return n


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from exc
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def int_at_least(minimum: int) -> Any:
    """An argparse ``type`` for whole numbers >= ``minimum`` (one wording for every such option)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}") from exc
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n

    return parse


_retries = int_at_least(0)


def add_pacs_options(p: argparse.ArgumentParser, *, results: bool) -> None:
    """Add the PACS option group; ``results`` adds ``--store-results``, ``--store-to``, ``--dry-run``."""
    g = p.add_argument_group("studies from a PACS (docs/pacs.md)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--dicomweb", metavar="URL", help="DICOMweb service root (QIDO-RS search, WADO-RS retrieve), "
                     "e.g. http://pacs:8042/dicom-web")
    src.add_argument("--dimse", metavar="AET@HOST:PORT", help="DIMSE peer (C-FIND search, C-GET retrieve; C-MOVE "
                     "with --move-port)")
    g.add_argument("--query", action="append", metavar="KEY=VALUE", default=None,
                   help="study filter, repeatable: StudyDate=YYYYMMDD[-YYYYMMDD], ModalitiesInStudy=CT, "
                   "AccessionNumber=..., PatientID=..., StudyInstanceUID=...")
    g.add_argument("--studies", metavar="FILE", help="CSV with a StudyInstanceUID (or AccessionNumber) column: "
                   "the studies to fetch")
    g.add_argument("--calling-aet", default="MMAI", metavar="AET", help="mmai's AE title for --dimse (default MMAI)")
    g.add_argument("--move-port", type=_port, default=None, metavar="PORT",
                   help="retrieve by C-MOVE to mmai's own storage SCP listening on PORT (the PACS must know "
                   "--calling-aet at this host and port); default: C-GET")
    g.add_argument("--cache", metavar="DIR", help="folder of retrieved instances (default: beside --out)")
    g.add_argument("--cache-max-gb", type=_positive, default=10.0, metavar="G", help="cache bound in GiB (default 10)")
    g.add_argument("--keep-cache", action="store_true", help="keep retrieved studies (default: each study's "
                   "files are removed once it is done)")
    g.add_argument("--retries", type=_retries, default=3, metavar="N", help="retries of a timed-out or refused PACS operation, "
                   "with exponential backoff (default 3)")
    g.add_argument("--pacs-timeout", type=_positive, default=30.0, metavar="S",
                   help="seconds each PACS request / association may take (default 30)")
    if results:
        r = g.add_mutually_exclusive_group()
        r.add_argument("--store-results", action="store_true", help="send one DICOM SR per study back to the "
                       "source PACS (STOW-RS or C-STORE)")
        r.add_argument("--store-to", metavar="URL|AET@HOST:PORT", help="send the result SRs to another server")
        g.add_argument("--dry-run", action="store_true", help="write the result SRs to <out>.dicom/ instead of "
                       "sending them")


def uses_pacs(a: argparse.Namespace) -> bool:
    """True when the command reads studies from a PACS; PACS-only options without a PACS are errors."""
    if getattr(a, "dicomweb", None) or getattr(a, "dimse", None):
        return True
    given = [f"--{k.replace('_', '-')}" for k in ("query", "studies", "move_port", "cache", "keep_cache",
                                                  *STORE_OPTIONS) if getattr(a, k, None)]
    if given:
        raise MmaiError(f"{', '.join(given)} go(es) with --dicomweb URL or --dimse AET@HOST:PORT")
    return False


def request_from_args(a: argparse.Namespace) -> Any:
    """The :class:`mmai.pacs.predict.PacsRequest` of parsed arguments."""
    from mmai.pacs.predict import PacsRequest
    from mmai.pacs.query import parse_query
    from mmai.pacs.retry import RetryPolicy

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its per-association log lines; mmai says it once
    return PacsRequest(
        address=a.dicomweb or a.dimse, query=parse_query(a.query),
        studies_file=Path(a.studies) if a.studies else None, calling_aet=a.calling_aet, move_port=a.move_port,
        cache_dir=Path(a.cache) if a.cache else None, cache_max_gb=a.cache_max_gb, keep_cache=a.keep_cache,
        policy=RetryPolicy(attempts=a.retries + 1, timeout_s=a.pacs_timeout),
        store_results=bool(getattr(a, "store_results", False)), store_to=getattr(a, "store_to", None),
        dry_run=bool(getattr(a, "dry_run", False)),
    )


def predict(a: argparse.Namespace) -> Any:
    """``mmai predict`` with a PACS source: the summary of :func:`mmai.pacs.predict.predict_from_pacs`."""
    from mmai.pacs.predict import predict_from_pacs

    if a.manifest or a.dicom_root:
        raise MmaiError("predict takes one source: --manifest, --dicom-root, --dicomweb or --dimse")
    return predict_from_pacs(Path(a.run), Path(a.out), request_from_args(a),
                             clinical_path=Path(a.clinical) if a.clinical else None, device=a.device,
                             shard=a.shard, progress=not a.quiet, explain_dir=Path(a.explain) if a.explain else None,
                             workers=a.workers)


def preprocess(a: argparse.Namespace) -> Any:
    """``mmai preprocess`` with a PACS source: fetch the studies, then preprocess the fetched folder."""
    from mmai.pacs.fetch import preprocess_from_pacs

    if a.input:
        raise MmaiError("preprocess takes one source: --input, --dicomweb or --dimse")
    if a.shard is not None:
        raise MmaiError("preprocess --shard with a PACS source is not supported; split the studies with "
                        "--studies FILE per process instead")
    return preprocess_from_pacs(Path(a.config), Path(a.out), request_from_args(a), device=a.device,
                                workers=a.workers, shard=a.shard, progress=not a.quiet)
