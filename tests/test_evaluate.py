"""mmai.evaluate: joining predictions to the manifest, per-model reports, and the CLI verb."""

from __future__ import annotations

import html as _html
import json
import os
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mmai.cli import main
from mmai.errors import ManifestError
from mmai.evaluate import evaluate_files, evaluate_frame, format_report, infer_task

PNG = b"\x89PNG\r\n\x1a\n"


def _binary(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [f"c{i:03d}" for i in range(n)]
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    man = pd.DataFrame({"case_id": ids, "label": y.astype(str), "age": rng.normal(60, 5, n).round()})
    p = np.clip(0.4 * y + 0.6 * rng.random(n), 0, 1)
    pred = pd.DataFrame({"case_id": ids, "prob_1": p, "prob_0": 1 - p, "model_id": "fusion"})  # columns unsorted
    return man, pred, y, p


def test_binary_matches_sklearn_and_positive_class_is_second_sorted():
    man, pred, y, p = _binary()
    rep = evaluate_frame(pred, man, n_boot=100)
    json.dumps(rep, allow_nan=False)
    assert rep["kind"] == "binary" and rep["positive_class"] == "1" and rep["classes"] == ["0", "1"]
    m = rep["models"]["fusion"]["metrics"]
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["auroc_ci"][0] <= m["auroc"] <= m["auroc_ci"][1]
    assert rep["models"]["fusion"]["n_evaluated"] == len(y)


def test_numeric_manifest_labels_match_prob_suffixes():
    man, pred, y, p = _binary()
    man["label"] = y.astype(float)  # 0.0 / 1.0 as a float column would read
    assert evaluate_frame(pred, man, n_boot=0)["models"]["fusion"]["metrics"]["auroc"] == pytest.approx(
        skm.roc_auc_score(y, p))


def test_multiclass_with_text_labels_and_numeric_class_order():
    rng = np.random.default_rng(1)
    n = 90
    y = rng.integers(0, 3, n)
    P = rng.dirichlet(np.ones(3), n)
    names = np.array(["2", "9", "10"])  # numeric order, not text order
    man = pd.DataFrame({"case_id": [f"m{i}" for i in range(n)], "grade": names[y]})
    pred = pd.DataFrame({"case_id": man["case_id"], **{f"prob_{c}": P[:, i] for i, c in enumerate(names)}})
    rep = evaluate_frame(pred, man, target="grade", n_boot=50)
    assert rep["kind"] == "multiclass" and rep["classes"] == ["2", "9", "10"]
    m = rep["models"]["model"]["metrics"]
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr"))
    assert m["n_per_class"] == {c: int((names[y] == c).sum()) for c in names}


def test_regression_and_survival():
    rng = np.random.default_rng(2)
    n = 70
    ids = [f"r{i}" for i in range(n)]
    yv = rng.normal(size=n)
    pr = yv + rng.normal(scale=0.3, size=n)
    rep = evaluate_frame(pd.DataFrame({"case_id": ids, "prediction": pr}),
                         pd.DataFrame({"case_id": ids, "label": yv}), n_boot=50)
    assert rep["kind"] == "regression"
    assert rep["models"]["model"]["metrics"]["mae"] == pytest.approx(skm.mean_absolute_error(yv, pr))
    assert rep["models"]["model"]["metrics"]["r2"] == pytest.approx(skm.r2_score(yv, pr))

    lifelines_utils = pytest.importorskip("lifelines.utils")
    risk = rng.normal(size=n)
    t = np.round(rng.exponential(np.exp(-risk)), 2) + 0.01
    e = (rng.random(n) < 0.7).astype(int)
    man = pd.DataFrame({"case_id": ids, "os_months": t, "dead": e})
    rep = evaluate_frame(pd.DataFrame({"case_id": ids, "risk": risk, "model_id": "cox"}), man,
                         time="os_months", event="dead", n_boot=50)
    assert rep["kind"] == "survival"
    m = rep["models"]["cox"]["metrics"]
    assert m["c_index"] == pytest.approx(lifelines_utils.concordance_index(t, -risk, e))
    assert m["n_events"] == int(e.sum())


def test_missing_and_extra_cases_are_reported_per_model():
    man, pred, y, p = _binary(40)
    man.loc[man["case_id"].isin(["c005", "c006"]), "label"] = np.nan  # no target
    other = pred.iloc[:30].assign(model_id="image_only")
    extra = pd.DataFrame({"case_id": ["x1", "x2", "x3"], "prob_1": 0.5, "prob_0": 0.5, "model_id": "fusion"})
    bad = pred.iloc[[7]].assign(model_id="image_only", case_id="c035", prob_1=np.nan)
    allp = pd.concat([pred, extra, other[other["case_id"] != "c035"], bad], ignore_index=True)
    rep = evaluate_frame(allp, man, n_boot=20)
    f, i = rep["models"]["fusion"], rep["models"]["image_only"]
    assert f["not_in_manifest"] == {"count": 3, "case_ids": ["x1", "x2", "x3"]}
    assert f["missing_target"] == {"count": 2, "case_ids": ["c005", "c006"]}
    assert f["n_predictions"] == 43 and f["n_evaluated"] == 38
    assert i["invalid_prediction"] == {"count": 1, "case_ids": ["c035"]}
    assert i["not_predicted"]["count"] == 9 and i["n_evaluated"] == 28
    text = format_report(rep)
    assert "fusion" in text and "image_only" in text
    assert "3 case(s) not in manifest, left out (first: x1, x2, x3)" in text
    assert "1 case(s) invalid prediction" in text


@pytest.mark.parametrize("mutate,match", [
    (lambda man, pred: (man.assign(label=np.where(man["label"] == "1", "2", "0")), pred), "case 'c0.*label '2'"),
    (lambda man, pred: (man.assign(case_id="z" + man["case_id"]), pred), "no case has both"),
    (lambda man, pred: (man, pred.drop(columns=["prob_0", "prob_1"])), "no recognisable"),
    (lambda man, pred: (man, pred.drop(columns=["prob_0"])), "only"),
    (lambda man, pred: (man, pd.concat([pred, pred.iloc[:1]])), "more than once"),
    (lambda man, pred: (man, pred.assign(prob_1=pred["prob_1"] + 0.2)), "sum to 1"),
    (lambda man, pred: (man.drop(columns=["label"]), pred), "no 'label' column"),
])
def test_bad_inputs_raise_naming_the_problem(mutate, match):
    man, pred, _, _ = _binary(20)
    man, pred = mutate(man, pred)
    with pytest.raises(ManifestError, match=match):
        evaluate_frame(pred, man, n_boot=0)


def test_infer_task_rejects_mixed_columns():
    with pytest.raises(ManifestError, match="one task"):
        infer_task(["case_id", "prob_0", "prob_1", "risk"])
    assert infer_task(["case_id", "prediction", "model_id"]) == ("regression", [])


def test_evaluate_files_writes_report_and_plots(tmp_path):
    man, pred, _, _ = _binary()
    man.to_csv(tmp_path / "manifest.csv", index=False)
    pd.concat([pred, pred.assign(model_id="clinical_only", prob_1=0.5, prob_0=0.5)]).to_csv(
        tmp_path / "predictions.csv", index=False)
    rep = evaluate_files(tmp_path / "predictions.csv", tmp_path / "manifest.csv", tmp_path / "out", n_boot=50)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["models"].keys() == {"fusion", "clinical_only"} and on_disk == rep
    assert set(rep["plots"].values()) == {"roc.png", "pr.png", "calibration.png"}
    for name in rep["plots"].values():
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG
    assert rep["models"]["clinical_only"]["metrics"]["auroc"] == pytest.approx(0.5)


def test_cli_evaluate_survival_writes_report_and_km(tmp_path, capsys):
    rng = np.random.default_rng(3)
    n = 45
    ids = [f"s{i}" for i in range(n)]
    pd.DataFrame({"case_id": ids, "time": rng.exponential(size=n).round(3) + 0.01,
                  "event": rng.integers(0, 2, n)}).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame({"case_id": ids, "risk": rng.normal(size=n), "model_id": "fusion"}).to_csv(
        tmp_path / "p.csv", index=False)
    rc = main(["evaluate", "--predictions", str(tmp_path / "p.csv"), "--manifest", str(tmp_path / "m.csv"),
               "--out", str(tmp_path / "rep"), "--n-boot", "50", "-q"])
    assert rc == 0
    assert "c_index" in capsys.readouterr().out
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["kind"] == "survival"
    assert (tmp_path / "rep" / "km_fusion.png").read_bytes()[:8] == PNG


def test_cli_evaluate_exits_2_on_unrecognisable_predictions(tmp_path, capsys):
    man, pred, _, _ = _binary(10)
    man.to_csv(tmp_path / "m.csv", index=False)
    pred.rename(columns={"prob_0": "p0", "prob_1": "p1"}).to_csv(tmp_path / "p.csv", index=False)
    rc = main(["evaluate", "--predictions", str(tmp_path / "p.csv"), "--manifest", str(tmp_path / "m.csv"),
               "--out", str(tmp_path / "rep"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "no recognisable prediction columns" in err
    assert not (tmp_path / "rep" / "report.json").exists()


# ----------------------------------------------------------------------------- the split rule


def _with_split(n: int = 60):
    man, pred, y, p = _binary(n)
    man["split"] = ["train"] * (n // 2) + ["val"] * (n // 6) + ["test"] * (n - n // 2 - n // 6)
    return man, pred, y, p


def test_default_split_is_test_and_the_report_says_so():
    """The tour's failing case: training and test rows scored together with nothing saying so."""
    man, pred, y, p = _with_split()
    test = (man["split"] == "test").to_numpy()
    rep = evaluate_frame(pred, man, n_boot=0)
    assert rep["split"] == "test" and rep["n_split_rows"] == int(test.sum()) and rep["n_manifest_rows"] == 60
    e = rep["models"]["fusion"]
    assert e["n_evaluated"] == int(test.sum()) and e["outside_split"] == 60 - int(test.sum())
    assert e["missing_target"]["count"] == 0 and e["not_in_manifest"]["count"] == 0
    assert e["metrics"]["auroc"] == pytest.approx(skm.roc_auc_score(y[test], p[test]))
    assert "split: test (20 of 60 manifest rows)" in format_report(rep)


def test_split_all_and_named_splits():
    man, pred, y, p = _with_split()
    rep = evaluate_frame(pred, man, n_boot=0, split="all")
    assert rep["split"] == "all" and rep["models"]["fusion"]["n_evaluated"] == 60
    assert rep["models"]["fusion"]["metrics"]["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert evaluate_frame(pred, man, n_boot=0, split="train")["models"]["fusion"]["n_evaluated"] == 30


def test_no_split_column_scores_all_rows_but_a_named_split_needs_one():
    man, pred, y, p = _binary()
    rep = evaluate_frame(pred, man, n_boot=0)
    assert rep["split"] == "all" and rep["models"]["fusion"]["n_evaluated"] == 60
    with pytest.raises(ManifestError, match="needs a split column"):
        evaluate_frame(pred, man, n_boot=0, split="test")
    man["split"] = "train"
    with pytest.raises(ManifestError, match=r"no rows with split = 'test' \(splits present: \['train'\]\)"):
        evaluate_frame(pred, man, n_boot=0)


def test_cli_split_flag(tmp_path, capsys):
    man, pred, _, _ = _with_split()
    man.to_csv(tmp_path / "m.csv", index=False)
    pred.to_csv(tmp_path / "p.csv", index=False)
    base = ["evaluate", "--predictions", str(tmp_path / "p.csv"), "--manifest", str(tmp_path / "m.csv"),
            "--n-boot", "0", "-q"]
    assert main([*base, "--split", "all", "--out", str(tmp_path / "r")]) == 0
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["split"] == "all" and rep["n_split_rows"] == 60
    assert "split: all (60 of 60 manifest rows)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- survival horizons


def _survival(n: int = 200, censor: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    risk = rng.normal(0, 1, n)
    t_event = rng.exponential(10 * np.exp(-risk))
    t_cens = rng.exponential(20, n) if censor else np.full(n, np.inf)
    time = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(int)
    ids = [f"s{i}" for i in range(n)]
    man = pd.DataFrame({"case_id": ids, "time": time, "event": event})
    s5 = np.exp(-5 / 10 * np.exp(risk))  # the true S(5 | risk) of this model
    pred = pd.DataFrame({"case_id": ids, "risk": risk, "surv_5": s5, "model_id": "cox"})
    return man, pred, time, event, risk


def test_time_dependent_auroc_without_censoring_is_the_auroc_of_event_by_t():
    man, pred, time, event, risk = _survival(censor=False)
    rep = evaluate_frame(pred, man, n_boot=50)
    h = rep["models"]["cox"]["metrics"]["horizons"]["surv_5"]
    assert h["auroc"] == pytest.approx(skm.roc_auc_score((time <= 5).astype(int), risk))
    assert h["auroc_ci"][0] <= h["auroc"] <= h["auroc_ci"][1]
    # true probabilities are calibrated: predicted and observed P(event by 5) agree per group
    cal = h["calibration"]
    assert cal["error"] < 0.08 and abs(cal["predicted_mean"] - cal["observed_all"]) < 0.05


def test_miscalibrated_survival_probabilities_show_in_the_calibration():
    man, pred, *_ = _survival(n=400)
    pred["surv_5"] = pred["surv_5"] ** 3  # three times the hazard
    h = evaluate_frame(pred, man, n_boot=0)["models"]["cox"]["metrics"]["horizons"]["surv_5"]
    assert h["calibration"]["error"] > 0.15 and h["calibration"]["predicted_mean"] > h["calibration"]["observed_all"]


# ----------------------------------------------------------------------------- HTML report

CHROMIUM = "/usr/bin/chromium"
_CHECK = """<!DOCTYPE html><html><body><iframe id="f" src="report.html" width="1200" height="900"></iframe>
<script>
document.getElementById('f').onload = function () {
  var d = this.contentDocument, imgs = Array.prototype.slice.call(d.images);
  var pre = document.createElement('pre'); pre.id = 'result';
  pre.textContent = JSON.stringify({images: imgs.map(function (i) {
      return [i.getAttribute('src'), i.complete && i.naturalWidth > 0]; }),
    tables: d.querySelectorAll('table').length, text: d.body.innerText});
  document.body.appendChild(pre);
};
</script></body></html>
"""


def _render(folder) -> tuple[dict, str]:
    """Open folder/report.html in headless Chromium; what loaded, and the browser's console lines."""
    (folder / "check.html").write_text(_CHECK)
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={folder.parent / 'chromium-profile'}", "--allow-file-access-from-files",
                        "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                        (folder / "check.html").as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="result">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the page did not render: {r.stdout[-500:]} {r.stderr[-500:]}"
    console = "\n".join(line for line in r.stderr.splitlines() if "CONSOLE" in line)
    return json.loads(_html.unescape(m.group(1))), console


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_html_report_renders_in_chromium_with_its_images(tmp_path):
    man, pred, *_ = _survival()
    man["split"] = "test"
    man.to_csv(tmp_path / "m.csv", index=False)
    pred.to_csv(tmp_path / "p.csv", index=False)
    rep = evaluate_files(tmp_path / "p.csv", tmp_path / "m.csv", out_dir=tmp_path / "r", n_boot=50)
    assert rep["html"] == "report.html" and set(rep["plots"]) == {"km_cox", "calibration_t"}
    got, console = _render(tmp_path / "r")
    assert console == ""  # no console errors or messages
    assert sorted(src for src, _ in got["images"]) == ["calibration_t.png", "km_cox.png"]
    assert all(ok for _, ok in got["images"]), got["images"]
    assert got["tables"] >= 3
    text = got["text"]
    assert "split\ttest" in text and "rows in the split\t200" in text and "time-dependent AUROC" in text
    c = rep["models"]["cox"]["metrics"]
    assert f"{c['c_index']:.3f} [{c['c_index_ci'][0]:.3f}, {c['c_index_ci'][1]:.3f}]" in text
    # the check itself can fail: a missing plot is reported as not loaded
    (tmp_path / "r" / "km_cox.png").unlink()
    got, _ = _render(tmp_path / "r")
    assert dict(got["images"]) == {"calibration_t.png": True, "km_cox.png": False}


def test_bootstrap_resamples_patients_when_a_patient_has_several_cases(tmp_path):
    """Two studies per patient: the CI is computed over patients (report says so), and is wider
    than the case-level CI would be, since a patient's two cases move together."""
    from mmai.evaluate import evaluate_frame

    rng = np.random.default_rng(0)
    n_pat = 60
    y_pat = rng.random(n_pat) < 0.5
    p_pat = np.clip(0.5 + (y_pat - 0.5) * 0.4 + rng.normal(0, 0.25, n_pat), 0.01, 0.99)
    rows, preds = [], []
    for i in range(n_pat):
        for k in range(2):
            cid = f"p{i}_s{k}"
            rows.append({"case_id": cid, "patient_id": f"p{i}", "label": int(y_pat[i])})
            preds.append({"case_id": cid, "prob_0": 1 - p_pat[i], "prob_1": p_pat[i], "prediction": int(p_pat[i] >= 0.5)})
    man, pred = pd.DataFrame(rows), pd.DataFrame(preds)
    grouped = evaluate_frame(pred, man, n_boot=400, seed=0)
    single = evaluate_frame(pred, man.drop(columns="patient_id"), n_boot=400, seed=0)
    mg = next(iter(grouped["models"].values()))["metrics"]
    ms = next(iter(single["models"].values()))["metrics"]
    assert mg["bootstrap_unit"] == "group" and "bootstrap_unit" not in ms
    assert "over patients" in grouped["ci"] and single["ci"].endswith("over cases")
    assert mg["auroc"] == pytest.approx(ms["auroc"])
    width = lambda m: m["auroc_ci"][1] - m["auroc_ci"][0]  # noqa: E731
    assert width(mg) > 1.2 * width(ms)
