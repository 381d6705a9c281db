"""Batch inference: run folder + cases -> predictions.csv (resumable, sharded, errors listed).

Output columns (docs/cli.md): ``case_id``, then ``prob_<class>`` per class and ``prediction``
(classification), ``prediction`` (regression, in the target's units) or ``risk`` (survival,
higher = earlier event) plus ``surv_<t>`` (P(no event by t), one per ``task.horizons`` entry),
then ``clinical_present`` (1: at least one clinical value observed; 0: the model saw the clinical
modality as missing, e.g. a study with no row in the clinical table), the pass-through columns of
:attr:`Predictor.extra_columns` (e.g. ``input_flags``) and ``model_id``; the rule is the run
contract's (:meth:`mmai.engine.runspec.RunSpec.output_columns`). A K-fold run is predicted as
the mean of its fold models (``ensemble=False``: its final model). Rows are
appended as each batch finishes, so a killed run resumes where it stopped (a torn last row is
redone); a case that fails gets a row in ``<out>.errors.csv`` (case_id, stage, series, error) and
the others go on. With ``--dicom-root`` the clinical join is reported in ``<out>.join.json``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mmai.config import PipelineConfig
from mmai.data.descriptors import attach_descriptors, resolve_mask_paths
from mmai.engine.runspec import RunSpec, model_inputs
from mmai.errors import MmaiError
from mmai.inference.rows import ERROR_COLUMNS, error_row, resume_done
from mmai.inference.weights import load_matching_weights
from mmai.io.manifest import load_manifest
from mmai.transforms.pipelines import placeholder_shape
from mmai.utils import atomic_write_json, resolve_device, shard_rows

log = logging.getLogger(__name__)


@dataclass
class PredictSummary:
    n_cases: int
    n_predicted: int
    n_skipped: int
    n_failed: int
    out: str
    errors: str | None
    join: str | None = None

    @property
    def all_failed(self) -> bool:
        """Every case of this batch failed (nothing predicted now or before): exit status 1."""
        return self.n_failed > 0 and self.n_predicted == 0 and self.n_skipped == 0

    def __str__(self) -> str:
        msg = (f"{self.n_predicted} predicted, {self.n_failed} failed, {self.n_skipped} skipped (already done) "
               f"of {self.n_cases} case(s) -> {self.out}")
        if self.n_failed:
            msg += f"; failures in {self.errors}"
        return msg


class Predictor:
    """A trained run (or a K-fold run's fold ensemble), ready to predict; everything it knows about
    the run comes from its :class:`~mmai.engine.runspec.RunSpec` (safetensors and JSON only).

    Args:
        run_dir: the run folder.
        device: cpu, cuda or cuda:N (default: cuda if available).
        ensemble: average the fold models of a K-fold run (default); False: its final model.
    """

    #: pass-through columns written between clinical_present and model_id (values: :meth:`_passthrough`)
    extra_columns: tuple[str, ...] = ("input_flags",)

    def __init__(self, run_dir: Path, device: str | None = None, *, ensemble: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.spec = RunSpec.load(self.run_dir, ensemble=ensemble)
        self.config: PipelineConfig = self.spec.config
        self.device = resolve_device(device)
        self.members: list[tuple[RunSpec, torch.nn.Module]] = [(m, m.build_model(self.device))
                                                                for m in self.spec.members]
        self.model = self.members[0][1]  # explain/export of a single model
        self.pre = self.members[0][0].clinical
        self.encoding = self.spec.encoding
        self.model_id = self.spec.model_id
        self.uses_image = self.spec.uses_image
        self.horizons = self.spec.horizons
        self.loader = self.spec.image_loader(self.device)
        self.base_dir: Path | None = None  # folder that relative ROI mask paths are relative to
        self.input_flags: dict[str, str] = {}  # case_id -> the loader's input flags (mmai.io.input_flags)
        self.descriptors = self.spec.descriptors  # lesion descriptors the run takes as clinical columns

    def columns(self) -> list[str]:
        return self.spec.output_columns(self.extra_columns)

    def _passthrough(self, df: pd.DataFrame, keep: list[int]) -> dict[str, list[Any]]:
        """Values of :attr:`extra_columns` for the kept rows (from ``df``'s columns of that name, else '')."""
        out = {c: [("" if c not in df.columns or pd.isna(df[c].iloc[i]) else df[c].iloc[i]) for i in keep]
               for c in self.extra_columns}
        if "input_flags" in out:  # what the loader repaired, per case (mmai.io.input_flags)
            out["input_flags"] = [self.input_flags.get(str(df["case_id"].iloc[i]), "") for i in keep]
        return out

    # ------------------------------------------------------------------ prediction

    def _clinical(self, df: pd.DataFrame, errors: list[dict[str, str]], pre: Any = None,
                  ok: list[bool] | None = None) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Per-row clinical transform by ``pre`` (default: the first model's); rows that fail
        validation are reported once (rows already marked failed in ``ok`` are not reported again)."""
        pre = self.pre if pre is None else pre
        n = len(df)
        ok = [True] * n if ok is None else ok
        if pre is None:
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32), ok
        try:
            v, m = pre.transform(df, source="manifest")
            return v, m, ok
        except MmaiError:
            values = np.zeros((n, pre.num_features), np.float32)
            mask = np.zeros_like(values)
            for i in range(n):
                try:
                    values[i : i + 1], mask[i : i + 1] = pre.transform(df.iloc[i : i + 1], source="manifest")
                except MmaiError as exc:
                    if ok[i]:
                        series = str(df["_series"].iloc[i]) if "_series" in df.columns else ""
                        errors.append(error_row(df["case_id"].iloc[i], "clinical", exc, series=series))
                    ok[i] = False
            return values, mask, ok

    def with_descriptors(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` with the run's lesion descriptor columns computed from each case's image and mask,
        as at training (never read from the table); unchanged for runs without descriptors."""
        if not self.descriptors or self.config.image is None:
            return df
        return attach_descriptors(self.config.image, df, self.descriptors, device=self.device, base_dir=self.base_dir,
                                  loader=self.loader)

    def load_image(self, row: dict[str, Any], roi: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
        """One case's model-ready volume (C, D, H, W) and its RAS affine (4, 4), raw or preprocessed."""
        path = row[self.config.image.column]  # type: ignore[union-attr]
        return self.loader.load(path if isinstance(path, list) else str(path), roi=roi or None)

    def _images(self, df: pd.DataFrame, ok: list[bool], errors: list[dict[str, str]]
                ) -> tuple[list[np.ndarray | None], list[float], dict[int, np.ndarray]]:
        """Per row: the model-ready volume (C, D, H, W) or None, and image_present (0 or 1); and the
        RAS affines (4, 4) of the loaded volumes by row index."""
        images: list[np.ndarray | None] = []
        present: list[float] = []
        affines: dict[int, np.ndarray] = {}  # RAS affines of the loaded images (windowed models place tokens in mm)
        loader, cfg = self.loader, self.config.image
        size = placeholder_shape(cfg) if cfg is not None else ()
        rois = self.spec.roi_sources(df, self.base_dir)
        for i, row in enumerate(df.to_dict("records")):
            path = row.get(cfg.column) if self.uses_image and cfg is not None else None
            if not ok[i] or not self.uses_image or loader is None:
                images.append(None)
                present.append(0.0)
                continue
            if path is None or (isinstance(path, float) and np.isnan(path)):
                images.append(np.zeros(size, np.float32))
                present.append(0.0)
                continue
            try:
                arr, affines[i] = self.load_image(row, rois[i])  # (C, D, H, W), (4, 4)
                images.append(arr)
                present.append(1.0)
                self.input_flags[str(row["case_id"])] = loader.last_flags
                if loader.last_flags:
                    log.warning("case %s: input repaired: %s", row["case_id"], loader.last_flags)
            except MmaiError as exc:
                errors.append(error_row(row["case_id"], "image", exc, series=str(row.get("_series") or ""),
                                        files=path if isinstance(path, list) else [str(path)]))
                ok[i] = False
                images.append(None)
                present.append(0.0)
        return images, present, affines

    @torch.no_grad()
    def predict_batch(self, df: pd.DataFrame, errors: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Predict the rows of a validated manifest chunk; failures are appended to ``errors``.

        An ensemble's members each transform the clinical values with their own fitted state and
        their predictions (probabilities, value, or log-risk and survival probabilities) are averaged."""
        ok = [True] * len(df)
        df = self.with_descriptors(df)
        clinical = [self._clinical(df, errors, spec.clinical, ok)[:2] for spec, _ in self.members]
        images, present, affines = self._images(df, ok, errors)
        keep = [i for i in range(len(df)) if ok[i]]
        if not keep:
            return []
        # volumes of one shape are predicted together; never padded, so a case's prediction does
        # not depend on the other cases of its batch (image.size: null keeps each scan's extent)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in keep:
            img = images[i] if self.uses_image else None
            by_shape.setdefault(tuple(img.shape) if img is not None else (), []).append(i)
        preds: list[np.ndarray] = []
        for (spec, model), (values, mask) in zip(self.members, clinical, strict=True):
            out_of: dict[int, torch.Tensor] = {}
            for rows in by_shape.values():
                out_of.update(zip(rows, self._forward(model, rows, images, present, values, mask, affines),
                                  strict=True))
            preds.append(spec.predictions(torch.stack([out_of[i] for i in keep])))  # (B, Q), manifest order
        mask0 = clinical[0][1]
        pre0 = self.members[0][0].clinical
        if pre0 is not None and self.descriptors:  # measured on the image: not clinical values
            mask0 = mask0[:, [n not in self.descriptors for n in pre0.feature_names]]
        clinical_present = np.asarray(mask0[keep].any(axis=1) if mask0.shape[1] else np.zeros(len(keep), bool))
        return self.spec.rows([str(df["case_id"].iloc[i]) for i in keep], np.mean(preds, axis=0),
                              clinical_present.astype(int), self._passthrough(df, keep))

    def _forward(self, model: torch.nn.Module, rows: list[int], images: list[np.ndarray | None],
                 present: list[float], values: np.ndarray, mask: np.ndarray, affines: dict[int, np.ndarray]
                 ) -> torch.Tensor:
        """The model's raw outputs (len(rows), n_outputs) on CPU for rows whose volumes share one shape."""
        dev = self.device
        batch: dict[str, Any] = {
            "image": torch.from_numpy(np.stack([img for i in rows if (img := images[i]) is not None])).to(dev)
            if self.uses_image else None,
            "image_present": torch.tensor([present[i] for i in rows], device=dev),
            "clinical": torch.from_numpy(values[rows]).to(dev), "clinical_mask": torch.from_numpy(mask[rows]).to(dev),
            "affine": torch.tensor(np.stack([affines.get(i, np.eye(4)) for i in rows]), dtype=torch.float32,
                                   device=dev),
        }
        args, kwargs = model_inputs(model, batch)
        return model(*args, **kwargs).float().cpu()

    def predict_frame(self, df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
        """Predict a whole validated manifest in memory: (predictions, errors)."""
        errors: list[dict[str, str]] = []
        rows = []
        bs = self.config.infer.batch_size
        for start in range(0, len(df), bs):
            rows += self.predict_batch(df.iloc[start : start + bs], errors)
        return pd.DataFrame(rows, columns=self.columns()), errors


_load_matching_weights = load_matching_weights  # the old name


def errors_path_for(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.name.removesuffix(".csv") + ".errors.csv")


def join_path_for(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.name.removesuffix(".csv") + ".join.json")


def _cases(predictor: Predictor, out_csv: Path, manifest_path: Path | None, dicom_root: Path | None,
           clinical_path: Path | None, shard: tuple[int, int] | None, progress: bool, workers: int = 1
           ) -> tuple[pd.DataFrame, list[dict[str, str]], str | None]:
    """The cases of this shard, the series-selection errors of this shard, and the join report path."""
    if manifest_path is not None:
        if clinical_path is not None:
            raise MmaiError("--clinical goes with --dicom-root; a manifest carries its clinical columns itself")
        df = load_manifest(manifest_path, predictor.config, require_targets=False, check_files=False,
                           check_clinical=False)
        df = resolve_mask_paths(predictor.config.image, df, Path(manifest_path).parent)
        predictor.base_dir = Path(manifest_path).parent  # relative ROI mask paths, as preprocess reads them
        return shard_rows(df, shard), [], None
    if dicom_root is None:
        raise MmaiError("predict needs --manifest or --dicom-root")
    from mmai.inference.dicom_cases import predict_cases

    df, select_errors, report = predict_cases(dicom_root, clinical_path, predictor.config, progress=progress,
                                              workers=workers)
    predictor.base_dir = Path(clinical_path).parent if clinical_path is not None else None  # ROI mask paths
    select_errors = [error_row(e["case_id"], e["stage"], e["error"], series=e.get("series", ""))
                     for e in select_errors]
    if shard is not None:
        select_errors = select_errors[shard[0]::shard[1]]
    join = join_path_for(out_csv)
    atomic_write_json(join, {"clinical": str(clinical_path) if clinical_path else None, **report.to_json()})
    return shard_rows(df, shard), select_errors, str(join)


def _write_errors(errors: list[dict[str, str]], err_path: Path) -> None:
    if errors:
        pd.DataFrame(errors, columns=ERROR_COLUMNS).to_csv(err_path, index=False)
        for e in errors[:5]:
            log.warning("case %s (%s) failed at %s: %s", e["case_id"], e["series"] or "-", e["stage"], e["error"])
    elif err_path.exists():
        err_path.unlink()


def append_rows(fh: Any, writer: csv.DictWriter, rows: list[dict[str, Any]]) -> None:
    """Append rows and push them to the file (a failure here leaves at most one torn last row,
    which the next run cuts off and redoes: :func:`mmai.inference.rows.resume_done`)."""
    writer.writerows(rows)
    fh.flush()


def predict_from_files(run_dir: Path, out_csv: Path, *, manifest_path: Path | None = None,
                       dicom_root: Path | None = None, clinical_path: Path | None = None,
                       explain_dir: Path | None = None, device: str | None = None,
                       shard: tuple[int, int] | None = None, progress: bool = True,
                       workers: int | None = 1, ensemble: bool = True) -> PredictSummary:
    """``mmai predict``: predict every case of a manifest (or DICOM root + optional clinical table).

    A K-fold run averages its fold models (``ensemble=False``: its final model alone). Rows are
    appended batch by batch; a run stopped by a write failure (a full disk) resumes where it
    stopped, without losing or repeating a row.

    ``workers``: DICOM header readers and image preprocessing processes that load the next studies
    while the model runs (:mod:`mmai.inference.pipelined`; 1: in place; None: from the cores). Under
    torchrun each process predicts its share and rank 0 merges (:mod:`mmai.inference.ranks`).

    Raises:
        MmaiError: bad input found before any prediction (table-level problems, a bad ``out_csv``,
            a run that does not load); per-case failures go to the errors file instead.
    """
    out_csv = Path(out_csv)
    if out_csv.is_dir():
        raise MmaiError(f"--out {out_csv} is an existing folder; give a file path")
    from mmai.inference import ranks

    job = ranks.rank_job(shard)  # under torchrun: this process's share, merged into out_csv by rank 0
    if job is not None:
        return ranks.predict_ranked(job, predict_from_files, run_dir=run_dir, out_csv=out_csv,
                                    manifest_path=manifest_path, dicom_root=dicom_root, clinical_path=clinical_path,
                                    explain_dir=explain_dir, device=device, progress=progress, workers=workers,
                                    ensemble=ensemble)
    from mmai.inference import pipelined

    workers = pipelined.default_workers() if workers is None else workers
    predictor = Predictor(run_dir, device=device, ensemble=ensemble)
    df, select_errors, join = _cases(predictor, out_csv, manifest_path, dicom_root, clinical_path, shard, progress,
                                     workers)
    ranks.note_cases(df["case_id"])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    columns = predictor.columns()
    done = resume_done(out_csv, columns, predictor.model_id)
    todo = df[~df["case_id"].isin(done)].reset_index(drop=True)
    errors: list[dict[str, str]] = list(select_errors)
    n_pred = 0
    new_file = not out_csv.exists() or out_csv.stat().st_size == 0
    bs = pipelined.predict_chunk(predictor)  # 1 for full-resolution volumes: the model overlaps the loading
    stop_workers = pipelined.attach(predictor, todo, workers)  # the next studies load while the model runs
    with out_csv.open("a", newline="") as fh, tqdm(total=len(todo), desc="predict", unit="case",
                                                   disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        if new_file:
            writer.writeheader()
        for start in range(0, len(todo), bs):
            chunk = todo.iloc[start : start + bs]
            rows = predictor.predict_batch(chunk, errors)
            append_rows(fh, writer, rows)
            n_pred += len(rows)
            bar.update(len(chunk))
    stop_workers()
    err_path = errors_path_for(out_csv)
    _write_errors(errors, err_path)
    if explain_dir is not None:
        from mmai.inference.explain import explain_cases

        explain_cases(predictor, df, Path(explain_dir), progress=progress)  # makes only the missing file sets
    return PredictSummary(n_cases=len(df) + len(select_errors), n_predicted=n_pred, n_skipped=len(df) - len(todo),
                          n_failed=len(errors), out=str(out_csv), errors=str(err_path) if errors else None, join=join)
