"""Batch inference: run folder + cases -> predictions.csv (resumable, sharded, errors listed).

Output columns (DESIGN.md): ``case_id``, then ``prob_<class>`` per class and ``prediction``
(classification), ``prediction`` (regression, in the target's units) or ``risk`` (survival,
higher = earlier event) plus ``surv_<t>`` (P(no event by t), one per ``task.horizons`` entry),
then ``clinical_present`` (1: at least one clinical value observed; 0: the model saw the clinical
modality as missing, e.g. a study with no row in the clinical table) and ``model_id``. Rows are
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

from mmai.clinical.preprocess import ClinicalPreprocessor
from mmai.config import PipelineConfig, load_config
from mmai.data.dataset import ImageLoader
from mmai.engine.checkpoint import load_weights, read_json
from mmai.engine.prepare import TargetEncoding
from mmai.engine.survival import STATE_KEY, horizon_column, survival_probability
from mmai.errors import CheckpointError, MmaiError
from mmai.inference.rows import ERROR_COLUMNS, error_row, resume_done
from mmai.io.manifest import load_manifest
from mmai.models.heads import outputs_to_predictions
from mmai.models.registry import create_model
from mmai.transforms.pipelines import image_pipeline_id, placeholder_shape
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
    """A trained run, ready to predict. Loads only safetensors and JSON (no code execution)."""

    def __init__(self, run_dir: Path, device: str | None = None) -> None:
        run_dir = Path(run_dir)
        if not (run_dir / "state.json").exists():
            raise CheckpointError(f"{run_dir} is not a finished mmai run (no state.json); train it first")
        self.run_dir = run_dir
        self.state = read_json(run_dir / "state.json")
        self.config: PipelineConfig = load_config(run_dir / "config.yaml")
        self.device = resolve_device(device)
        cstate = self.state.get("clinical")
        self.pre = ClinicalPreprocessor.from_state(cstate, source=str(run_dir / "state.json")) if cstate else None
        self.encoding = TargetEncoding.from_state(self.state["target"])
        specs = list(self.pre.feature_specs) if self.pre is not None else []
        self.model = create_model(self.state["fusion"], feature_specs=specs, **self.state["model_kwargs"])
        self.model_id = self.state["model_id"]
        _load_matching_weights(self.model, run_dir / "model.safetensors", self.model_id, self.state["fusion"])
        self.model.to(self.device).eval()
        self.horizons, self.baseline = self._survival_setup()
        self.uses_image = bool(self.state.get("uses_image", True))
        img = self.state.get("image")
        if self.uses_image and self.config.image is not None and img is not None \
                and img["pipeline_id"] != image_pipeline_id(self.config.image):
            raise CheckpointError(f"{run_dir}: config.yaml's image section does not match the one the model was "
                                  "trained with (pipeline id differs); do not edit a run's config.yaml")
        if self.uses_image and self.config.image is None:
            raise CheckpointError(f"{run_dir}: the model reads images but config.yaml has image: null")
        self.loader = ImageLoader(self.config.image, device=self.device) if self.config.image is not None else None

    def _survival_setup(self) -> tuple[tuple[float, ...], dict[str, Any] | None]:
        """Horizons of ``surv_<t>`` columns and the Breslow baseline (survival runs with task.horizons)."""
        horizons = tuple(self.config.task.horizons) if self.encoding.kind == "survival" else ()
        if not horizons:
            return (), None
        bad = [h for h in horizons if not h > 0]
        if bad:
            raise CheckpointError(f"{self.run_dir}/config.yaml: task.horizons {bad} must be positive times")
        base = (self.state.get(STATE_KEY) or {}).get("baseline")
        if base is None:
            raise CheckpointError(f"{self.run_dir}/state.json has no Breslow baseline hazard, so surv_<t> cannot "
                                  "be computed; retrain with this mmai, or remove task.horizons from config.yaml")
        survival_probability(base, [0.0], horizons)  # a horizon past the training follow-up fails here
        return horizons, base

    # ------------------------------------------------------------------ columns

    def columns(self) -> list[str]:
        kind = self.encoding.kind
        if kind in ("binary", "multiclass"):
            cols = [f"prob_{c}" for c in self.encoding.classes] + ["prediction"]
        elif kind == "regression":
            cols = ["prediction"]
        else:
            cols = ["risk", *[horizon_column(t) for t in self.horizons]]
        return ["case_id", *cols, "clinical_present", "model_id"]

    def _rows(self, case_ids: list[str], out: torch.Tensor, clinical_present: np.ndarray) -> list[dict[str, Any]]:
        kind = self.encoding.kind
        pred = outputs_to_predictions(kind, out).numpy()
        surv = survival_probability(self.baseline, pred[:, 0], self.horizons) \
            if self.horizons and self.baseline is not None else None
        rows = []
        for k, (cid, p) in enumerate(zip(case_ids, pred, strict=True)):
            row: dict[str, Any] = {"case_id": cid}
            if kind in ("binary", "multiclass"):
                for c, v in zip(self.encoding.classes, p, strict=True):
                    row[f"prob_{c}"] = float(v)
                row["prediction"] = self.encoding.classes[int(np.argmax(p))]
            elif kind == "regression":
                row["prediction"] = float(p[0] * self.encoding.std + self.encoding.mean)
            else:
                row["risk"] = float(p[0])
                for t, v in zip(self.horizons, surv[k] if surv is not None else (), strict=True):
                    row[horizon_column(t)] = float(v)
            row["model_id"] = self.model_id
            row["clinical_present"] = int(clinical_present[k])
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ prediction

    def _clinical(self, df: pd.DataFrame, errors: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Per-row clinical transform; rows that fail validation are reported, not fatal."""
        n = len(df)
        if self.pre is None:
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32), [True] * n
        try:
            v, m = self.pre.transform(df, source="manifest")
            return v, m, [True] * n
        except MmaiError:
            values = np.zeros((n, self.pre.num_features), np.float32)
            mask = np.zeros_like(values)
            ok = []
            for i in range(n):
                try:
                    values[i : i + 1], mask[i : i + 1] = self.pre.transform(df.iloc[i : i + 1], source="manifest")
                    ok.append(True)
                except MmaiError as exc:
                    series = str(df["_series"].iloc[i]) if "_series" in df.columns else ""
                    errors.append(error_row(df["case_id"].iloc[i], "clinical", exc, series=series))
                    ok.append(False)
            return values, mask, ok

    def _images(self, df: pd.DataFrame, ok: list[bool], errors: list[dict[str, str]]
                ) -> tuple[list[np.ndarray | None], list[float], dict[int, np.ndarray]]:
        """Per row: the model-ready volume (1, D, H, W) or None, and image_present (0 or 1); and the
        RAS affines (4, 4) of the loaded volumes by row index."""
        images: list[np.ndarray | None] = []
        present: list[float] = []
        affines: dict[int, np.ndarray] = {}  # RAS affines of the loaded images (windowed models place tokens in mm)
        loader, cfg = self.loader, self.config.image
        size = placeholder_shape(cfg) if cfg is not None else ()
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
                arr, affines[i] = loader.load(path if isinstance(path, list) else str(path))  # (1, D, H, W), (4, 4)
                images.append(arr)
                present.append(1.0)
            except MmaiError as exc:
                errors.append(error_row(row["case_id"], "image", exc, series=str(row.get("_series") or ""),
                                        files=path if isinstance(path, list) else [str(path)]))
                ok[i] = False
                images.append(None)
                present.append(0.0)
        return images, present, affines

    @torch.no_grad()
    def predict_batch(self, df: pd.DataFrame, errors: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Predict the rows of a validated manifest chunk; failures are appended to ``errors``."""
        values, mask, ok = self._clinical(df, errors)
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
        out_of: dict[int, torch.Tensor] = {}
        for rows in by_shape.values():
            out_of.update(zip(rows, self._forward(rows, images, present, values, mask, affines), strict=True))
        out = torch.stack([out_of[i] for i in keep])  # (B, n_outputs), manifest order
        clinical_present = np.asarray(mask[keep].any(axis=1) if mask.shape[1] else np.zeros(len(keep), bool))
        return self._rows([str(df["case_id"].iloc[i]) for i in keep], out, clinical_present)

    def _forward(self, rows: list[int], images: list[np.ndarray | None], present: list[float], values: np.ndarray,
                 mask: np.ndarray, affines: dict[int, np.ndarray]) -> torch.Tensor:
        """The model's raw outputs (len(rows), n_outputs) on CPU for rows whose volumes share one shape."""
        image = None
        if self.uses_image:
            image = torch.from_numpy(np.stack([img for i in rows if (img := images[i]) is not None])).to(self.device)
        extra = ({"affine": torch.tensor(np.stack([affines.get(i, np.eye(4)) for i in rows]), dtype=torch.float32,
                                         device=self.device)} if getattr(self.model, "accepts_affine", False) else {})
        out = self.model(image, torch.tensor([present[i] for i in rows], device=self.device),
                         torch.from_numpy(values[rows]).to(self.device), torch.from_numpy(mask[rows]).to(self.device),
                         **extra)
        return out.float().cpu()

    def predict_frame(self, df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
        """Predict a whole validated manifest in memory: (predictions, errors)."""
        errors: list[dict[str, str]] = []
        rows = []
        bs = self.config.infer.batch_size
        for start in range(0, len(df), bs):
            rows += self.predict_batch(df.iloc[start : start + bs], errors)
        return pd.DataFrame(rows, columns=self.columns()), errors


def _load_matching_weights(model: torch.nn.Module, path: Path, model_id: str, fusion: str) -> None:
    """Load ``path`` into ``model``; a file of another model (other id, keys or shapes) is a one-line error."""
    from safetensors import safe_open

    state = load_weights(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("model_id") and meta["model_id"] != model_id:
        raise CheckpointError(f"{path} holds model {meta['model_id']!r} but state.json is model {model_id!r}: "
                              "the weights file comes from another run")
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shape = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or extra or shape:
        first = (missing or extra or shape)[0]
        raise CheckpointError(f"{path} does not fit state.json's {fusion} model: {len(missing)} missing, "
                              f"{len(extra)} unexpected, {len(shape)} differently shaped tensor(s) (first: "
                              f"{first!r}); the weights file comes from another model")
    model.load_state_dict(state)


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
        return shard_rows(df, shard), [], None
    if dicom_root is None:
        raise MmaiError("predict needs --manifest or --dicom-root")
    from mmai.inference.dicom_cases import predict_cases

    df, select_errors, report = predict_cases(dicom_root, clinical_path, predictor.config, progress=progress,
                                              workers=workers)
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


def predict_from_files(run_dir: Path, out_csv: Path, *, manifest_path: Path | None = None,
                       dicom_root: Path | None = None, clinical_path: Path | None = None,
                       explain_dir: Path | None = None, device: str | None = None,
                       shard: tuple[int, int] | None = None, progress: bool = True,
                       workers: int | None = 1) -> PredictSummary:
    """``mmai predict``: predict every case of a manifest (or DICOM root + optional clinical table).

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
                                    explain_dir=explain_dir, device=device, progress=progress, workers=workers)
    from mmai.inference import pipelined

    workers = pipelined.default_workers() if workers is None else workers
    predictor = Predictor(run_dir, device=device)
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
    bs = predictor.config.infer.batch_size
    stop_workers = pipelined.attach(predictor, todo, workers)  # the next studies load while the model runs
    with out_csv.open("a", newline="") as fh, tqdm(total=len(todo), desc="predict", unit="case",
                                                   disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        if new_file:
            writer.writeheader()
        for start in range(0, len(todo), bs):
            chunk = todo.iloc[start : start + bs]
            rows = predictor.predict_batch(chunk, errors)
            writer.writerows(rows)
            fh.flush()
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
