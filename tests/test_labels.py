"""One label normalisation and one class order (mmai.labels), used by manifests, training and
evaluate, so the prob_<class> columns a run writes and the classes evaluate reads agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmai.config import PipelineConfig, TaskConfig
from mmai.engine.prepare import TargetEncoding
from mmai.evaluate import evaluate_frame, infer_task
from mmai.io.manifest import validate_manifest
from mmai.labels import label_text, sort_classes
from mmai.utils import shard_rows


@pytest.mark.parametrize("raw, text", [(1, "1"), (1.0, "1"), ("1.0", "1"), (" 2 ", "2"), (2.5, "2.5"),
                                        ("yes", "yes"), (True, "True"), ("inf", "inf"), ("1e3", "1000")])
def test_label_text(raw, text):
    assert label_text(raw) == text


def test_mixed_labels_sort_the_same_in_training_and_evaluate():
    labels = ["10", "b", "2", "a", "10", "2"]
    assert sort_classes(labels) == ["2", "10", "a", "b"]
    cfg = PipelineConfig(task=TaskConfig(kind="multiclass", target="y"), image=None)
    man = validate_manifest(pd.DataFrame({"case_id": [f"c{i}" for i in range(6)], "y": labels}), cfg,
                            base_dir=Path("."), source="m", check_files=False)
    enc = TargetEncoding.fit(cfg, man)
    cols = [f"prob_{c}" for c in ["b", "10", "a", "2"]]  # any column order in the file
    kind, classes = infer_task(["case_id", *cols])
    assert enc.classes == classes == ["2", "10", "a", "b"]


def test_evaluate_matches_float_labels_to_the_runs_classes():
    rng = np.random.default_rng(0)
    n = 40
    y = rng.integers(0, 2, n)
    p = rng.random(n)
    man = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "label": y.astype(float)})  # 0.0 / 1.0
    pred = pd.DataFrame({"case_id": man["case_id"], "prob_0": 1 - p, "prob_1": p})
    assert evaluate_frame(pred, man, n_boot=0)["models"]["model"]["n_evaluated"] == n


def test_shard_rows_is_one_rule():
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(10)]})
    parts = [shard_rows(df, (i, 3))["case_id"].tolist() for i in range(3)]
    assert parts[1] == ["c1", "c4", "c7"] and sorted(sum(parts, [])) == sorted(df["case_id"])
    assert shard_rows(df, None) is df
