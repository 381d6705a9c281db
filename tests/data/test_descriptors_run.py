"""Lesion descriptors as model inputs: the switch, leak-free fitting, the preprocess -> train ->
predict round trip on a tiny ``mmai synth --kind nodule`` cohort, and raw inputs == preprocessed."""

from __future__ import annotations

import dataclasses
import json
import logging

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmai.config import config_from_dict, load_config
from mmai.data.descriptors import attach_descriptors, descriptor_names
from mmai.errors import ConfigError
from mmai.transforms.descriptors import DESCRIPTOR_NAMES

PIPELINE = """
task: {kind: binary, target: label}
clinical:
  numeric:
    - {name: age, range: [0, 120]}
    - {name: crp, log: true, range: [0, 500]}
    - {name: bmi, range: [10, 80]}
  categorical: [sex, {name: smoking, levels: [never, former, current]}]
  binary: [diabetes]
image:
  column: image
  modality: CT
  spacing: [1.5, 1.5, 1.5]
  intensity: {kind: windows, windows: [[-1000, 400], [-160, 240]], b_min: 0.0, b_max: 1.0}
  roi: {mask: lesion_mask, size_mm: [24, 24, 24]}
  cache: memory
model: {encoder: resnet, widths: [4, 8, 8, 8], fusion: cross_attention, dim: 16, heads: 2}
train: {epochs: 1, batch_size: 4, seed: 0, val_fraction: 0.25}
"""


def _config(**image):
    import yaml

    data = yaml.safe_load(PIPELINE)
    data["image"].update(image)
    return config_from_dict(data, source="test.yaml")


def test_switch_defaults_on_with_a_mask_and_off_for_the_baselines():
    cfg = _config()
    assert cfg.image.descriptors == "auto" and descriptor_names(cfg) == DESCRIPTOR_NAMES
    for fusion in ("clinical_only", "image_only"):
        assert descriptor_names(cfg.replace(model=dataclasses.replace(cfg.model, fusion=fusion))) == ()
    assert descriptor_names(_config(descriptors=False)) == ()
    assert descriptor_names(_config(descriptors=True)) == DESCRIPTOR_NAMES
    no_mask = {"roi": {"center": ["x", "y", "z"], "size_mm": [24, 24, 24]}}
    assert descriptor_names(_config(**no_mask)) == ()
    with pytest.raises(ConfigError, match="image.descriptors = true needs a lesion mask"):
        _config(descriptors=True, **no_mask)
    with pytest.raises(ConfigError, match="image.descriptors"):
        _config(descriptors="always")


def test_schema_without_clinical_section_and_name_clash():
    import yaml

    from mmai.data.descriptors import extend_schema

    only = extend_schema(None, DESCRIPTOR_NAMES)
    assert only.names == list(DESCRIPTOR_NAMES) and {c.kind for c in only.columns} == {"numeric"}
    data = yaml.safe_load(PIPELINE)
    data["clinical"]["numeric"].append("lesion_max")
    cfg = config_from_dict(data, source="clash.yaml")
    with pytest.raises(ConfigError, match=r"clash.yaml: clinical column\(s\) \['lesion_max'\]"):
        extend_schema(cfg.clinical, descriptor_names(cfg), cfg.source)
    assert extend_schema(cfg.clinical, (), cfg.source).names == cfg.clinical.names


def test_preprocessor_is_fitted_on_training_rows_only_and_missing_stays_missing():
    from mmai.engine.prepare import fit_clinical

    cfg = _config()
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "age": rng.uniform(40, 80, n),
                       "crp": rng.uniform(1, 20, n), "bmi": rng.uniform(18, 35, n),
                       "sex": rng.choice(["M", "F"], n), "smoking": "never", "diabetes": 0})
    for name in DESCRIPTOR_NAMES:
        df[name] = rng.normal(0.0, 1.0, n)
    train, test = df.iloc[:30].copy(), df.iloc[30:].copy()
    test["lesion_max"] = 1e6  # held-out rows with extreme values must not move the fitted statistics
    pre = fit_clinical(cfg, train)
    assert [s.name for s in pre.feature_specs][3:23] == list(DESCRIPTOR_NAMES)  # after the declared numerics
    st = {s["name"]: s for s in pre.to_state()["features"]}
    assert st["lesion_max"]["center"] == pytest.approx(np.median(train["lesion_max"]))
    assert st["lesion_max"]["fill"] == pytest.approx(np.median(train["lesion_max"]))
    refit = fit_clinical(cfg, pd.concat([train, test]))
    assert {s["name"]: s for s in refit.to_state()["features"]}["lesion_max"]["scale"] != st["lesion_max"]["scale"]
    row = test.iloc[:1].copy()
    row[list(DESCRIPTOR_NAMES)] = np.nan
    values, mask = pre.transform(row)
    j = pre.feature_names.index("lesion_mean")
    assert mask[0, j] == 0.0 and mask[0, 0] == 1.0  # missing: masked (the model's missing token)


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def nodule_run(tmp_path_factory):
    """A 16-case nodule cohort: raw manifest, `mmai preprocess` output and a trained run."""
    from mmai.engine.run import train_from_files
    from mmai.preprocess import run_preprocess
    from mmai.synth_nodule import write_nodule_cohort

    root = tmp_path_factory.mktemp("desc")
    write_nodule_cohort(root / "cohort", n=16, seed=3, progress=False, workers=1)
    (root / "p.yaml").write_text(PIPELINE)
    summary = run_preprocess(config_path=root / "p.yaml", input_path=root / "cohort" / "manifest.csv",
                             out_dir=root / "pre", progress=False)
    assert summary.n_failed == 0
    train_from_files(root / "p.yaml", root / "pre" / "manifest.csv", root / "run", device="cpu", progress=False)
    return root


@pytest.mark.slow
def test_preprocessed_manifest_carries_the_descriptors_with_provenance(nodule_run):
    from mmai.data.provenance import read_provenance

    pre = pd.read_csv(nodule_run / "pre" / "manifest.csv")
    assert set(DESCRIPTOR_NAMES) <= set(pre.columns)
    assert pre[list(DESCRIPTOR_NAMES)].notna().all().all()
    info = read_provenance(nodule_run / "pre" / pre["image"].iloc[0])
    assert info["lesion_descriptors"]["version"] == 1
    assert info["lesion_descriptors"]["values"]["lesion_max"] == pytest.approx(pre["lesion_max"].iloc[0])
    # 5-8 mm nodules (the synth's radius range), measured in mm^3 on the 1.5 mm box
    assert pre["lesion_volume_mm3"].between(4 / 3 * np.pi * 4**3, 4 / 3 * np.pi * 10**3).all()
    # a calcified core (700 HU) shows in the upper tail: the synth's truth separates on lesion_max
    truth = pd.read_csv(nodule_run / "cohort" / "truth.csv").set_index("case_id").loc[pre["case_id"]]
    calc = truth["calcified"].to_numpy().astype(bool)
    assert pre["lesion_max"][calc].min() > pre["lesion_max"][~calc].max()


@pytest.mark.slow
def test_run_records_and_fits_the_descriptors_on_its_training_rows(nodule_run):
    from mmai.data.splits import make_splits
    from mmai.io.manifest import load_manifest

    state = json.loads((nodule_run / "run" / "state.json").read_text())
    assert state["descriptors"]["names"] == list(DESCRIPTOR_NAMES) and state["descriptors"]["version"] == 1
    feats = {f["name"]: f for f in state["clinical"]["features"]}
    assert set(DESCRIPTOR_NAMES) <= set(feats)
    cfg = load_config(nodule_run / "run" / "config.yaml")
    df = load_manifest(nodule_run / "pre" / "manifest.csv", cfg)
    split = make_splits(df, kind="binary", val_fraction=cfg.train.val_fraction, seed=cfg.train.seed)[0]
    train_rows = df.iloc[split.train]
    for name in ("lesion_mean", "lesion_max", "lesion_volume_mm3"):
        assert feats[name]["center"] == pytest.approx(float(np.median(train_rows[name].astype(float))))
        assert feats[name]["center"] != pytest.approx(float(np.median(df[name].astype(float))))


@pytest.mark.slow
def test_predict_computes_descriptors_from_the_images_as_in_training(nodule_run, tmp_path):
    from mmai.inference.predictor import Predictor, predict_from_files

    pre = pd.read_csv(nodule_run / "pre" / "manifest.csv")
    out = predict_from_files(nodule_run / "run", tmp_path / "a.csv", manifest_path=nodule_run / "pre" / "manifest.csv",
                             progress=False)
    assert out.n_predicted == len(pre) and out.n_failed == 0
    # the manifest's descriptor columns are a copy for the user: the model reads the volumes' own
    edited = pre.copy()
    edited[list(DESCRIPTOR_NAMES)] = 0.0
    edited.to_csv(nodule_run / "pre" / "edited.csv", index=False)
    predict_from_files(nodule_run / "run", tmp_path / "b.csv", manifest_path=nodule_run / "pre" / "edited.csv",
                       progress=False)
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert np.allclose(a["prob_1"], b["prob_1"])
    # the clinical matrix the model sees holds the descriptors, scaled with the training statistics
    predictor = Predictor(nodule_run / "run")
    from mmai.io.manifest import load_manifest

    df = load_manifest(nodule_run / "pre" / "manifest.csv", predictor.config, require_targets=False)
    values, mask, ok = predictor._clinical(df, [])
    j = predictor.pre.feature_names.index("lesion_max")
    st = predictor.pre.statistics[j]
    assert all(ok) and mask[:, j].all()
    assert np.allclose(values[:, j], (df["lesion_max"].astype(float) - st["center"]) / st["scale"], atol=1e-4)


@pytest.mark.slow
def test_raw_inputs_give_the_descriptors_of_preprocess(nodule_run, caplog):
    from mmai.io.manifest import load_manifest

    cfg = load_config(nodule_run / "p.yaml")
    cohort = nodule_run / "cohort"
    raw = load_manifest(cohort / "manifest.csv", cfg, require_targets=False)
    raw.loc[1, "lesion_mask"] = None  # a missing mask
    empty = nib.load(cohort / "masks" / "nod0002.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), str(cohort / "empty.nii.gz"))
    raw.loc[2, "lesion_mask"] = "empty.nii.gz"  # an empty one (relative to the manifest's folder)
    with caplog.at_level(logging.WARNING):
        got = attach_descriptors(cfg.image, raw, DESCRIPTOR_NAMES, base_dir=cohort)
    pre = pd.read_csv(nodule_run / "pre" / "manifest.csv").set_index("case_id").loc[got["case_id"]]
    keep = [i for i in range(len(got)) if i not in (1, 2)]
    assert np.allclose(got[list(DESCRIPTOR_NAMES)].to_numpy()[keep], pre[list(DESCRIPTOR_NAMES)].to_numpy()[keep],
                       rtol=1e-9, atol=1e-9)
    assert got.loc[[1, 2], list(DESCRIPTOR_NAMES)].isna().all().all()  # missing, never zeros
    assert f"case {got['case_id'][1]}: lesion descriptors missing" in caplog.text
    assert f"case {got['case_id'][2]}: lesion descriptors missing" in caplog.text


@pytest.mark.slow
def test_preprocess_redoes_volumes_made_without_descriptors(nodule_run, tmp_path):
    from mmai.data.provenance import provenance_of, stamp
    from mmai.io.manifest import load_manifest
    from mmai.preprocess import preprocess_frame

    cfg = load_config(nodule_run / "p.yaml")
    cohort = nodule_run / "cohort"
    raw = load_manifest(cohort / "manifest.csv", cfg, require_targets=False).iloc[:3].reset_index(drop=True)
    raw.loc[2, "image"] = None  # a case without an image: kept, its descriptors empty
    first = preprocess_frame(raw, cfg, tmp_path, progress=False, base_dir=cohort)
    assert (first.n_done, first.n_missing_image) == (2, 1)
    # an output of an mmai without descriptors: the same pipeline id, no lesion_descriptors entry
    path = tmp_path / "images" / f"{raw['case_id'][0]}.nii.gz"
    img = nib.load(path)
    info = {k: v for k, v in provenance_of(img).items() if k != "lesion_descriptors"}
    old = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    stamp(old, info)
    nib.save(old, str(path))
    again = preprocess_frame(raw, cfg, tmp_path, progress=False, base_dir=cohort)
    assert (again.n_done, again.n_skipped) == (1, 1)
    out = pd.read_csv(tmp_path / "manifest.csv")
    assert out.loc[:1, list(DESCRIPTOR_NAMES)].notna().all().all()
    assert out.loc[2, list(DESCRIPTOR_NAMES)].isna().all()
