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


# ----------------------------------------------------------------------------- synth --kind nodule


def _pair(i: int, radius: float = 6.5):
    from mmai.synth_nodule import make_nodule_phantom

    return [make_nodule_phantom(np.random.default_rng([0, 2, i]), radius, calc, noise=False) for calc in (False, True)]


def test_nodule_classes_share_volume_and_mean_intensity():
    for i in range(3):
        (v0, m0, c0), (v1, m1, c1) = _pair(i)
        assert np.array_equal(m0, m1) and np.allclose(c0, c1)  # same lesion, same place
        les = m0 > 0
        # equal by construction for the occupancy-weighted mean; over the binary mask within a few HU
        assert abs(float(v0[les].mean()) - float(v1[les].mean())) < 5.0  # HU; contrast to lung is ~900 HU
        assert abs(float(v0.sum()) - float(v1.sum())) / float(les.sum()) < 0.5  # same integral
        assert float(v1[les].max()) - float(v0[les].max()) > 500  # the core, plain at 2 mm


def test_nodule_feature_is_lost_on_a_coarse_grid_and_kept_at_2mm():
    import dataclasses

    import torch
    from monai.data import MetaTensor

    from mmai.config import load_config
    from mmai.synth_nodule import affine_ras
    from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms

    demo = load_config("pipelines/demo.yaml").image
    coarse = preprocess_transforms(dataclasses.replace(demo, antialias=True), load=False)  # 9 mm, anti-aliased
    fine = preprocess_transforms(dataclasses.replace(demo, spacing=(2.0, 2.0, 2.0), size=None), load=False)
    for i in range(3):
        outs = {}
        for calc, (v, _m, _c) in zip((False, True), _pair(i), strict=True):
            x = MetaTensor(torch.from_numpy(v)[None], affine=torch.as_tensor(affine_ras()))
            outs[calc] = (apply_chain(coarse, {KEY: x})[KEY].numpy(), apply_chain(fine, {KEY: x.clone()})[KEY].numpy())
        hu = 2000.0  # window [-1000, 1000] -> [0, 1]
        assert np.abs(outs[True][0] - outs[False][0]).max() * hu < 15  # 9 mm: the classes look alike
        assert np.abs(outs[True][1] - outs[False][1]).max() * hu > 400  # 2 mm: the core stands out


def test_nodule_cohort_files(tmp_path):
    import json

    import nibabel as nib

    from mmai.cli import main

    assert main(["synth", "--kind", "nodule", "--format", "nifti", "--n", "6", "--out", str(tmp_path), "-q"]) == 0
    man = pd.read_csv(tmp_path / "manifest.csv")
    assert {"image", "lesion_mask", "lesion_x", "lesion_y", "lesion_z", "label", "split", "age"} <= set(man.columns)
    img = nib.load(str(tmp_path / man["image"][0]))
    mask = nib.load(str(tmp_path / man["lesion_mask"][0]))
    assert img.shape == (128, 112, 96) and np.allclose(img.header.get_zooms(), 2.0)
    assert np.allclose(img.affine, mask.affine)
    # the manifest's centre (RAS mm) is the mask's centre of mass
    idx = np.argwhere(np.asarray(mask.dataobj) > 0).mean(axis=0)
    centre = (mask.affine @ np.append(idx, 1.0))[:3]
    assert np.allclose(centre, man.loc[0, ["lesion_x", "lesion_y", "lesion_z"]].to_numpy(float), atol=1.0)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["kind"] == "nodule" and 0.0 <= truth["bayes"] <= 1.0
    assert set(pd.read_csv(tmp_path / "truth.csv").columns) >= {"calcified", "true_probability"}
    assert main(["synth", "--kind", "nodule", "--n", "6", "--out", str(tmp_path / "x"), "-q"]) != 0  # DICOM: refused
