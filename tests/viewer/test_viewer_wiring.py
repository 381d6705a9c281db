"""The viewer where users meet it: ``predict --explain`` writes ``<case>_viewer.html`` beside the
overview PNG, ``evaluate --explain DIR`` puts the chosen explained cases into report.html."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmai.cli import main
from mmai.errors import MmaiError
from mmai.evaluate import evaluate_files
from mmai.inference import explain as E
from mmai.utils import atomic_write_json
from mmai.viewer import read_cases, write_case_page
from mmai.viewer.volumes import decode
from tests.inference.test_explain_files import NATIVE_AFFINE, NATIVE_SHAPE, StubPredictor, cohort
from tests.viewer.chromium import HAVE_CHROMIUM, SKIP_REASON, grey_levels, render, warm_pixels


def test_explain_writes_a_viewer_page_of_its_maps(tmp_path):
    df = cohort(tmp_path, n=1)
    out = tmp_path / "x"
    E.explain_cases(StubPredictor(False), df, out, progress=False)
    info = json.loads((out / "c0_explain.json").read_text())
    assert "c0_viewer.html" in info["files"] and E.is_done(out, "c0", "m1")
    (case,) = read_cases(out / "c0_viewer.html")
    assert case["source_shape"] == list(NATIVE_SHAPE) and case["factors"] == [1, 1, 1]  # small: kept whole
    assert ["model", "m1"] in case["facts"] and set(case["maps"]) == {"saliency", "attention"}
    for kind in ("saliency", "attention"):
        written = np.asarray(nib.load(out / f"c0_{kind}.nii.gz").dataobj)
        shown = decode(case["maps"][kind])
        np.testing.assert_allclose(np.asarray(shown.dataobj), written, atol=1 / 510 + 1e-6)
        np.testing.assert_allclose(shown.affine, NATIVE_AFFINE, atol=1e-5)
    scan = decode(case["image"])
    src = np.asarray(nib.load(df["image"].iloc[0]).dataobj)
    lo, hi = case["image_range"]
    np.testing.assert_allclose(np.asarray(scan.dataobj), np.clip(src, lo, hi), atol=(hi - lo) / 510 + 1e-3)


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_the_page_explain_writes_draws_in_chromium(tmp_path):
    df = cohort(tmp_path, n=1)
    E.explain_cases(StubPredictor(False), df, tmp_path / "x", progress=False)
    got, console, pixels = render(tmp_path / "x" / "c0_viewer.html")
    assert got["state"] == "ready" and console == "", (got, console)
    assert grey_levels(pixels) > 20 and warm_pixels(pixels) > 100


# ----------------------------------------------------------------------------- evaluate --explain

SHAPE = (48, 40, 24)
AFF = np.diag([1.5, 1.5, 3.0, 1.0])


def _world(tmp_path, probs: dict[str, float], labels: dict[str, int], explained: dict[str, str]):
    """predictions.csv, manifest.csv and an explain folder holding a page for each case of ``explained``
    (case -> model id of its explanation)."""
    rng = np.random.default_rng(1)
    ex = tmp_path / "explain"
    for i, (cid, model) in enumerate(explained.items()):
        img = rng.normal(0, 1, SHAPE).astype(np.float32)
        sal = np.zeros(SHAPE, np.float32)
        sal[5 + i, 10:20, 5:15] = 1.0
        files = E.case_files(ex, cid)
        write_case_page(files["viewer"], img, {"saliency": sal}, AFF, case_id=cid, facts=[("model", model)])
        atomic_write_json(files["explain"], {"case_id": cid, "model_id": model, "files": [files["viewer"].name],
                                             "attributions": [], "geometry": {}, "notes": []})
    pred = pd.DataFrame({"case_id": list(probs), "prob_0": [1 - p for p in probs.values()],
                         "prob_1": list(probs.values()), "prediction": [int(p >= 0.5) for p in probs.values()],
                         "model_id": "m1"})
    pred.to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"case_id": list(labels), "label": list(labels.values())}).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "p.csv", tmp_path / "m.csv", ex


PROBS = {"a": 0.95, "b": 0.80, "c": 0.40, "d": 0.10, "e": 0.90, "f": 0.30, "g": 0.99, "h": 0.02}
LABELS = {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0, "f": 0, "g": 0, "h": 1}
# P(true class): a .95, b .80, c .40, d .90, e .10, f .70, g .01, h .02


def test_evaluate_puts_the_most_right_and_most_wrong_explained_cases_in_the_report(tmp_path):
    explained = {c: "m1" for c in "abcdef"} | {"g": "other-model"}  # h: no page; g: another model's
    p, m, ex = _world(tmp_path, PROBS, LABELS, explained)
    rep = evaluate_files(p, m, out_dir=tmp_path / "r", n_boot=20, explain_dir=ex, viewer_cases=4)
    # best first: a .95, d .90, b .80, f .70, c .40, e .10; worst first: e, c, f, b, d, a (g, h not explained)
    assert rep["viewer"]["model"] == "m1" and rep["viewer"]["cases"] == ["a", "e", "d", "c"]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["viewer"]["cases"] == ["a", "e", "d", "c"]
    html_text = (tmp_path / "r" / "report.html").read_text()
    assert "<h2>3D viewer</h2>" in html_text
    assert not re.search(r"https?://", html_text, re.I)  # the report still fetches nothing
    cases = read_cases(tmp_path / "r" / "report.html")
    assert [c["label"] for c in cases] == ["a (most confidently right)", "e (most wrong)",
                                           "d (most confidently right)", "c (most wrong)"]
    facts = dict(map(tuple, cases[1]["facts"]))
    assert facts["true class"] == "0" and facts["P(1)"] == "0.900" and facts["model"] == "m1"
    # each case's volumes come from its own page: e's map lies on its own slab (x = 5 + its index 4)
    sal = np.asarray(decode(cases[1]["maps"]["saliency"]).dataobj)
    assert sal[9].max() == pytest.approx(1.0, abs=1e-2) and sal[:9].max() == 0 and sal[10:].max() == 0


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_the_report_viewer_draws_and_switches_cases_in_chromium(tmp_path):
    p, m, ex = _world(tmp_path, PROBS, LABELS, {c: "m1" for c in "abcdef"})
    evaluate_files(p, m, out_dir=tmp_path / "r", n_boot=0, explain_dir=ex, viewer_cases=4)
    got, console, pixels = render(tmp_path / "r" / "report.html", [("mmai-viewer-case", "1", "change")])
    assert got["state"] == "ready" and console == "", (got, console)
    assert got["cases"] == ["a (most confidently right)", "e (most wrong)", "d (most confidently right)",
                            "c (most wrong)"]
    assert "case\te" in got["facts"] and "true class\t0" in got["facts"]  # the selector switched cases
    assert grey_levels(pixels) > 20 and warm_pixels(pixels) > 50


def test_evaluate_without_explained_cases_says_so(tmp_path):
    p, m, ex = _world(tmp_path, PROBS, LABELS, {"a": "other-model"})
    rep = evaluate_files(p, m, out_dir=tmp_path / "r", n_boot=0, explain_dir=ex)
    assert rep["viewer"]["cases"] == [] and "no scored case has an explanation page" in rep["viewer"]["note"]
    assert "3D viewer" not in (tmp_path / "r" / "report.html").read_text()
    with pytest.raises(MmaiError, match="needs --out"):
        evaluate_files(p, m, explain_dir=ex)
    with pytest.raises(MmaiError, match="not a folder"):
        evaluate_files(p, m, out_dir=tmp_path / "r2", explain_dir=tmp_path / "nowhere")


def test_evaluate_cli_explain_options(tmp_path, capsys):
    p, m, ex = _world(tmp_path, PROBS, LABELS, {c: "m1" for c in "abc"})
    assert main(["evaluate", "--predictions", str(p), "--manifest", str(m), "--out", str(tmp_path / "r"),
                 "--n-boot", "0", "--explain", str(ex), "--viewer-cases", "2"]) == 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["viewer"]["cases"] == ["a", "c"]
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--predictions", str(p), "--manifest", str(m), "--explain", str(ex), "--viewer-cases", "0"])
    assert exc.value.code == 2
