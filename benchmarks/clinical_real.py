"""Clinical-only mmai vs the standard baseline on real clinical datasets shipped inside PyPI packages.

Datasets (no download at run time):
  breast_cancer  scikit-learn load_breast_cancer   binary    AUROC     vs LogisticRegression
  rossi          lifelines load_rossi              survival  C-index   vs lifelines CoxPHFitter
  gbsg2          lifelines load_gbsg2              survival  C-index   vs CoxPHFitter
  lung           lifelines load_lung (missing!)    survival  C-index   vs CoxPHFitter

Both models see the same stratified K-fold splits (repeated with different seeds). mmai's
clinical-only model is trained by ``mmai.engine.trainer.train_from_files(fusion="clinical_only")``
and scored by ``mmai.inference.predictor.predict_from_files`` (``--engine trainer``), or, when
the trainer is not available, by the same mmai components (ClinicalPreprocessor +
ClinicalMLP + a linear head) in a minimal loop in this file (``--engine components``).
The baseline gets the same leak-free features (``ClinicalPreprocessor.transform_onehot``,
fitted on the training rows of each split).

Last line: ``{"datasets": {NAME: {"metric", "mmai", "baseline", ...}}, "worst_gap": min(mmai - baseline), ...}``

    .venv/bin/python benchmarks/clinical_real.py [--engine auto|trainer|components] [--folds 5] [--repeats 1] [--base glm|none]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmai.clinical.preprocess import ClinicalPreprocessor  # noqa: E402
from mmai.clinical.schema import ClinicalSchema  # noqa: E402

log = logging.getLogger("benchmarks.clinical_real")


@dataclass
class Dataset:
    name: str
    df: pd.DataFrame          # case_id, clinical columns, label | time + event
    task: str                 # binary | survival
    clinical: dict[str, Any]  # the pipeline YAML's clinical: section

    @property
    def metric(self) -> str:
        return "auroc" if self.task == "binary" else "c_index"

    def strata(self) -> np.ndarray:
        return self.df["label" if self.task == "binary" else "event"].to_numpy()


# ----------------------------------------------------------------------------- datasets


def _with_ids(df: pd.DataFrame) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    df.insert(0, "case_id", [f"c{i:04d}" for i in range(len(df))])
    return df


def load_breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer as load

    bunch = load(as_frame=True)
    x = bunch.data.copy()
    x.columns = [c.replace(" ", "_") for c in x.columns]
    df = _with_ids(x.assign(label=bunch.target.to_numpy()))
    return Dataset("breast_cancer", df, "binary", {"numeric": list(x.columns)})


def load_rossi() -> Dataset:
    from lifelines.datasets import load_rossi as load

    df = _with_ids(load().rename(columns={"week": "time", "arrest": "event"}))
    return Dataset("rossi", df, "survival", {
        "numeric": [{"name": "age", "range": [0, 100], "unit": "years"},
                    {"name": "prio", "range": [0, 100], "log": True}],
        "binary": ["fin", "race", "wexp", "mar", "paro"],
    })


def load_gbsg2() -> Dataset:
    from lifelines.datasets import load_gbsg2 as load

    df = _with_ids(load().rename(columns={"cens": "event"}))
    return Dataset("gbsg2", df, "survival", {
        "numeric": [{"name": "age", "range": [0, 110], "unit": "years"},
                    {"name": "tsize", "range": [0, 200], "unit": "mm"},
                    {"name": "pnodes", "range": [0, 100], "log": True},
                    {"name": "progrec", "range": [0, 5000], "log": True, "unit": "fmol/l"},
                    {"name": "estrec", "range": [0, 5000], "log": True, "unit": "fmol/l"}],
        "categorical": [{"name": "menostat", "levels": ["Pre", "Post"], "strict": True}],
        "binary": ["horTh"],
        "ordinal": {"tgrade": ["I", "II", "III"]},
    })


def load_lung() -> Dataset:
    from lifelines.datasets import load_lung as load

    df = _with_ids(load().rename(columns={"status": "event"}))
    return Dataset("lung", df, "survival", {
        "numeric": [{"name": "age", "range": [0, 110], "unit": "years"},
                    {"name": "ph.karno", "range": [0, 100]}, {"name": "pat.karno", "range": [0, 100]},
                    {"name": "meal.cal", "range": [0, 5000], "unit": "kcal"},
                    {"name": "wt.loss", "range": [-50, 100], "unit": "lb"}],
        "categorical": [{"name": "sex", "levels": [1, 2], "strict": True}, "inst"],
        "ordinal": {"ph.ecog": [0, 1, 2, 3]},
    })


LOADERS: dict[str, Callable[[], Dataset]] = {
    "breast_cancer": load_breast_cancer, "rossi": load_rossi, "gbsg2": load_gbsg2, "lung": load_lung,
}


# ----------------------------------------------------------------------------- metrics + splits


def score(ds: Dataset, test: pd.DataFrame, risk: np.ndarray) -> float:
    """AUROC (risk = score of class 1) or Harrell's C-index (risk = higher means earlier event)."""
    if ds.task == "binary":
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(test["label"].to_numpy(), risk))
    from lifelines.utils import concordance_index

    return float(concordance_index(test["time"].to_numpy(), -np.asarray(risk), test["event"].to_numpy()))


def splits(ds: Dataset, folds: int, repeats: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    out = []
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=r)
        out += list(skf.split(np.zeros(len(ds.df)), ds.strata()))
    return out


# ----------------------------------------------------------------------------- the baseline


def baseline_risk(ds: Dataset, train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """LogisticRegression (binary) or lifelines CoxPHFitter (survival) on leak-free one-hot features."""
    schema = ClinicalSchema.from_dict(ds.clinical, ds.name)
    pre = ClinicalPreprocessor(schema, scaling="standard", impute="median").fit(train)
    xtr, xte = pre.transform_onehot(train), pre.transform_onehot(test)
    keep = xtr.std(0) > 0                      # drop columns constant in training (e.g. <unknown>)
    xtr, xte = xtr[:, keep], xte[:, keep]
    if ds.task == "binary":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=5000).fit(xtr, train["label"].to_numpy())
        return model.decision_function(xte)
    from lifelines import CoxPHFitter

    cols = [f"x{i}" for i in range(xtr.shape[1])]
    frame = pd.DataFrame(xtr, columns=cols).assign(T=train["time"].to_numpy(), E=train["event"].to_numpy())
    cph = CoxPHFitter(penalizer=0.01)          # a small ridge: one-hot blocks are collinear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph.fit(frame, duration_col="T", event_col="E")
    return cph.predict_partial_hazard(pd.DataFrame(xte, columns=cols)).to_numpy()


# ----------------------------------------------------------------------------- mmai: components engine


def cox_loss(risk: Any, time_: Any, event: Any) -> Any:
    """Negative Cox partial log-likelihood (Breslow ties), mean over events. Shapes (N,)."""
    import torch

    order = torch.argsort(time_, descending=True)
    r, e = risk[order], event[order]
    log_cum = torch.logcumsumexp(r, 0)
    return -((r - log_cum) * e).sum() / e.sum().clamp(min=1.0)


def components_risk(ds: Dataset, train: pd.DataFrame, test: pd.DataFrame, epochs: int, seed: int) -> np.ndarray:
    """mmai's clinical-only model from its components: ClinicalPreprocessor + ClinicalMLP + linear head.

    Full-batch AdamW; the epoch is picked on a 20% inner validation split of the training rows
    (loss), then the model is refitted on all training rows for that many epochs.
    """
    import torch

    from mmai.models.tabular import ClinicalMLP

    schema = ClinicalSchema.from_dict(ds.clinical, ds.name)

    def fit(rows: pd.DataFrame, val: pd.DataFrame | None, n_epochs: int) -> tuple[Any, Any, Any, int]:
        pre = ClinicalPreprocessor(schema, scaling="robust", impute="median").fit(rows)
        torch.manual_seed(seed)
        enc = ClinicalMLP(pre.feature_specs, 16, hidden=32, depth=1, dropout=0.1)
        head = torch.nn.Linear(16, 1)
        model = torch.nn.ModuleDict({"enc": enc, "head": head})
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)

        def tensors(df: pd.DataFrame) -> tuple[Any, ...]:
            v, m = pre.transform(df)
            if ds.task == "binary":
                y = (torch.tensor(df["label"].to_numpy(), dtype=torch.float32),)
            else:
                y = (torch.tensor(df["time"].to_numpy(), dtype=torch.float32),
                     torch.tensor(df["event"].to_numpy(), dtype=torch.float32))
            return (torch.from_numpy(v), torch.from_numpy(m)) + y

        def loss_of(batch: tuple[Any, ...]) -> Any:
            out = head(enc(batch[0], batch[1]))[:, 0]
            if ds.task == "binary":
                return torch.nn.functional.binary_cross_entropy_with_logits(out, batch[2])
            return cox_loss(out, batch[2], batch[3])

        tr = tensors(rows)
        va = tensors(val) if val is not None else None
        best, best_epoch = float("inf"), n_epochs
        for epoch in range(1, n_epochs + 1):
            model.train()
            opt.zero_grad()
            loss_of(tr).backward()
            opt.step()
            if va is not None:
                model.eval()
                with torch.no_grad():
                    v_loss = float(loss_of(va))
                if v_loss < best - 1e-4:
                    best, best_epoch = v_loss, epoch
        model.eval()
        return pre, enc, head, best_epoch

    rng = np.random.default_rng(seed)
    inner = rng.random(len(train)) < 0.2
    _, _, _, n_best = fit(train[~inner], train[inner], epochs)
    pre, enc, head, _ = fit(train, None, max(n_best, 10))
    v, m = pre.transform(test)
    with torch.no_grad():
        return head(enc(torch.from_numpy(v), torch.from_numpy(m)))[:, 0].numpy()


# ----------------------------------------------------------------------------- mmai: trainer engine


def write_pipeline(ds: Dataset, path: Path, epochs: int | None, base: str = "glm") -> None:
    task = {"kind": ds.task, **({"target": "label"} if ds.task == "binary" else {"time": "time", "event": "event"})}
    doc: dict[str, Any] = {"task": task, "clinical": ds.clinical, "image": None, "model": {"base": base}}
    if epochs is not None:
        doc["train"] = {"epochs": epochs}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def trainer_risk(ds: Dataset, train: pd.DataFrame, test: pd.DataFrame, epochs: int | None, work: Path,
                 base: str = "glm") -> np.ndarray:
    """mmai train --fusion clinical_only on the training rows, mmai predict on the test rows.
    ``BEST_EPOCHS`` collects each run's best epoch (0 = the GLM base term shipped)."""
    from mmai.engine.trainer import train_from_files
    from mmai.inference.predictor import predict_from_files

    work.mkdir(parents=True, exist_ok=True)
    config = work / "pipeline.yaml"
    write_pipeline(ds, config, epochs, base)
    manifest = work / "train.csv"
    train.to_csv(manifest, index=False)
    test_manifest = work / "test.csv"
    test.to_csv(test_manifest, index=False)
    run = work / "run"
    train_from_files(config, manifest, run, fusion="clinical_only", folds=None, epochs=epochs,
                     device="cpu", progress=False)
    BEST_EPOCHS.append(int(json.loads((run / "metrics.json").read_text())["best_epoch"]))
    out_csv = work / "pred.csv"
    predict_from_files(run, out_csv, manifest_path=test_manifest, device="cpu", progress=False)
    pred = pd.read_csv(out_csv, dtype={"case_id": str}).set_index("case_id").loc[test["case_id"]]
    if ds.task == "binary":
        col = "prob_1" if "prob_1" in pred.columns else [c for c in pred.columns if c.startswith("prob_")][-1]
        return pred[col].to_numpy(dtype=float)
    return pred["risk"].to_numpy(dtype=float)


BEST_EPOCHS: list[int] = []


def trainer_available() -> bool:
    try:
        from mmai.engine.trainer import train_from_files  # noqa: F401
        from mmai.inference.predictor import predict_from_files  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- main


def run(names: list[str], engine: str, folds: int, repeats: int, epochs: int | None, work: Path,
        base: str = "glm") -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in names:
        ds = LOADERS[name]()
        t0 = time.perf_counter()
        m_scores, b_scores = [], []
        BEST_EPOCHS.clear()
        for i, (tr_idx, te_idx) in enumerate(splits(ds, folds, repeats)):
            train, test = ds.df.iloc[tr_idx], ds.df.iloc[te_idx]
            b_scores.append(score(ds, test, baseline_risk(ds, train, test)))
            if engine == "trainer":
                risk = trainer_risk(ds, train, test, epochs, work / name / f"split{i}", base)
            else:
                risk = components_risk(ds, train, test, epochs or 400, seed=i)
            m_scores.append(score(ds, test, risk))
            log.info("%s split %d: mmai %.4f baseline %.4f", name, i, m_scores[-1], b_scores[-1])
        mm, bb = float(np.mean(m_scores)), float(np.mean(b_scores))
        results[name] = {"metric": ds.metric, "mmai": round(mm, 4), "baseline": round(bb, 4),
                         "gap": round(mm - bb, 4), "mmai_sd": round(float(np.std(m_scores)), 4),
                         "baseline_sd": round(float(np.std(b_scores)), 4), "n": len(ds.df),
                         "n_splits": len(m_scores), "seconds": round(time.perf_counter() - t0, 1),
                         "best_epochs": list(BEST_EPOCHS)}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["auto", "trainer", "components"], default="auto",
                   help="trainer: mmai train/predict; components: the same mmai parts in a minimal loop; "
                        "auto: trainer when importable")
    p.add_argument("--datasets", nargs="*", default=list(LOADERS), choices=list(LOADERS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="repeat the K folds with new shuffles (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: trainer's YAML default / 400)")
    p.add_argument("--base", choices=["glm", "none"], default="glm",
                   help="trainer engine: model.base (glm: the frozen GLM base term, the default; none: without)")
    p.add_argument("--work", default=None, help="folder for manifests and runs (default: a temp folder)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("mmai").setLevel(logging.WARNING)
    engine = a.engine
    if engine == "auto":
        engine = "trainer" if trainer_available() else "components"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        t0 = time.perf_counter()
        results = run(a.datasets, engine, a.folds, a.repeats, a.epochs, work, a.base)
    for name, r in results.items():
        sys.stdout.write(f"{name:14s} {r['metric']:8s} mmai {r['mmai']:.4f} (sd {r['mmai_sd']:.3f})  "
                         f"baseline {r['baseline']:.4f} (sd {r['baseline_sd']:.3f})  gap {r['gap']:+.4f}\n")
    worst = min(r["gap"] for r in results.values())
    summary = {"datasets": {k: {"metric": v["metric"], "mmai": v["mmai"], "baseline": v["baseline"],
                                **{x: v[x] for x in ("gap", "n", "n_splits", "seconds", "best_epochs")}}
                            for k, v in results.items()},
               "worst_gap": round(worst, 4), "engine": engine, "base": a.base, "folds": a.folds, "repeats": a.repeats,
               "seconds": round(time.perf_counter() - t0, 1)}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
