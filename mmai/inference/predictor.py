"""Batch inference: run folder + cases -> predictions.csv (resumable, sharded, errors listed).

Output columns (DESIGN.md): ``case_id``, then ``prob_<class>`` per class and ``prediction``
(classification), ``prediction`` (regression, in the target's units) or ``risk`` (survival,
higher = earlier event), then ``model_id``. Rows are appended as each batch finishes, so a
killed run resumes where it stopped; a case that fails (unreadable image, invalid clinical
value) gets a row in ``<out>.errors.csv`` (case_id, stage, error) and the others go on.
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
from mmai.errors import CheckpointError, MmaiError
from mmai.io.manifest import load_manifest
from mmai.models.heads import outputs_to_predictions
from mmai.models.registry import create_model
from mmai.transforms.pipelines import image_channels, image_pipeline_id, output_shape
from mmai.utils import resolve_device

log = logging.getLogger(__name__)


@dataclass
class PredictSummary:
    n_cases: int
    n_predicted: int
    n_skipped: int
    n_failed: int
    out: str
    errors: str | None

    def __str__(self) -> str:
        msg = (f"predicted {self.n_predicted} case(s) ({self.n_skipped} already done) -> {self.out}")
        if self.n_failed:
            msg += f"; {self.n_failed} failed, see {self.errors}"
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
        try:
            self.model.load_state_dict(load_weights(run_dir / "model.safetensors"))
        except RuntimeError as exc:
            raise CheckpointError(f"{run_dir}/model.safetensors does not match state.json: {exc}") from exc
        self.model.to(self.device).eval()
        self.model_id = self.state["model_id"]
        self.uses_image = bool(self.state.get("uses_image", True))
        img = self.state.get("image")
        if self.uses_image and self.config.image is not None and img is not None \
                and img["pipeline_id"] != image_pipeline_id(self.config.image):
            raise CheckpointError(f"{run_dir}: config.yaml's image section does not match the one the model was "
                                  "trained with (pipeline id differs); do not edit a run's config.yaml")
        if self.uses_image and self.config.image is None:
            raise CheckpointError(f"{run_dir}: the model reads images but config.yaml has image: null")
        self.loader = ImageLoader(self.config.image, device=self.device) if self.config.image is not None else None

    # ------------------------------------------------------------------ columns

    def columns(self) -> list[str]:
        kind = self.encoding.kind
        if kind in ("binary", "multiclass"):
            cols = [f"prob_{c}" for c in self.encoding.classes] + ["prediction"]
        elif kind == "regression":
            cols = ["prediction"]
        else:
            cols = ["risk"]
        return ["case_id", *cols, "model_id"]

    def _rows(self, case_ids: list[str], out: torch.Tensor) -> list[dict[str, Any]]:
        kind = self.encoding.kind
        pred = outputs_to_predictions(kind, out).numpy()
        rows = []
        for cid, p in zip(case_ids, pred, strict=True):
            row: dict[str, Any] = {"case_id": cid}
            if kind in ("binary", "multiclass"):
                for c, v in zip(self.encoding.classes, p, strict=True):
                    row[f"prob_{c}"] = float(v)
                row["prediction"] = self.encoding.classes[int(np.argmax(p))]
            elif kind == "regression":
                row["prediction"] = float(p[0] * self.encoding.std + self.encoding.mean)
            else:
                row["risk"] = float(p[0])
            row["model_id"] = self.model_id
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
                    errors.append({"case_id": df["case_id"].iloc[i], "stage": "clinical", "error": str(exc)})
                    ok.append(False)
            return values, mask, ok

    @torch.no_grad()
    def predict_batch(self, df: pd.DataFrame, errors: list[dict[str, str]]) -> list[dict[str, Any]]:
        """Predict the rows of a validated manifest chunk; failures are appended to ``errors``."""
        values, mask, ok = self._clinical(df, errors)
        images: list[np.ndarray | None] = []
        present: list[float] = []
        loader, cfg = self.loader, self.config.image
        size = (image_channels(cfg), *(output_shape(cfg) or (cfg.size_multiple,) * 3)) if cfg is not None else ()
        for i, row in enumerate(df.itertuples(index=False)):
            path = getattr(row, cfg.column) if self.uses_image and cfg is not None else None
            if not ok[i] or not self.uses_image or loader is None:
                images.append(None)
                present.append(0.0)
                continue
            if path is None or (isinstance(path, float) and np.isnan(path)):
                images.append(np.zeros(size, np.float32))
                present.append(0.0)
                continue
            try:
                images.append(loader(path if isinstance(path, list) else str(path)))
                present.append(1.0)
            except MmaiError as exc:
                errors.append({"case_id": row.case_id, "stage": "image", "error": str(exc)})
                ok[i] = False
                images.append(None)
                present.append(0.0)
        keep = [i for i in range(len(df)) if ok[i]]
        if not keep:
            return []
        image = None
        if self.uses_image:
            image = torch.from_numpy(np.stack([img for i in keep if (img := images[i]) is not None])).to(self.device)
        out = self.model(image, torch.tensor([present[i] for i in keep], device=self.device),
                         torch.from_numpy(values[keep]).to(self.device), torch.from_numpy(mask[keep]).to(self.device))
        return self._rows([str(df["case_id"].iloc[i]) for i in keep], out.float().cpu())

    def predict_frame(self, df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, str]]]:
        """Predict a whole validated manifest in memory: (predictions, errors)."""
        errors: list[dict[str, str]] = []
        rows = []
        bs = self.config.infer.batch_size
        for start in range(0, len(df), bs):
            rows += self.predict_batch(df.iloc[start : start + bs], errors)
        return pd.DataFrame(rows, columns=self.columns()), errors


def _done_case_ids(out_csv: Path, columns: list[str]) -> set[str]:
    if not out_csv.exists() or out_csv.stat().st_size == 0:
        return set()
    prev = pd.read_csv(out_csv, dtype={"case_id": str})
    if list(prev.columns) != columns:
        raise MmaiError(f"{out_csv} exists with columns {list(prev.columns)}, not this run's {columns}; "
                        "choose another --out or delete it")
    complete = prev.dropna()
    if len(complete) != len(prev):  # a partial last line from a killed run: rewrite without it
        complete.to_csv(out_csv, index=False)
    return set(complete["case_id"].astype(str))


def errors_path_for(out_csv: Path) -> Path:
    return out_csv.with_name(out_csv.name.removesuffix(".csv") + ".errors.csv")


def predict_from_files(run_dir: Path, out_csv: Path, *, manifest_path: Path | None = None,
                       dicom_root: Path | None = None, clinical_path: Path | None = None,
                       explain_dir: Path | None = None, device: str | None = None,
                       shard: tuple[int, int] | None = None, progress: bool = True) -> PredictSummary:
    """``mmai predict``: predict every case of a manifest (or DICOM root + clinical table)."""
    predictor = Predictor(run_dir, device=device)
    select_errors: list[dict[str, str]] = []
    if manifest_path is not None:
        df = load_manifest(manifest_path, predictor.config, require_targets=False, check_files=False,
                           check_clinical=False)
    elif dicom_root is not None:
        from mmai.inference.dicom_cases import cases_from_dicom_root

        df, select_errors = cases_from_dicom_root(dicom_root, clinical_path, predictor.config,
                                                  progress=progress)
    else:
        raise MmaiError("predict needs --manifest or --dicom-root")
    if shard is not None:
        i, n = shard
        df = df.iloc[[k for k in range(len(df)) if k % n == i]].reset_index(drop=True)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    columns = predictor.columns()
    done = _done_case_ids(out_csv, columns)
    todo = df[~df["case_id"].isin(done)].reset_index(drop=True)
    errors: list[dict[str, str]] = list(select_errors)
    n_pred = 0
    new_file = not out_csv.exists() or out_csv.stat().st_size == 0
    bs = predictor.config.infer.batch_size
    with out_csv.open("a", newline="") as fh, tqdm(total=len(todo), desc="predict", unit="case",
                                                   disable=not progress) as bar:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new_file:
            writer.writeheader()
        for start in range(0, len(todo), bs):
            chunk = todo.iloc[start : start + bs]
            rows = predictor.predict_batch(chunk, errors)
            writer.writerows(rows)
            fh.flush()
            n_pred += len(rows)
            bar.update(len(chunk))
    err_path = errors_path_for(out_csv)
    if errors:
        pd.DataFrame(errors, columns=["case_id", "stage", "error"]).to_csv(err_path, index=False)
        for e in errors[:5]:
            log.warning("case %s failed at %s: %s", e["case_id"], e["stage"], e["error"])
    elif err_path.exists():
        err_path.unlink()
    if explain_dir is not None:
        from mmai.inference.explain import explain_cases

        explain_cases(predictor, todo, Path(explain_dir), progress=progress)
    return PredictSummary(n_cases=len(df), n_predicted=n_pred, n_skipped=len(df) - len(todo), n_failed=len(errors),
                          out=str(out_csv), errors=str(err_path) if errors else None)
