"""The synthetic cohort: files of the contract, DICOM geometry read back by SimpleITK, known truth."""

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from mmai.errors import ConfigError
from mmai.synth import (
    SHAPE,
    SPACING,
    SynthSpec,
    make_phantom,
    phantom_origin_lps,
    sample_cohort,
    write_cohort,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    info = write_cohort(out, SynthSpec(n=6, seed=3), progress=False)
    return out, info


def test_files_of_the_contract(cohort):
    out, info = cohort
    for name in ("manifest.csv", "clinical.csv", "truth.csv", "truth.json"):
        assert (out / name).exists(), name
    m = pd.read_csv(out / "manifest.csv")
    assert list(m.columns) == ["case_id", "patient_id", "image", "age", "sex", "smoking", "diabetes", "crp", "bmi",
                               "label", "split"]
    assert set(m["split"]) <= {"train", "test"}
    truth = json.loads((out / "truth.json").read_text())
    assert truth["metric"] == "auroc" and 0.5 <= truth["bayes"] <= 1.0
    assert info == truth


def test_dicom_series_geometry_matches_simpleitk(cohort):
    out, _ = cohort
    folder = out / "images" / "case0000"
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(files) == SHAPE[2]
    reader.SetFileNames(files)
    img = reader.Execute()
    assert img.GetSize() == SHAPE
    np.testing.assert_allclose(img.GetSpacing(), SPACING, atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), phantom_origin_lps(), atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    # HU values of the phantom: air, lung, soft tissue, bone are all present (noise sigma 15 HU)
    assert arr.min() < -950 and arr.max() > 600
    assert np.mean((arr > -900) & (arr < -800)) > 0.02  # lung
    assert np.mean(np.abs(arr - 40) < 45) > 0.2  # soft tissue


def test_dicom_values_equal_the_phantom(tmp_path):
    """The written HU equal the generated phantom to the rounding of int16 storage."""
    from mmai.io.dicom_write import write_series

    vol, _ = make_phantom(np.random.default_rng(0), 10.0)
    write_series(vol, tmp_path, spacing=SPACING, origin=phantom_origin_lps(), rescale_intercept=-1024.0)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    arr = sitk.GetArrayFromImage(reader.Execute()).transpose(2, 1, 0)
    np.testing.assert_allclose(arr, np.round(vol), atol=0.51)


def test_phi_is_in_headers_but_cohort_is_reproducible(cohort):
    import pydicom

    out, _ = cohort
    ds = pydicom.dcmread(next((out / "images" / "case0000").iterdir()), stop_before_pixels=True)
    assert ds.Modality == "CT" and ds.PatientID == "P0000"  # synthetic "PHI" for de-identification tests
    assert ds.RescaleIntercept == -1024
    again = sample_cohort(SynthSpec(n=6, seed=3))
    m = pd.read_csv(out / "manifest.csv")
    assert list(again["label"]) == list(m["label"])


def test_outcome_depends_on_both_modalities():
    df = sample_cohort(SynthSpec(n=4000, seed=1, missing_rate=0.0))
    y = df["label"].to_numpy()
    r = df["lesion_radius_mm"].to_numpy(float)
    age = df["age"].to_numpy(float)
    # larger lesions and older patients have more events
    assert y[r > 14].mean() > y[r < 10].mean() + 0.2
    assert y[age > 70].mean() > y[age < 55].mean() + 0.15
    from sklearn.metrics import roc_auc_score

    from mmai.synth import bayes_metric

    bayes = bayes_metric(df, "binary")
    assert bayes > roc_auc_score(y, r) + 0.05  # the image alone falls short
    from mmai.synth import image_score

    assert bayes > roc_auc_score(y, df["true_linear_predictor"] - 1.8 * image_score(r)) + 0.02


def test_missing_cells_and_bad_spec():
    df = sample_cohort(SynthSpec(n=2000, seed=0, missing_rate=0.1))
    frac = df[["age", "sex", "smoking", "diabetes", "crp", "bmi"]].isna().to_numpy().mean()
    assert 0.08 < frac < 0.12
    assert df["label"].notna().all()
    with pytest.raises(ConfigError, match="task"):
        SynthSpec(task="regression")
    with pytest.raises(ConfigError, match="at least 4"):
        SynthSpec(n=1)


def test_survival_cohort(tmp_path):
    info = write_cohort(tmp_path, SynthSpec(n=30, task="survival", fmt="nifti", seed=2), progress=False)
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert {"time", "event"} <= set(m.columns) and info["metric"] == "c_index"
    assert (m["time"] > 0).all() and set(m["event"]) <= {0, 1}


def test_parallel_writing_gives_the_same_cohort(tmp_path):
    """Each case has its own random stream, so 2 worker processes write the same images as 1."""
    import nibabel as nib

    from mmai.synth import write_cohort

    spec = SynthSpec(n=5, seed=2, fmt="nifti")
    a = write_cohort(tmp_path / "one", spec, progress=False, workers=1)
    b = write_cohort(tmp_path / "two", spec, progress=False, workers=2)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # (a NaN AUROC is never == itself)
    for case in ("case0000", "case0004"):
        va = np.asarray(nib.load(tmp_path / "one" / "images" / f"{case}.nii.gz").dataobj)
        vb = np.asarray(nib.load(tmp_path / "two" / "images" / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, np.asarray(nib.load(tmp_path / "one" / "images" / "case0000.nii.gz").dataobj))
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        write_cohort(tmp_path / "bad", spec, workers=0)
