"""``mmai preprocess``: DICOM root or manifest -> model-ready NIfTI volumes + a new manifest.

Writes OUT/images/<case_id>.nii.gz (atomically; tagged with the pipeline id), OUT/manifest.csv
(the input rows, image column pointing at the outputs, relative to OUT) and OUT/errors.csv
(case_id, stage, error). A finished case (output present with the same pipeline id) is skipped
on re-run. One bad case never stops the others. ``--shard I/N`` processes every N-th case and
writes manifest/errors files named ``*.shardIofN.csv``; a final run without ``--shard`` (all
cases then skip) writes the merged manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from mmai.config import ImageConfig, PipelineConfig, load_config
from mmai.errors import ConfigError, MmaiError
from mmai.io.manifest import load_manifest
from mmai.outputs import is_disk_full
from mmai.transforms.pipelines import image_pipeline_id

log = logging.getLogger(__name__)


@dataclass
class PreprocessSummary:
    n_cases: int
    n_done: int
    n_skipped: int
    n_missing_image: int
    n_failed: int
    out_dir: str

    @property
    def all_failed(self) -> bool:
        """Every case of this run failed (nothing written now or before): exit status 1."""
        return self.n_failed > 0 and self.n_done == 0 and self.n_skipped == 0 and self.n_missing_image == 0

    def __str__(self) -> str:
        return (f"preprocessed {self.n_done} case(s), {self.n_skipped} already done, {self.n_missing_image} without "
                f"image, {self.n_failed} failed -> {self.out_dir}"
                + (f" (see {self.out_dir}/errors.csv)" if self.n_failed else ""))


def safe_name(case_id: str) -> str:
    """A file name for a case: the id itself when safe, else a sanitised id + short hash."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", case_id).strip("._") or "case"
    if clean == case_id:
        return clean
    return f"{clean[:60]}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"


def _is_done(path: Path, pipeline_id: str, stats: dict[str, float] | None) -> bool:
    if not path.exists():
        return False
    from mmai.data.provenance import read_provenance
    from mmai.transforms.intensity import stats_digest

    try:
        info = read_provenance(path)
    except Exception:  # noqa: BLE001 - an unreadable old output is simply redone
        return False
    return (info is not None and info.get("pipeline_id") == pipeline_id
            and stats_digest(info.get("intensity_stats")) == stats_digest(stats))


def _process_one(image_cfg: ImageConfig, source: Any, out_path: str, device: str,
                 roi: dict[str, Any] | None = None, stats: dict[str, float] | None = None) -> tuple[str, float]:
    """Load + transform one case and write it. Runs in a worker process. Returns (path, fov lost fraction)."""
    from mmai.data.dataset import save_preprocessed
    from mmai.data.descriptors import provenance_entry
    from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms

    chain = preprocess_transforms(image_cfg, device=device, stats=stats)
    out = apply_chain(chain, {KEY: source, **(roi or {})})
    lost = float(out.get("fov_lost_fraction", 0.0))
    save_preprocessed(out[KEY], Path(out_path), image_cfg, modality=str(out.get("modality", "unknown")),
                      stats=stats, fov_lost_fraction=lost, input_flags=str(out.get("input_flags") or ""),
                      descriptors=provenance_entry(out))
    return out_path, lost


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def cases_from_input(input_path: Path, config: PipelineConfig, *, workers: int = 1,
                     progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The cases to preprocess: a validated manifest, or one case per study of a DICOM root
    (with the studies whose series selection failed as errors)."""
    if input_path.is_dir():
        from mmai.inference.dicom_cases import cases_from_dicom_root

        return cases_from_dicom_root(input_path, None, config, workers=workers, progress=progress)
    return load_manifest(input_path, config, require_targets=False, check_files=False), []


def run_preprocess(*, config_path: Path, input_path: Path, out_dir: Path, device: str = "cpu", workers: int = 1,
                   shard: tuple[int, int] | None = None, progress: bool = True) -> PreprocessSummary:
    """Preprocess every case of ``input_path`` (manifest file or DICOM root) into ``out_dir``."""
    config = load_config(config_path)
    if config.image is None:
        raise ConfigError(f"{config_path}: image: null; there is nothing to preprocess")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if device.startswith("cuda"):
        from mmai.utils import resolve_device

        resolve_device(device)
    input_path = Path(input_path)
    if not input_path.exists():
        raise MmaiError(f"--input {input_path} does not exist")
    df, select_errors = cases_from_input(input_path, config, workers=workers, progress=progress)
    return preprocess_frame(df, config, Path(out_dir), device=device, workers=workers, shard=shard,
                            progress=progress, prior_errors=select_errors,
                            base_dir=None if input_path.is_dir() else input_path.parent)


def preprocess_frame(df: pd.DataFrame, config: PipelineConfig, out_dir: Path, *, device: str = "cpu",
                     workers: int = 1, shard: tuple[int, int] | None = None, progress: bool = True,
                     prior_errors: list[dict[str, str]] | None = None,
                     base_dir: Path | None = None) -> PreprocessSummary:
    """Preprocess the cases of a validated manifest frame (image column = absolute paths, a DICOM
    stack's file list, or None). ``prior_errors`` (e.g. failed series selection) go to errors.csv.
    ``base_dir``: folder that relative ROI mask paths are relative to (the manifest's).

    With ``image.intensity.kind: percentile`` the statistics are first fitted on the training rows
    (``split`` not ``test``/``val``; all rows without a split column) and written to
    OUT/preprocess_state.json and into every volume's provenance.
    """
    from mmai.transforms.roi import roi_sources

    if config.image is None:
        raise ConfigError(f"{config.source}: image: null; there is nothing to preprocess")
    from mmai.engine.autoconfig import resolve_image

    config, _ = resolve_image(config, df, base_dir=base_dir)  # a lesion box the YAML does not size
    assert config.image is not None  # resolve_image keeps the image section
    from mmai.inference.ranks import preprocess_ranked, rank_job

    job = rank_job(shard)  # under torchrun: this process's share, merged into OUT/manifest.csv by rank 0
    if job is not None:
        from functools import partial

        fit = partial(_fit_stats, config, df, roi_sources(config.image, df, base_dir), out_dir, None, progress) \
            if config.image.intensity.kind == "percentile" else None
        return preprocess_ranked(job, preprocess_frame, df, config, out_dir, fit_stats=fit, device=device,
                                 workers=workers, progress=progress, prior_errors=prior_errors, base_dir=base_dir)
    col = config.image.column
    pid = image_pipeline_id(config.image)
    rois = roi_sources(config.image, df, base_dir)
    roi_of = dict(zip(df["case_id"], rois, strict=True))
    stats = _fit_stats(config, df, rois, out_dir, shard, progress)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    from mmai.utils import shard_rows

    df = shard_rows(df, shard)
    out_rel, todo, n_skipped, n_missing = _plan(df, config, images_dir, pid, stats)
    errors: list[dict[str, str]] = list(prior_errors or [])
    lost, failed = _run_cases(todo, config.image, device, roi_of, stats, workers, errors, progress)
    out = df[~df["case_id"].isin(failed)].copy()
    out[col] = [out_rel[c] for c in out["case_id"]]
    if config.image.roi is None:  # ROI boxes crop by design; whole-scan grids record what they cut
        out["fov_lost_fraction"] = [_lost_of(lost, c, out_rel[c], images_dir.parent) for c in out["case_id"]]
    else:  # a lesion-mask pipeline: its lesion descriptors as columns, read back from the volumes
        from mmai.data.descriptors import descriptor_columns

        out = descriptor_columns(config.image, out, out_dir)
    from mmai.data.provenance import input_flags_column

    out["input_flags"] = input_flags_column(out["case_id"], [out_rel[c] for c in out["case_id"]], out_dir)
    suffix = "" if shard is None else f".shard{shard[0]}of{shard[1]}"
    _write_csv(out, out_dir / f"manifest{suffix}.csv")
    _write_csv(pd.DataFrame(errors, columns=["case_id", "stage", "error"]), out_dir / f"errors{suffix}.csv")
    return PreprocessSummary(n_cases=len(df) + len(prior_errors or []), n_done=len(todo) - len(failed),
                             n_skipped=n_skipped, n_missing_image=n_missing,
                             n_failed=len(failed) + len(prior_errors or []), out_dir=str(out_dir))


def _plan(df: pd.DataFrame, config: PipelineConfig, images_dir: Path, pid: str, stats: dict[str, float] | None,
          ) -> tuple[dict[str, str | None], list[tuple[str, Any, Path]], int, int]:
    """Each case's output path (None: no image) and the cases still to do (not finished by an earlier
    run with the same pipeline, statistics and descriptor version), with the skipped / missing counts."""
    from mmai.data.descriptors import stale_descriptors

    assert config.image is not None
    out_rel: dict[str, str | None] = {}
    todo: list[tuple[str, Any, Path]] = []
    n_skipped = n_missing = 0
    for cid, src in zip(df["case_id"], df[config.image.column], strict=True):
        if src is None or (isinstance(src, float) and pd.isna(src)):  # image missing: kept, no file
            out_rel[cid] = None
            n_missing += 1
            continue
        target = images_dir / f"{safe_name(cid)}.nii.gz"
        out_rel[cid] = f"images/{target.name}"
        if _is_done(target, pid, stats) and not stale_descriptors(config.image, target):
            n_skipped += 1
            continue
        todo.append((cid, src, target))
    return out_rel, todo, n_skipped, n_missing


def _run_cases(todo: list[tuple[str, Any, Path]], image: Any, device: str, roi_of: dict[str, Any],
               stats: dict[str, float] | None, workers: int, errors: list[dict[str, str]],
               progress: bool) -> tuple[dict[str, float], set[str]]:
    """Preprocess ``todo`` (in ``workers`` processes when more than one): each case's lost FOV fraction,
    and the cases that failed (appended to ``errors``; a full disk stops the run instead)."""
    lost: dict[str, float] = {}
    failed: set[str] = set()
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=not progress)

    def fail(cid: str, exc: BaseException) -> None:
        if is_disk_full(exc):  # not the case's fault: stop (exit 3); the rerun resumes
            raise exc
        errors.append({"case_id": cid, "stage": "image", "error": f"{type(exc).__name__}: {exc}"})
        failed.add(cid)
        log.warning("case %s failed: %s", cid, exc)

    if workers == 1 or len(todo) <= 1:
        for cid, src, target in todo:
            try:
                lost[cid] = _process_one(image, src, str(target), device, roi_of[cid], stats)[1]
            except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
                fail(cid, exc)
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
            futures = {pool.submit(_process_one, image, src, str(target), device, roi_of[cid], stats): cid
                       for cid, src, target in todo}
            for fut in as_completed(futures):
                try:
                    lost[futures[fut]] = fut.result()[1]
                except Exception as exc:  # noqa: BLE001 - one bad case never stops the others
                    fail(futures[fut], exc)
                bar.update(1)
    bar.close()
    return lost, failed


def _lost_of(lost: dict[str, float], cid: str, rel: str | None, out_dir: Path) -> float | None:
    """The FOV lost fraction of a case: this run's, or a finished output's provenance."""
    if cid in lost:
        return round(lost[cid], 6)
    if rel is None:
        return None
    from mmai.data.provenance import read_provenance

    info = read_provenance(out_dir / rel) or {}
    value = info.get("fov_lost_fraction")
    return None if value is None else float(value)


def _train_rows(df: pd.DataFrame) -> list[int]:
    """Rows whose images may be used to fit intensity statistics (training split only)."""
    if "split" not in df.columns:
        return list(range(len(df)))
    return [i for i, v in enumerate(df["split"]) if str(v).strip().lower() not in ("test", "val")]


def _fit_stats(config: PipelineConfig, df: pd.DataFrame, rois: list[dict[str, Any] | None], out_dir: Path,
               shard: tuple[int, int] | None, progress: bool) -> dict[str, float] | None:
    """Fitted (or reloaded) percentile statistics, None for pipelines that learn none."""
    from mmai.transforms.intensity import fit_percentile_stats, foreground_sample
    from mmai.transforms.pipelines import FG, KEY, apply_chain, preprocess_transforms
    from mmai.utils import atomic_write_json

    cfg = config.image
    if cfg is None or cfg.intensity.kind != "percentile":
        return None
    state_path = out_dir / "preprocess_state.json"
    pid = image_pipeline_id(cfg)
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("pipeline_id") == pid:
            return state["intensity_stats"]
    if shard is not None:
        raise ConfigError(f"{state_path} is missing: with intensity.kind percentile, run one preprocess without "
                          "--shard first (it fits the statistics on the training rows), then the shards")
    chain = preprocess_transforms(cfg, raw=True)
    col, samples, failures = cfg.column, [], []
    rows = [i for i in _train_rows(df) if df[col].iloc[i] is not None and not
            (isinstance(df[col].iloc[i], float) and pd.isna(df[col].iloc[i]))]
    for i in tqdm(rows, desc="intensity statistics", unit="case", disable=not progress):
        try:
            out = apply_chain(chain, {KEY: df[col].iloc[i], **(rois[i] or {})})
        except Exception as exc:  # noqa: BLE001 - a bad case is reported by the main pass
            log.warning("case %s skipped for the intensity statistics: %s", df["case_id"].iloc[i], exc)
            failures.append(f"case {df['case_id'].iloc[i]}: {exc}")
            continue
        samples.append(foreground_sample(out[KEY].cpu(), out[FG].cpu(), seed=i))
    stats = fit_percentile_stats(samples, cfg.intensity.percentiles, failures=failures)
    atomic_write_json(state_path, {"pipeline_id": pid, "intensity_stats": stats,
                                   "fitted_on": f"{stats['n_cases']} training case(s) (split not test/val)"})
    log.info("intensity statistics fitted on %d training case(s): %s", stats["n_cases"], stats)
    return stats


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    from mmai.utils import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)

