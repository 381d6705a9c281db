"""mmai.engine.metrics against scikit-learn and lifelines, and the bootstrap's behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve as sk_calibration_curve

from mmai.engine import metrics as M
from mmai.engine.metrics_report import compute_metrics
from mmai.errors import MmaiError

lifelines_utils = pytest.importorskip("lifelines.utils")


def _binary_data(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return y, np.round(p, 2)  # rounding makes ties in p


def _survival_data(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 1)  # ties in risk
    t = np.round(rng.exponential(np.exp(-risk)), 1) + 0.1  # ties in time
    e = rng.random(n) < 0.6
    return t, e.astype(float), risk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_equal_sklearn(seed):
    y, p = _binary_data(seed)
    assert M.auroc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.auprc(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert M.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    pred = (p >= 0.5).astype(float)
    assert M.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)


@pytest.mark.parametrize("n_bins", [5, 10, 13])
def test_calibration_and_ece_match_sklearn_bins(n_bins):
    y, p = _binary_data(3)
    p[:3] = [0.0, 1.0, 0.2]  # bin edges themselves
    cal = M.calibration_curve(y, p, n_bins=n_bins)
    frac, mean = sk_calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    np.testing.assert_allclose(cal["frac_pos"], frac, atol=1e-12)
    np.testing.assert_allclose(cal["mean_pred"], mean, atol=1e-12)
    assert sum(cal["count"]) == len(y)
    expected = sum(c / len(y) * abs(f - m) for c, f, m in zip(cal["count"], frac, mean, strict=True))
    assert M.ece(y, p, n_bins=n_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_of_calibrated_and_miscalibrated_predictions():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)
    assert M.ece(y, p) < 0.02
    assert M.ece(y, np.clip(p + 0.2, 0, 1)) > 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 250)
    P = rng.dirichlet(np.ones(4), 250)
    P[np.arange(250), y] += 0.3
    P /= P.sum(1, keepdims=True)
    assert M.auroc(y, P) == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr", average="macro"), abs=1e-12)
    assert M.brier(y, P) == pytest.approx(skm.brier_score_loss(y, P, labels=[0, 1, 2, 3]), abs=1e-12)
    pred = P.argmax(1)
    assert M.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)


def test_regression_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    pred = y + rng.normal(scale=0.5, size=200)
    assert M.mae(y, pred) == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-12)
    assert M.rmse(y, pred) == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)), abs=1e-12)
    assert M.r2(y, pred) == pytest.approx(skm.r2_score(y, pred), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_c_index_equals_lifelines_with_ties(seed):
    t, e, r = _survival_data(seed)
    expected = lifelines_utils.concordance_index(t, -r, e)
    assert M.c_index(t, e, r) == pytest.approx(expected, abs=1e-12)


def test_c_index_tied_times_event_vs_censored_like_lifelines():
    t = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 3.0])
    e = np.array([1, 1, 0, 1, 0, 0])
    r = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.0])
    assert M.c_index(t, e, r) == pytest.approx(lifelines_utils.concordance_index(t, -r, e), abs=1e-12)


def test_kaplan_meier_equals_lifelines():
    lifelines = pytest.importorskip("lifelines")
    t, e, _ = _survival_data(0, n=120)
    times, surv = M.kaplan_meier(t, e)
    kmf = lifelines.KaplanMeierFitter().fit(t, e)
    np.testing.assert_allclose(surv, kmf.survival_function_at_times(times).to_numpy(), atol=1e-12)


BATCHED = [
    (M.auroc, lambda: _binary_data(4, 80)),
    (M.auprc, lambda: _binary_data(4, 80)),
    (M.brier, lambda: _binary_data(4, 80)),
    (M.ece, lambda: _binary_data(4, 80)),
    (M.balanced_accuracy, lambda: (_binary_data(4, 80)[0], (_binary_data(4, 80)[1] > 0.5).astype(float))),
    (M.mae, lambda: (np.arange(60.0), np.arange(60.0) ** 1.1)),
    (M.rmse, lambda: (np.arange(60.0), np.arange(60.0) ** 1.1)),
    (M.r2, lambda: (np.arange(60.0), np.arange(60.0) ** 1.1)),
    (M.c_index, lambda: _survival_data(5, 60)),
]


@pytest.mark.parametrize("fn,data", BATCHED, ids=[f.__name__ for f, _ in BATCHED])
def test_batched_bootstrap_equals_metric_on_resampled_rows(fn, data):
    arrays = data()
    fast = M.bootstrap_ci(fn, *arrays, n_boot=200, seed=7)
    slow = M.bootstrap_ci(lambda *a: fn(*a), *arrays, n_boot=200, seed=7)  # no batched kernel: a loop
    np.testing.assert_allclose(tuple(fast), tuple(slow), atol=1e-12)
    assert fast.n_skipped == slow.n_skipped


def test_bootstrap_equals_a_loop_over_sklearn():
    y, p = _binary_data(5, 100)
    fast = M.bootstrap_ci(M.auroc, y, p, n_boot=100, seed=3, stratify=y)
    slow = M.bootstrap_ci(skm.roc_auc_score, y, p, n_boot=100, seed=3, stratify=y)
    np.testing.assert_allclose(tuple(fast), tuple(slow), atol=1e-12)


def test_bootstrap_contains_point_and_shrinks_with_n():
    widths = []
    for n in (100, 2000):
        y, p = _binary_data(6, n)
        point, lo, hi = M.bootstrap_ci(M.auroc, y, p, n_boot=500, seed=0)
        assert lo <= point <= hi
        widths.append(hi - lo)
        t, e, r = _survival_data(6, n)
        point, lo, hi = M.bootstrap_ci(M.c_index, t, e, r, n_boot=100, seed=0)
        assert lo <= point <= hi
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(n): 4.5x narrower expected


def test_bootstrap_is_reproducible_with_a_seed():
    y, p = _binary_data(8, 150)
    a = M.bootstrap_ci(M.auprc, y, p, n_boot=300, seed=11)
    b = M.bootstrap_ci(M.auprc, y, p, n_boot=300, seed=11)
    c = M.bootstrap_ci(M.auprc, y, p, n_boot=300, seed=12)
    assert tuple(a) == tuple(b)
    assert tuple(a) != tuple(c)


def test_bootstrap_skips_and_counts_undefined_resamples():
    y = np.array([0.0] * 9 + [1.0])
    p = np.linspace(0, 1, 10)
    ci = M.bootstrap_ci(M.auroc, y, p, n_boot=500, seed=0)
    assert 0 < ci.n_skipped < 500 and ci.n_boot == 500  # P(no positive drawn) = 0.9^10 ~ 35%
    assert M.bootstrap_ci(M.auroc, y, p, n_boot=500, seed=0, stratify=y).n_skipped == 0
    ci = M.bootstrap_ci(lambda a, b: M.auroc(a, b), y, p, n_boot=200, seed=0)  # loop path too
    assert ci.n_skipped > 0


def test_bootstrap_auroc_runs_batched_not_once_per_resample():
    """The module's metrics run as one weighted kernel over chunks of resamples (the metric itself
    only for the point estimate), with the same interval as calling it once per resample."""
    y, p = _binary_data(9, 200)
    calls = {"metric": 0, "kernel": 0}

    def kernel(W, *prepped):
        calls["kernel"] += 1
        return M.auroc._weighted(W, *prepped)

    def metric(*arrays):
        calls["metric"] += 1
        return M.auroc(*arrays)

    metric._weighted, metric._prep = kernel, M.auroc._prep
    batched = M.bootstrap_ci(metric, y, p, n_boot=1000, seed=0)
    assert calls["metric"] == 1 and 1 <= calls["kernel"] <= 10
    looped = M.bootstrap_ci(lambda a, b: M.auroc(a, b), y, p, n_boot=1000, seed=0)
    np.testing.assert_allclose(tuple(batched), tuple(looped), atol=1e-9)


def test_compute_metrics_binary_is_json_and_complete():
    y, p = _binary_data(0, 200)
    labels = np.where(y == 1, "yes", "no")
    out = compute_metrics("binary", y=labels, prob=np.c_[1 - p, p], classes=["no", "yes"], n_boot=200)
    json.dumps(out, allow_nan=False)
    assert isinstance(out["ece"], float) and "ece_ci" not in out
    for k in ("auroc", "auprc", "brier", "balanced_accuracy"):
        assert isinstance(out[k], float)
        lo, hi = out[f"{k}_ci"]
        assert lo <= out[k] <= hi
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert out["n"] == 200 and out["n_pos"] == int(y.sum()) and out["positive_class"] == "yes"
    assert sum(out["calibration"]["count"]) == 200


def test_compute_metrics_other_kinds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    P = rng.dirichlet(np.ones(3), 90)
    out = compute_metrics("multiclass", y=np.array(["a", "b", "c"])[y], prob=P, classes=["a", "b", "c"],
                            n_boot=100)
    assert out["auroc"] == pytest.approx(skm.roc_auc_score(y, P, multi_class="ovr"))
    assert set(out["auroc_per_class"]) == {"a", "b", "c"} and sum(out["n_per_class"].values()) == 90
    reg = compute_metrics("regression", y=np.arange(50.0), pred=np.arange(50.0) + 1, n_boot=100)
    assert reg["mae"] == pytest.approx(1.0) and reg["mae_ci"] == [pytest.approx(1.0)] * 2
    t, e, r = _survival_data(1, 100)
    surv = compute_metrics("survival", time=t, event=e, risk=r, n_boot=100)
    assert surv["c_index"] == pytest.approx(lifelines_utils.concordance_index(t, -r, e))
    assert surv["n_events"] == int(e.sum())
    json.dumps([out, reg, surv], allow_nan=False)
    assert compute_metrics("survival", time=t, event=e, risk=r, n_boot=0)["c_index_ci"] is None


def test_compute_metrics_reports_undefined_instead_of_crashing():
    out = compute_metrics("binary", y=np.ones(20), prob=np.linspace(0, 1, 20), n_boot=50)
    assert out["auroc"] is None and "only class 1" in out["undefined"]["auroc"]
    assert isinstance(out["brier"], float)
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("call,match", [
    (lambda: M.auroc([], []), "empty"),
    (lambda: M.auroc([0, 1, 1], [0.1, np.nan, 0.3]), "NaN"),
    (lambda: M.auroc([0, 1, 2], [0.1, 0.2, 0.3]), "0/1"),
    (lambda: M.auroc([0, 1, 1], [0.1, 0.2]), "3"),
    (lambda: M.auroc([1, 1, 1], [0.1, 0.2, 0.3]), "undefined"),
    (lambda: M.brier([0, 1], [0.1, 1.5]), r"\[0, 1\]"),
    (lambda: M.c_index([1, 2], [0, 0], [0.1, 0.2]), "no comparable pairs"),
    (lambda: compute_metrics("binary", y=["a", "c"], prob=[0.1, 0.9], classes=["a", "b"]), "'c'.*not one of"),
    (lambda: compute_metrics("binary", y=[0, 1]), "needs prob"),
    (lambda: compute_metrics("ordinal", y=[0, 1]), "unknown task kind"),
    (lambda: compute_metrics("multiclass", y=[0, 1], prob=[[0.5, 0.6], [0.2, 0.8]]), "sum to 1"),
    (lambda: M.bootstrap_ci(M.auroc, [0, 1], [0.1], n_boot=10), "array 1"),
])
def test_errors_name_the_problem(call, match):
    with pytest.raises(MmaiError, match=match):
        call()


def test_r2_large_offset_and_constant_targets():
    rng = np.random.default_rng(0)
    y = 1e8 + rng.normal(size=100)
    pred = y + rng.normal(scale=0.5, size=100)
    assert M.r2(y, pred) == pytest.approx(skm.r2_score(y, pred), abs=1e-9)
    with pytest.raises(M.UndefinedMetricError, match="constant"):
        M.r2(np.full(10, 0.1), np.linspace(0, 1, 10))


# --- bootstrap over patients (groups)

def _cohort(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2), np.ones(n // 2)]
    p = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    return y, p


def test_group_bootstrap_of_duplicated_patients_equals_case_bootstrap_of_the_patients():
    """Three identical cases per patient carry the information of one: resampling patients gives
    exactly the interval of the one-case-per-patient data; resampling cases is overconfident."""
    from mmai.engine.metrics import auroc, bootstrap_ci

    y, p = _cohort()
    ci_patients = bootstrap_ci(auroc, y, p, n_boot=500, seed=3, stratify=y)
    y3, p3, pid = np.repeat(y, 3), np.repeat(p, 3), np.repeat(np.arange(y.size), 3)
    ci_groups = bootstrap_ci(auroc, y3, p3, n_boot=500, seed=3, stratify=y3, groups=pid)
    ci_cases = bootstrap_ci(auroc, y3, p3, n_boot=500, seed=3, stratify=y3)
    assert tuple(ci_groups) == pytest.approx(tuple(ci_patients), abs=1e-12)
    assert (ci_cases[2] - ci_cases[1]) < 0.8 * (ci_groups[2] - ci_groups[1])


def test_compute_metrics_groups_argument_and_checks():
    from mmai.engine.metrics import MetricError

    y, p = _cohort()
    y2, p2, pid = np.repeat(y, 2), np.repeat(p, 2), np.repeat([f"P{i:03d}" for i in range(y.size)], 2)
    out = compute_metrics("binary", y=y2, prob=p2, n_boot=200, groups=pid)
    ref = compute_metrics("binary", y=y, prob=p, n_boot=200)
    assert out["bootstrap_unit"] == "group" and out["auroc_ci"] == pytest.approx(ref["auroc_ci"])
    with pytest.raises(MetricError, match=r"groups must be \(N,\)"):
        compute_metrics("binary", y=y2, prob=p2, n_boot=10, groups=pid[:-1])
    mixed = compute_metrics("binary", y=y2, prob=p2, n_boot=50, groups=np.zeros(y2.size))  # one patient
    assert mixed["auroc_ci"] is None or all(np.isfinite(mixed["auroc_ci"]))
