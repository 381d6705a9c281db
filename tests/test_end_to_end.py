"""A tiny cohort through every verb: synth -> preprocess -> train -> predict -> evaluate -> export."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from mmai.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_pipeline(tmp: Path, **model) -> Path:
    cfg = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    cfg["image"].update(spacing=[12.0, 12.0, 12.0], size=[24, 24, 16], fov={"mode": "crop"})  # cuts 7.5 % of z: logged
    # this world tests the run / predict / export contracts on the clinical columns: no focal inventory
    # (tests/data/test_focal_run.py and tests/inference/test_ensemble.py cover runs that take it)
    cfg["image"]["descriptors"] = False
    cfg["model"].update(widths=[4, 8, 8, 16], dim=16, heads=2, **model)
    cfg["train"].update(epochs=2, batch_size=8, patience=5)
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def tiny_world(tmp: Path) -> Path:
    """synth 24 patients -> TMP/cohort, preprocess -> TMP/pre, train -> TMP/run; the pipeline path."""
    assert main(["synth", "--out", str(tmp / "cohort"), "--n", "24", "--seed", "1", "-q"]) == 0
    # base: none: the explain checks need a model whose output depends on the image; on 24 patients
    # the GLM base term (epoch 0, docs/models.md) is what ships and its saliency is all zero
    pipe = tiny_pipeline(tmp, base="none")
    assert main(["preprocess", "--config", str(pipe), "--input", str(tmp / "cohort" / "manifest.csv"),
                 "--out", str(tmp / "pre"), "--workers", "2", "-q"]) == 0
    assert main(["train", "--config", str(pipe), "--manifest", str(tmp / "pre" / "manifest.csv"),
                 "--out", str(tmp / "run"), "-q"]) == 0
    return pipe


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return tmp, tiny_world(tmp)


def test_preprocess_outputs(world):
    tmp, _ = world
    m = pd.read_csv(tmp / "pre" / "manifest.csv")
    assert len(m) == 24 and m["image"].str.startswith("images/").all()
    assert pd.read_csv(tmp / "pre" / "errors.csv").empty
    img = nib.load(tmp / "pre" / m["image"][0])
    assert img.shape == (24, 24, 16)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [12.0, 12.0, 12.0], atol=1e-4)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    assert data.min() >= 0.0 and data.max() <= 1.0  # window [-1000, 400] HU -> [0, 1]


def test_preprocess_rerun_skips_finished_cases(world):
    tmp, pipe = world
    from mmai.preprocess import run_preprocess

    summary = run_preprocess(config_path=pipe, input_path=tmp / "cohort" / "manifest.csv", out_dir=tmp / "pre",
                             progress=False)
    assert summary.n_skipped == 24 and summary.n_done == 0


def test_run_directory_contract(world):
    tmp, _ = world
    run = tmp / "run"
    for name in ("config.yaml", "model.safetensors", "state.json", "metrics.json", "log.jsonl",
                 "plots/training_curves.png"):
        assert (run / name).exists(), name
    state = json.loads((run / "state.json").read_text())
    assert state["fusion"] == "cross_attention"
    from mmai.clinical.preprocess import STATE_VERSION, ClinicalPreprocessor

    assert state["clinical"]["version"] == STATE_VERSION
    pre = ClinicalPreprocessor.from_state(state["clinical"])  # the fitted preprocessor, reloadable as saved
    assert set(pre.feature_names) == {"age", "crp", "bmi", "sex", "smoking", "diabetes"}
    assert state["target"]["classes"] == ["0", "1"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == 6 and "test" in metrics and "auroc" in metrics["test"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))  # no pickle in a run


def test_predict_evaluate_and_resume(world, capsys):
    tmp, _ = world
    pred = tmp / "pred.csv"
    args = ["predict", "--run", str(tmp / "run"), "--manifest", str(tmp / "pre" / "manifest.csv"),
            "--out", str(pred), "-q"]
    assert main(args) == 0
    df = pd.read_csv(pred)
    assert list(df.columns) == ["case_id", "prob_0", "prob_1", "prediction", "clinical_present", "input_flags",
                                  "model_id"]
    assert (df["clinical_present"] == 1).all()  # every manifest row has clinical values
    assert len(df) == 24 and np.allclose(df["prob_0"] + df["prob_1"], 1.0)
    # resumable: drop half of the rows, re-run, get the same predictions back
    df.iloc[:10].to_csv(pred, index=False)
    assert main(args) == 0
    again = pd.read_csv(pred).sort_values("case_id").reset_index(drop=True)
    np.testing.assert_allclose(again["prob_1"], df.sort_values("case_id")["prob_1"], atol=1e-6)
    # predictions from raw DICOM equal predictions from the preprocessed volumes
    raw = tmp / "pred_raw.csv"
    assert main(["predict", "--run", str(tmp / "run"), "--manifest", str(tmp / "cohort" / "manifest.csv"),
                 "--out", str(raw), "-q"]) == 0
    r = pd.read_csv(raw).sort_values("case_id").reset_index(drop=True)
    np.testing.assert_allclose(r["prob_1"], again["prob_1"], atol=1e-4)
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(pred), "--manifest", str(tmp / "pre" / "manifest.csv"),
                 "--out", str(tmp / "report"), "-q"]) == 0
    assert "auroc" in capsys.readouterr().out.lower()
    assert (tmp / "report" / "report.json").exists()


def test_predict_lists_bad_cases_and_finishes_the_others(world):
    tmp, _ = world
    m = pd.read_csv(tmp / "pre" / "manifest.csv", dtype=str)
    bad = tmp / "pre" / "images" / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    m.loc[3, "image"] = "images/broken.nii.gz"
    m.loc[5, "age"] = "old"
    m.to_csv(tmp / "pre" / "bad.csv", index=False)
    out = tmp / "pred_bad.csv"
    assert main(["predict", "--run", str(tmp / "run"), "--manifest", str(tmp / "pre" / "bad.csv"),
                 "--out", str(out), "-q"]) == 0
    assert len(pd.read_csv(out)) == 22
    err = pd.read_csv(tmp / "pred_bad.errors.csv")
    assert set(err["case_id"]) == {m.loc[3, "case_id"], m.loc[5, "case_id"]}
    assert set(err["stage"]) == {"image", "clinical"}
    assert err["error"].str.contains("broken.nii.gz").any() and err["error"].str.contains("old").any()


def test_explain_and_export(world):
    tmp, _ = world
    out = tmp / "explain"
    assert main(["predict", "--run", str(tmp / "run"), "--manifest", str(tmp / "pre" / "manifest.csv"),
                 "--out", str(tmp / "pred_x.csv"), "--explain", str(out), "--shard", "0/6", "-q"]) == 0
    maps = sorted(out.glob("*_saliency.nii.gz"))
    assert len(maps) == 4  # shard 0 of 6 over 24 cases
    sal = nib.load(maps[0])
    assert sal.shape == (24, 24, 16) and float(np.asarray(sal.dataobj).max()) == pytest.approx(1.0)
    assert sorted(out.glob("*_attention.nii.gz")) and sorted(out.glob("*_overview.png"))
    attr = pd.read_csv(out / "clinical_attributions.csv")
    assert set(attr["feature"]) == {"age", "crp", "bmi", "sex", "smoking", "diabetes"}
    assert (attr.loc[attr["observed"] == 0, "attribution"] == 0).all()
    ts = tmp / "model.ts"
    assert main(["export", "--run", str(tmp / "run"), "--format", "torchscript", "--out", str(ts), "-q"]) == 0
    import torch

    mod = torch.jit.load(str(ts))
    from mmai.inference.predictor import Predictor

    p = Predictor(tmp / "run", device="cpu")
    m = pd.read_csv(tmp / "pre" / "manifest.csv")
    image = torch.from_numpy(p.loader(str(tmp / "pre" / m["image"][0])))[None]  # a real case (1, 1, 24, 24, 16)
    values, mask = p.pre.transform(m.iloc[:1], source="manifest")
    inputs = (image, torch.ones(1), torch.from_numpy(values), torch.from_numpy(mask))
    with torch.no_grad():
        want = torch.sigmoid(p.model(*inputs)[:, 0])
    y = mod(*inputs)
    assert y.shape == (1, 2)
    torch.testing.assert_close(y[:, 1], want, atol=1e-4, rtol=0)  # the export computes what the model does


def test_resume_training_continues_from_checkpoint(world, tmp_path):
    """A run stopped after epoch 2 of 4 (the pointer moved back to epoch 2's commit, the files of
    later commits deleted, as a kill right after epoch 2 leaves them) and resumed ends with the
    weights of the uninterrupted run, tensor for tensor."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from mmai.engine.checkpoint import CheckpointStore

    tmp, pipe = world
    full, cut = tmp_path / "full", tmp_path / "cut"
    base = ["train", "--config", str(pipe), "--manifest", str(tmp / "pre" / "manifest.csv"), "--fusion",
            "clinical_only", "--epochs", "4", "-q"]
    assert main([*base, "--out", str(full)]) == 0
    real_commit = CheckpointStore.commit
    CheckpointStore.commit = lambda self, epoch, tensors, state: (  # keep epoch 2's commit as the last one
        real_commit(self, epoch, tensors, state) if epoch <= 2 else None)
    try:
        assert main([*base, "--out", str(cut)]) == 0
    finally:
        CheckpointStore.commit = real_commit
    for name in ("model.safetensors", "DONE", "metrics.json"):
        (cut / name).unlink()
    assert json.loads((cut / "ckpt" / "latest.json").read_text())["epoch"] == 2
    assert main([*base, "--out", str(cut), "--resume"]) == 0
    a, b = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ta, _ = CheckpointStore(full / "ckpt").load()
    tb, _ = CheckpointStore(cut / "ckpt").load()
    assert all(torch.equal(ta[k], tb[k]) for k in ta if k.startswith("model."))  # the last epoch's weights too
    epochs = [json.loads(line)["epoch"] for line in (cut / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    shutil.rmtree(full)


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmai.cli", "train", "--config", str(tmp_path / "nope.yaml"),
                        "--manifest", "m.csv", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


@pytest.mark.parametrize("verb", ["scan", "convert", "preprocess", "train", "predict", "evaluate",
                                  "clinical-schema", "export", "synth", "demo"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    assert "usage: mmai " + verb in capsys.readouterr().out


def test_predict_from_dicom_root_and_clinical_table(world):
    """DICOM root + clinical table: cases matched by PatientID, named by the table's case_id, and the
    same predictions as from the manifest."""
    tmp, _ = world
    out = tmp / "pred_root.csv"
    assert main(["predict", "--run", str(tmp / "run"), "--dicom-root", str(tmp / "cohort" / "images"),
                 "--clinical", str(tmp / "cohort" / "clinical.csv"), "--out", str(out), "-q"]) == 0
    got = pd.read_csv(out).sort_values("case_id").reset_index(drop=True)
    ref = tmp / "pred_ref.csv"
    assert main(["predict", "--run", str(tmp / "run"), "--manifest", str(tmp / "cohort" / "manifest.csv"),
                 "--out", str(ref), "-q"]) == 0
    want = pd.read_csv(ref).sort_values("case_id").reset_index(drop=True)
    assert list(got["case_id"]) == list(want["case_id"])
    np.testing.assert_allclose(got["prob_1"], want["prob_1"], atol=1e-4)
