"""``mmai preprocess --dicomweb URL | --dimse AET@HOST:PORT``: fetch the selected studies into the cache,
pick each study's series with the folder rule, and preprocess them with
:func:`mmai.preprocess.preprocess_frame` (same outputs, case ids and errors.csv as ``--input ROOT``).

Every selected study is fetched before preprocessing starts (the cache holds them all during the run;
a warning says when that is over ``--cache-max-gb``); a rerun fetches again and skips the finished
cases. A study that cannot be retrieved is an errors.csv row (stage ``retrieve``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmai.config import load_config
from mmai.errors import ConfigError, MmaiError
from mmai.inference.dicom_cases import SERIES
from mmai.pacs.predict import PacsRequest, _close
from mmai.pacs.studies import STUDY, find_studies, pick_series, study_cases
from mmai.utils import shard_rows

log = logging.getLogger(__name__)


def preprocess_from_pacs(config_path: Path, out_dir: Path, req: PacsRequest, *, device: str = "cpu",
                         workers: int = 1, shard: tuple[int, int] | None = None, progress: bool = True) -> Any:
    """Fetch, select and preprocess; returns the :class:`mmai.preprocess.PreprocessSummary`."""
    from mmai.preprocess import preprocess_frame

    config = load_config(config_path)
    if config.image is None:
        raise ConfigError(f"{config_path}: image: null; there is nothing to preprocess")
    source = req.source()
    selection = find_studies(source, req.query, req.studies_file)
    cases, _ = study_cases(selection.refs, None, config, announce=False)
    cases = shard_rows(cases.drop(columns=[c for c in cases.columns if c not in
                                           ("case_id", "patient_id", SERIES, config.image.column, STUDY)]), shard)
    cache = req.cache(Path(out_dir) / "pacs_cache")
    errors: list[dict[str, str]] = [dict(e) for e in selection.errors]
    rows = []
    try:
        for rec in tqdm(cases.to_dict("records"), desc="fetch (PACS)", unit="study", disable=not progress):
            study = rec[STUDY]
            try:
                source.retrieve(study, cache)
                files, series, sel_errors = pick_series(cache.study_dir(study), config)
            except (MmaiError, OSError, ValueError) as exc:
                errors.append({"case_id": rec["case_id"], "stage": "retrieve", "series": f"study {study}",
                               "error": " ".join(str(exc).split())[:300]})
                continue
            if sel_errors:
                errors += [{**e, "case_id": rec["case_id"]} for e in sel_errors]
                continue
            rows.append({**rec, config.image.column: files, SERIES: series})
        if cache.size() > cache.max_bytes:
            log.warning("the PACS cache %s holds %.1f GB, over --cache-max-gb; preprocess fetches every selected "
                        "study before it starts", cache.root, cache.size() / 1024**3)
        df = pd.DataFrame(rows, columns=list(cases.columns)).drop(columns=[STUDY, SERIES])
        return preprocess_frame(df, config, Path(out_dir), device=device, workers=workers, shard=None,
                                progress=progress, prior_errors=errors, base_dir=None)
    finally:
        _close(source)
        for rec in cases.to_dict("records"):
            cache.release(rec[STUDY])
        cache.remove_if_empty()
