"""A trained run through the CLI: predict --explain writes the viewer pages with the run's own
predictions, evaluate --explain puts them into report.html, and Chromium draws it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mmai.cli import main
from mmai.viewer import read_cases
from tests.test_end_to_end import tiny_world
from tests.viewer.chromium import HAVE_CHROMIUM, grey_levels, render


@pytest.mark.slow
def test_predict_explain_then_evaluate_explain(tmp_path):
    tiny_world(tmp_path)
    ex, pred = tmp_path / "explain", tmp_path / "pred.csv"
    assert main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(tmp_path / "pre" / "manifest.csv"),
                 "--out", str(pred), "--explain", str(ex), "--shard", "0/4", "-q"]) == 0
    p = pd.read_csv(pred).set_index("case_id")
    pages = sorted(ex.glob("*_viewer.html"))
    assert len(pages) == len(p) == 6
    for page in pages:
        (case,) = read_cases(page)
        facts = dict(map(tuple, case["facts"]))
        cid = facts["case"]
        assert page.name == f"{cid}_viewer.html" and facts["model"] == p.loc[cid, "model_id"]
        assert facts["prob_1"] == f"{p.loc[cid, 'prob_1']:.3f}"  # the page shows what predict wrote
        assert f"{cid}_viewer.html" in json.loads((ex / f"{cid}_explain.json").read_text())["files"]
    m = pd.read_csv(tmp_path / "pre" / "manifest.csv")
    m["split"] = "test"
    m.to_csv(tmp_path / "m.csv", index=False)
    assert main(["evaluate", "--predictions", str(pred), "--manifest", str(tmp_path / "m.csv"),
                 "--out", str(tmp_path / "r"), "--n-boot", "0", "--explain", str(ex), "-q"]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(rep["viewer"]["cases"]) == 4 and set(rep["viewer"]["cases"]) <= set(p.index)
    if HAVE_CHROMIUM:
        got, console, pixels = render(tmp_path / "r" / "report.html")
        assert got["state"] == "ready" and console == "", (got, console)
        assert len(got["cases"]) == 4 and grey_levels(pixels) > 20
