"""``mmai demo``: synth -> preprocess -> train 3 models -> predict -> evaluate, on held-out patients.

Writes DIR/cohort (synthetic DICOM cohort), DIR/preprocessed, DIR/runs/<model>, DIR/predictions,
DIR/plots/{roc,calibration}.png and DIR/summary.json (format in docs/cli.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.config import PipelineConfig, load_config
from mmai.errors import ConfigError
from mmai.utils import atomic_write_json

log = logging.getLogger(__name__)

MODELS = ("cross_attention", "image_only", "clinical_only")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "demo.yaml"


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    n: int
    epochs: int | None  # None: pipelines/demo.yaml's train.epochs
    workers: int = 2

    @classmethod
    def for_mode(cls, quick: bool) -> DemoPlan:
        return cls(n=160, epochs=4) if quick else cls(n=1200, epochs=None)


def demo_config(epochs: int | None = None, path: Path = DEMO_CONFIG) -> PipelineConfig:
    if not path.exists():
        raise ConfigError(f"demo pipeline not found at {path}; run the demo from a checkout of the mmai repository")
    cfg = load_config(path)
    return cfg if epochs is None else cfg.replace(train=dataclasses.replace(cfg.train, epochs=epochs))


def run_demo(out: Path, *, quick: bool = False, progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Run the whole pipeline on a synthetic cohort; returns (and writes) summary.json."""
    from mmai.engine.trainer import train
    from mmai.evaluate import evaluate_frame
    from mmai.inference.predictor import Predictor
    from mmai.io.manifest import load_manifest
    from mmai.preprocess import preprocess_frame
    from mmai.synth import SynthSpec, write_cohort

    t0 = time.time()
    plan = DemoPlan.for_mode(quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(plan.epochs)
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, seed=seed))
    timings: dict[str, float] = {}

    cohort = out / "cohort"
    if not (cohort / "truth.json").exists():
        log.info("[1/5] writing a synthetic cohort of %d patients (DICOM) to %s", plan.n, cohort)
        write_cohort(cohort, SynthSpec(n=plan.n, seed=seed, fmt="dicom"), progress=progress, workers=plan.workers)
    truth = json.loads((cohort / "truth.json").read_text())
    timings["synth"] = time.time() - t0

    t = time.time()
    log.info("[2/5] preprocessing DICOM -> %s", out / "preprocessed")
    raw = load_manifest(cohort / "manifest.csv", cfg)
    summary = preprocess_frame(raw, cfg, out / "preprocessed", workers=plan.workers, progress=progress)
    log.info("%s", summary)
    timings["preprocess"] = time.time() - t
    df = load_manifest(out / "preprocessed" / "manifest.csv", cfg)
    test = df[df["split"] == "test"].reset_index(drop=True)

    results: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, fusion in enumerate(MODELS):
        t = time.time()
        log.info("[3/5] training %s (%d/%d)", fusion, i + 1, len(MODELS))
        mcfg = cfg.replace(model=dataclasses.replace(cfg.model, fusion=fusion))
        run_dir = out / "runs" / fusion
        train(mcfg, df, run_dir, device=None, progress=progress)
        log.info("[4/5] predicting the %d held-out test patients with %s", len(test), fusion)
        pred, errors = Predictor(run_dir).predict_frame(test)
        if errors:
            log.warning("%d test case(s) failed to predict with %s: %s", len(errors), fusion, errors[:3])
        pred_path = out / "predictions" / f"{fusion}.csv"
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        pred.to_csv(pred_path, index=False)
        report = evaluate_frame(pred, test, n_boot=1000, seed=seed)
        results[fusion] = _model_summary(report)
        merged = test.merge(pred, on="case_id")
        curves[fusion] = (merged["label"].astype(int).to_numpy(), merged["prob_1"].to_numpy(float))
        timings[f"train+predict {fusion}"] = time.time() - t

    truth_df = pd.read_csv(cohort / "truth.csv", dtype={"case_id": str}).merge(test[["case_id", "label"]],
                                                                              on="case_id")
    curves["Bayes (true probability)"] = (truth_df["label"].astype(int).to_numpy(),
                                          truth_df["true_probability"].to_numpy(float))
    _plots(out / "plots", curves, truth.get("bayes_test"))
    result = {
        "models": results,
        "bayes_auroc": truth["bayes_test"],
        "bayes_auroc_all": truth["bayes"],
        "n_train": int((df["split"] != "test").sum()),
        "n_test": len(test),
        "seconds": round(time.time() - t0, 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "quick": quick,
    }
    atomic_write_json(out / "summary.json", result)
    return result


def _model_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline binary metrics of a one-model :func:`mmai.evaluate.evaluate_frame` report."""
    (entry,) = report["models"].values()
    m = entry["metrics"]
    keys = ("auroc", "auroc_ci", "auprc", "auprc_ci", "brier", "brier_ci", "ece", "n", "n_pos")
    return {k: m.get(k) for k in keys if k in m}


def _plots(folder: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], bayes: float | None) -> None:
    from mmai.plots import plot_calibration, plot_roc

    plot_roc(curves, folder / "roc.png", title="Held-out test patients", bayes_auroc=bayes)
    plot_calibration({k: v for k, v in curves.items() if not k.startswith("Bayes")}, folder / "calibration.png")


def format_summary(summary: dict[str, Any]) -> str:
    """The comparison table printed by ``mmai demo``."""

    def ci(v: Any) -> str:
        return f"[{v[0]:.3f}, {v[1]:.3f}]" if isinstance(v, list | tuple) and None not in v else "n/a"

    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, int | float) else "n/a"

    lines = [f"mmai demo: {summary['n_train']} training / {summary['n_test']} held-out test patients, "
             f"{summary['seconds']:.0f} s", "",
             f"{'model':<18}{'AUROC':>8}  {'95% CI':<17}{'AUPRC':>8}{'Brier':>8}",
             "-" * 60]
    for name, m in summary["models"].items():
        lines.append(f"{name:<18}{num(m.get('auroc')):>8}  {ci(m.get('auroc_ci')):<17}"
                     f"{num(m.get('auprc')):>8}{num(m.get('brier')):>8}")
    lines.append("-" * 60)
    lines.append(f"{'Bayes-optimal':<18}{num(summary['bayes_auroc']):>8}  (true probabilities, same test patients)")
    return "\n".join(lines)
