"""Self-configuring defaults: the fingerprint, each rule for small and large cohorts, written
values winning, the resolved config.yaml reproducing a run, selection on the validation loss for
small validation sets and the spread over folds in metrics.json."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from mmai.config import config_from_dict, load_config
from mmai.engine.autoconfig import autoconfigure, resolve_image, resolve_select_metric
from mmai.engine.fingerprint import fingerprint
from mmai.engine.run import train
from mmai.io.manifest import validate_manifest
from mmai.synth import SynthSpec, sample_cohort

CLINICAL = {"numeric": ["age", "crp", "bmi"], "categorical": ["sex", "smoking"], "binary": ["diabetes"]}


def clinical_frame(n: int, seed: int = 0, test_fraction: float = 0.0) -> pd.DataFrame:
    df = sample_cohort(SynthSpec(n=n, seed=seed, missing_rate=0.0)).drop(columns=["true_probability"])
    df["split"] = None
    df.loc[df.index[: int(round(test_fraction * n))], "split"] = "test"
    return df


def clinical_config(**sections):
    raw = {"task": {"kind": "binary", "target": "label"}, "clinical": CLINICAL, "image": None,
           "model": {"fusion": "clinical_only"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(raw.get(k), dict) else v
    return config_from_dict(raw, "test")


def image_config(n: int, **sections):
    """A lesion-box image config (fusion cross_attention) on a frame without readable images."""
    raw = {"task": {"kind": "binary"}, "clinical": CLINICAL, "image": {"roi": {"mask": "lesion_mask"}}}
    raw.update(sections)
    cfg = config_from_dict(raw, "test")
    df = clinical_frame(n)
    df["image"] = None
    df["lesion_mask"] = None
    return cfg, df


def choices(record):
    return {c["key"]: c["value"] for c in record["choices"]}


# ----------------------------------------------------------------------------- config


def test_config_remembers_written_keys_and_round_trips():
    cfg = config_from_dict({"task": {"kind": "binary"}, "image": {"roi": {"mask": "m"}, "augment": {"flip": True}},
                            "train": {"epochs": 3}}, "t")
    assert {"train.epochs", "image.roi.mask", "image.augment.flip"} <= cfg.explicit
    assert cfg.is_explicit("train.epochs") and not cfg.is_explicit("train.batch_size")
    assert not cfg.is_explicit("image.roi.size_mm") and not cfg.is_explicit("image.augment.rotate90")
    assert cfg.is_explicit("image.augment")  # a section with something written in it
    assert config_from_dict({"image": None}).is_explicit("image.roi.size_mm")  # a value written above it
    again = config_from_dict(cfg.to_dict(), "t")
    assert again == cfg and "explicit" not in cfg.to_dict()
    assert again.is_explicit("train.batch_size")  # a resolved config.yaml writes every key
    assert cfg.mark_explicit("train.folds").is_explicit("train.folds")


# ----------------------------------------------------------------------------- fingerprint


def _write_case(folder: Path, i: int, half_sides: tuple[int, int, int]) -> tuple[str, str]:
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    vol = np.zeros((20, 22, 12), np.float32)
    mask = np.zeros((20, 22, 12), np.uint8)
    a, b, c = half_sides
    mask[10 - a:10 + a, 10 - b:10 + b, 6 - c:6 + c] = 1
    img, msk = folder / f"img{i}.nii.gz", folder / f"mask{i}.nii.gz"
    nib.save(nib.Nifti1Image(vol, aff), str(img))
    nib.save(nib.Nifti1Image(mask, aff), str(msk))
    return str(img), f"mask{i}.nii.gz"  # masks relative to the manifest folder


def lesion_cohort(tmp_path: Path, n: int = 10) -> pd.DataFrame:
    rows = []
    for i in range(n):
        # extents: x 2*(1 + i % 3) mm, y 4 mm, z 2*2*1 = 4 mm -> longest side 4, 4, 6 mm ...
        img, msk = _write_case(tmp_path, i, (1 + i % 3, 2, 1))
        rows.append({"case_id": f"c{i}", "patient_id": f"p{i}", "image": img, "lesion_mask": msk,
                     "label": i % 2, "age": 50 + i, "crp": 3.0, "bmi": 25.0, "sex": "F", "smoking": "never",
                     "diabetes": 0})
    return pd.DataFrame(rows)


def test_fingerprint_of_a_small_cohort(tmp_path):
    df = lesion_cohort(tmp_path)
    df.loc[:2, "label"] = 1  # rows 0 and 2 become positive: 7 positives, 3 negatives
    cfg = config_from_dict({"task": {"kind": "binary"}, "clinical": CLINICAL,
                            "image": {"roi": {"mask": "lesion_mask"}}}, "t")
    fp = fingerprint(cfg, df, base_dir=tmp_path)
    assert fp.n_train == 10 and fp.n_patients == 10
    assert fp.class_counts == {"0": 3, "1": 7} and fp.n_minority == 3
    assert fp.image["shape_median"] == [20, 22, 12] and fp.image["spacing_median_mm"] == [1.0, 1.0, 2.0]
    assert fp.image["preprocessed"] is False
    extents = [max(2 * (1 + i % 3), 4) for i in range(10)]  # x side vs 4 mm (y, z)
    assert fp.lesion["n_masks"] == 10
    assert fp.lesion["extent_mm_median"] == pytest.approx(np.median(extents))
    assert fp.lesion["extent_mm_p95"] == pytest.approx(np.percentile(extents, 95))
    surv = fingerprint(config_from_dict({"task": {"kind": "survival"}, "image": None}, "t"),
                       pd.DataFrame({"patient_id": ["a", "b", "c"], "time": [1, 2, 3], "event": [1, 0, 1]}))
    assert surv.n_events == 2 and surv.class_counts is None and surv.image is None


def test_lesion_box_from_masks_and_back_from_preprocessed_volumes(tmp_path):
    df = lesion_cohort(tmp_path)
    cfg = config_from_dict({"task": {"kind": "binary"}, "image": {"roi": {"mask": "lesion_mask"}}}, "t")
    p95 = float(np.percentile([max(2 * (1 + i % 3), 4) for i in range(10)], 95))  # 6 mm
    resolved, made = resolve_image(cfg, df, base_dir=tmp_path)
    box = 1.5 * p95  # 9 mm -> 16 voxels of 0.5625 -> 0.75 mm -> 12 mm
    assert resolved.image.spacing == (0.75, 0.75, 0.75)
    assert resolved.image.roi.size_mm == (12.0, 12.0, 12.0) and box <= 12.0
    assert {c.key for c in made} == {"image.spacing", "image.roi.size_mm"}
    # written spacing wins; the box becomes a whole number of those voxels
    written = config_from_dict({"image": {"spacing": [2, 2, 3], "roi": {"mask": "lesion_mask"}}}, "t")
    res2, _ = resolve_image(written, df, base_dir=tmp_path)
    assert res2.image.spacing == (2.0, 2.0, 3.0) and res2.image.roi.size_mm == (10.0, 10.0, 9.0)
    # a box of volumes cut by `mmai preprocess` is read back, so the pipeline id stays theirs
    from mmai.data.dataset import save_preprocessed

    pre = tmp_path / "pre.nii.gz"
    vol = np.zeros((2, 16, 16, 16), np.float32)  # what preprocessing cut: 16 voxels of 0.75 mm
    import torch
    from monai.data import MetaTensor

    save_preprocessed(MetaTensor(torch.as_tensor(vol), affine=torch.diag(torch.tensor([0.75, 0.75, 0.75, 1.0]))),
                      pre, resolved.image)
    dfp = df.assign(image=str(pre))
    res3, rec = autoconfigure(cfg, dfp)
    assert res3.image.spacing == (0.75, 0.75, 0.75) and res3.image.roi.size_mm == (12.0, 12.0, 12.0)
    from mmai.transforms.pipelines import image_pipeline_id

    assert image_pipeline_id(res3.image) == image_pipeline_id(resolved.image)
    assert choices(rec)["image.augment"]["flip"] and choices(rec)["image.augment"]["rotate90"]


# ----------------------------------------------------------------------------- rules


def test_rules_for_small_and_large_cohorts():
    small_cfg, small_df = image_config(100)
    large_cfg, large_df = image_config(3000)
    small, rs = autoconfigure(small_cfg, small_df)
    large, rl = autoconfigure(large_cfg, large_df)
    t_s, t_l = small.train, large.train
    assert rs["fingerprint"]["n_train"] < 100 and rl["fingerprint"]["n_train"] > 2000
    assert t_s.val_fraction == 0.25 and t_l.val_fraction == 0.15  # >= ~40 validation cases
    assert t_s.batch_size in (7, 8, 9) and t_l.batch_size in (15, 16, 17)
    n_s = rs["fingerprint"]["n_train"]
    steps = -(-n_s // t_s.batch_size)
    assert t_s.epochs == max(20, -(-600 // steps)) and t_s.epochs > 50  # ~600 optimisation steps
    assert t_l.epochs == 20  # at least 20 epochs
    for t, rec in ((t_s, rs), (t_l, rl)):
        n = rec["fingerprint"]["n_train"]
        total = t.epochs * -(-n // t.batch_size)
        assert 1 / (1 - t.ema) == pytest.approx(max(10, round(total / 6)), rel=0.02)  # EMA horizon in steps
        assert t.patience == max(15, -(-t.epochs // 3))
        assert n % t.batch_size != 1
    assert small.model.widths == (8, 16, 32, 64) and large.model.widths == (16, 32, 64, 128)
    assert small.model.dropout == 0.0
    assert all(c["reason"] for c in rs["choices"])


def test_batch_size_never_leaves_one_case():
    from mmai.data.splits import make_splits
    from mmai.engine.autoconfig import _batch_size

    for n in range(2, 800):
        bs = _batch_size(8, [n, n + 9])  # every split (folds + final) at once
        assert n % _batch_size(16, [n]) != 1 and n % bs != 1 and (n + 9) % bs != 1
    cfg = clinical_config()
    for n in range(280, 330):  # a cohort whose training split is 16 k + 1 cases
        df = clinical_frame(n, seed=n)
        if len(make_splits(df, kind="binary", val_fraction=0.15)[0].train) % 16 == 1:
            break
    resolved, rec = autoconfigure(cfg, df)
    assert rec["fingerprint"]["n_train"] % 16 == 1 and resolved.train.batch_size in (15, 17)


def test_written_values_win():
    written = {"train": {"epochs": 3, "batch_size": 5, "ema": 0.0, "val_fraction": 0.3, "patience": 2,
                         "weight_decay": 0.001},
               "model": {"widths": [4, 8, 8, 16], "dropout": 0.2},
               "image": {"roi": {"mask": "lesion_mask", "size_mm": [30, 30, 30]}, "spacing": [3, 3, 3],
                         "augment": {"noise_std": 0.1}}}
    cfg, df = image_config(100, **written)
    resolved, rec = autoconfigure(cfg, df)
    assert resolved == cfg  # nothing changed
    assert rec["choices"] == []
    assert {"train.epochs", "train.batch_size", "train.ema", "train.val_fraction", "model.widths",
            "image.augment"} <= set(rec["kept"])
    # a command-line override counts as written
    from mmai.engine.run import apply_overrides

    auto, _ = autoconfigure(apply_overrides(clinical_config(), epochs=4), clinical_frame(100))
    assert auto.train.epochs == 4


def test_select_on_loss_for_small_validation_sets():
    assert resolve_select_metric("binary", "auto", 40, 15)[0] == "loss"
    assert resolve_select_metric("binary", "auto", 150, 20)[0] == "loss"  # few positives
    assert resolve_select_metric("binary", "auto", 150, 60)[0] == "metric"
    assert resolve_select_metric("survival", "auto", 300, 25)[0] == "loss"
    assert resolve_select_metric("survival", "auto", 300, 80)[0] == "metric"
    assert resolve_select_metric("regression", "auto", 500, None)[0] == "loss"
    assert resolve_select_metric("binary", "loss", 500, 200)[0] == "loss"


# ----------------------------------------------------------------------------- runs


def _manifest(tmp_path: Path, n: int, cfg) -> pd.DataFrame:
    return validate_manifest(clinical_frame(n, seed=2, test_fraction=0.2), cfg, base_dir=tmp_path, source="m")


def test_resolved_config_reproduces_the_run(tmp_path):
    cfg = clinical_config(train={"epochs": 3})  # the rest automatic
    df = _manifest(tmp_path, 120, cfg)
    m1 = train(cfg, df, tmp_path / "a", device="cpu", progress=False)
    assert m1["selection"]["on"] == "val_loss"  # 19 validation cases
    assert m1["autoconfig"]["choices"] and "train.epochs" in m1["autoconfig"]["kept"]
    state = json.loads((tmp_path / "a" / "state.json").read_text())
    assert state["autoconfig"] == json.loads((tmp_path / "a" / "metrics.json").read_text())["autoconfig"]
    resolved = load_config(tmp_path / "a" / "config.yaml")
    assert resolved.train.batch_size == choices(m1["autoconfig"])["train.batch_size"]
    again, rec = autoconfigure(resolved, df)
    assert rec["choices"] == [] and again == resolved  # every key of config.yaml counts as written
    m2 = train(resolved, df, tmp_path / "b", device="cpu", progress=False)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert m2["test"]["auroc"] == m1["test"]["auroc"]
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text()) == \
        yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())


def test_fold_spread_in_metrics(tmp_path):
    cfg = clinical_config(train={"epochs": 2, "folds": 2})
    df = _manifest(tmp_path, 60, cfg)
    train(cfg, df, tmp_path / "cv", device="cpu", progress=False)
    cv = json.loads((tmp_path / "cv" / "metrics.json").read_text())["cv"]
    per_fold = [json.loads((tmp_path / "cv" / "folds" / f"fold{k}" / "metrics.json").read_text()) for k in (0, 1)]
    for part in ("val", "test"):
        auroc = cv["spread"][part]["auroc"]
        want = [m[part]["auroc"] for m in per_fold]
        assert auroc["folds"] == pytest.approx(want)
        assert auroc["mean"] == pytest.approx(np.mean(want))
        assert auroc["sd"] == pytest.approx(np.std(want, ddof=1))
    assert "brier" in cv["spread"]["val"] and "loss" in cv["spread"]["val"]


def test_preprocess_cuts_the_automatic_box(tmp_path):
    """`mmai preprocess` sizes a box the YAML leaves out from the training masks (test rows'
    masks ignored); training reads the same box back from the volumes."""
    from mmai.io.manifest import validate_manifest as validate
    from mmai.preprocess import preprocess_frame

    df = lesion_cohort(tmp_path, n=6)
    huge = tmp_path / "huge.nii.gz"  # a test case's mask may not size the box
    nib.save(nib.Nifti1Image(np.ones((20, 22, 12), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), str(huge))
    df["split"] = ["train"] * 5 + ["test"]
    df.loc[5, "lesion_mask"] = str(huge)
    cfg = config_from_dict({"task": {"kind": "binary"}, "clinical": CLINICAL,
                            "image": {"roi": {"mask": "lesion_mask"}}}, "t")
    frame = validate(df, cfg, base_dir=tmp_path, source="m", require_targets=False)
    summary = preprocess_frame(frame, cfg, tmp_path / "pre", progress=False, base_dir=tmp_path)
    assert summary.n_failed == 0
    out = pd.read_csv(tmp_path / "pre" / "manifest.csv")
    img = nib.load(str(tmp_path / "pre" / out["image"][0]))
    p95 = float(np.percentile([max(2 * (1 + i % 3), 4) for i in range(5)], 95))
    s = np.ceil(1.5 * p95 / 16 / 0.25) * 0.25
    assert img.shape[:3] == (16, 16, 16) and np.allclose(img.header.get_zooms()[:3], s)
    out["image"] = [str(tmp_path / "pre" / p) for p in out["image"]]
    resolved, _ = autoconfigure(cfg, validate(out, cfg, base_dir=tmp_path, source="pre"))
    from mmai.data.provenance import check_input, expected_provenance

    check_input(out["image"][0], expected_provenance(resolved.image))  # same pipeline id
