"""Provenance: preprocessed volumes record pipeline + modality; other pipelines / modalities are refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from mmai.config import ImageConfig, IntensityConfig, config_from_dict
from mmai.data.dataset import ImageLoader, MultimodalDataset
from mmai.data.provenance import ProvenanceError, check_input, expected_provenance, read_provenance
from mmai.errors import PreprocessError
from mmai.preprocess import preprocess_frame
from tests.data.real_pixels import ct_series, mr_brain_nifti


def _ct_cfg(**kw) -> ImageConfig:
    return ImageConfig(modality="CT", spacing=(3.0, 3.0, 5.0), intensity=IntensityConfig(kind="windows",
                       windows=((-1000, 400), (-160, 240))), **kw)


def _pre(tmp_path, image_cfg, sources, name="pre", split=None):
    cfg = config_from_dict({"image": dataclasses.asdict(image_cfg)})
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(len(sources))], "image": [str(s) for s in sources]})
    if split is not None:
        df["split"] = split
    summary = preprocess_frame(df, cfg, tmp_path / name, progress=False)
    return summary, pd.read_csv(tmp_path / name / "manifest.csv")


def test_preprocessed_volume_records_pipeline_and_modality(tmp_path):
    cfg = _ct_cfg()
    summary, man = _pre(tmp_path, cfg, [ct_series(tmp_path / "ct")])
    assert summary.n_done == 1 and man["fov_lost_fraction"].tolist() == [0.0]
    out = tmp_path / "pre" / man["image"][0]
    info = read_provenance(out)
    assert info["pipeline_id"] == expected_provenance(cfg)["pipeline_id"] and info["modality"] == "CT"
    check_input(out, expected_provenance(cfg))  # passes
    arr, affine = ImageLoader(cfg).load(str(out))
    assert arr.shape[0] == 2 and affine.shape == (4, 4)


def test_double_preprocessing_is_refused(tmp_path):
    cfg = _ct_cfg()
    _, man = _pre(tmp_path, cfg, [ct_series(tmp_path / "ct")])
    out = str(tmp_path / "pre" / man["image"][0])
    other = dataclasses.replace(cfg, intensity=IntensityConfig(kind="window", a_min=-160, a_max=240))
    with pytest.raises(ProvenanceError, match="preprocessed by pipeline .* refusing to normalise it twice"):
        ImageLoader(other).load(out)
    with pytest.raises(ProvenanceError):
        check_input(out, expected_provenance(other))
    # before: the preprocessed volume went through the other pipeline's chain (windowed twice)


def test_modality_the_run_was_not_trained_on_is_refused(tmp_path):
    mr_cfg = ImageConfig(modality="MR", spacing=(2.0, 2.0, 2.0), intensity=IntensityConfig(kind="zscore"))
    _, man = _pre(tmp_path, mr_cfg, [mr_brain_nifti(tmp_path / "a.nii.gz")])
    out = str(tmp_path / "pre" / man["image"][0])
    assert read_provenance(out)["modality"] == "MR"
    run_state = {**expected_provenance(mr_cfg), "modality": "CT"}  # same pipeline, a CT run
    with pytest.raises(ProvenanceError, match="a MR volume, but this run was trained on CT"):
        ImageLoader(mr_cfg, run_state=run_state).load(out)


def test_percentile_stats_fitted_on_training_cases_only(tmp_path):
    cfg = dataclasses.replace(ImageConfig(modality="MR", spacing=(2.0, 2.0, 2.0)),
                              intensity=IntensityConfig(kind="percentile"))
    srcs = [mr_brain_nifti(tmp_path / f"{i}.nii.gz", scale=s) for i, s in enumerate((1.0, 1.2, 50.0))]
    _, man = _pre(tmp_path, cfg, srcs, split=["train", "train", "test"])
    state = __import__("json").loads((tmp_path / "pre" / "preprocess_state.json").read_text())
    stats = state["intensity_stats"]
    assert stats["n_cases"] == 2  # the test case (50x brighter) did not take part
    _, man2 = _pre(tmp_path, cfg, srcs[:2], name="pre2", split=["train", "train"])
    stats2 = __import__("json").loads((tmp_path / "pre2" / "preprocess_state.json").read_text())["intensity_stats"]
    assert stats2 == stats
    # the statistics travel in every volume and into the run state
    loader = ImageLoader(cfg)
    pre_arr, _ = loader.load(str(tmp_path / "pre" / man["image"][0]))
    assert loader.stats == stats
    from mmai.data.provenance import run_image_state

    run_state = run_image_state(cfg, loader)
    assert run_state["intensity_stats"] == stats
    # a raw input read by a fresh loader (nothing preprocessed read first) uses the run's statistics
    with pytest.raises(PreprocessError, match="needs statistics fitted on the training cases"):
        ImageLoader(cfg).load(str(srcs[0]))
    raw_arr, _ = ImageLoader(cfg, run_state=json.loads(json.dumps(run_state))).load(str(srcs[0]))
    assert np.allclose(raw_arr, pre_arr, atol=1e-4)


def test_dataset_items_carry_the_affine(tmp_path):
    cfg = _ct_cfg()
    _, man = _pre(tmp_path, cfg, [ct_series(tmp_path / "ct")])
    path = str(tmp_path / "pre" / man["image"][0])
    ds = MultimodalDataset(["a", "b"], image_paths=[path, None], image_cfg=cfg)
    item, missing = ds[0], ds[1]
    aff = item["affine"]
    assert aff.shape == (4, 4) and str(aff.dtype) == "torch.float32"
    assert np.allclose(np.abs(np.diag(aff.numpy())[:3]), [3.0, 3.0, 5.0])
    import nibabel as nib

    from mmai.data.provenance import read_provenance as rp

    assert np.allclose(aff.numpy(), nib.load(path).affine, atol=1e-4) and rp(path) is not None
    assert missing["image"].shape == item["image"].shape and missing["image_present"] == 0
