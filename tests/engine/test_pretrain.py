"""``mmai pretrain``: the loss falls, a killed run resumes to the same result, and the output
loads into ``mmai train`` through ``model.pretrained: DIR`` with a full match report."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmai.cli import main
from mmai.errors import CheckpointError
from mmai.pretrain.ssl import cut_cuboids
from tests.engine.conftest import assert_same_weights, log_rows, metrics, run_cli


def _pretrain_yaml(pipe, tmp_path, **pretrain):
    cfg = yaml.safe_load(pipe.read_text())
    cfg["pretrain"] = {"epochs": 2, "batch_size": 8, "lr": 0.003, "contrastive_weight": 0.5, **pretrain}
    out = tmp_path / "pre.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def test_cuboid_masks_cover_the_asked_fraction():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 24, 24, 16)
    masked, mask = cut_cuboids(x, 0.4, 0.25)
    frac = mask.float().mean(dim=(1, 2, 3, 4))
    assert torch.all(frac >= 0.4) and torch.all(frac < 0.6)
    assert torch.equal(masked[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert not torch.equal(masked[mask.expand_as(x)], x[mask.expand_as(x)])


@pytest.mark.slow
def test_pretrain_lowers_its_loss_resumes_exactly_and_loads_into_train(cohort, tmp_path):
    _, pipe, manifest = cohort
    yml = _pretrain_yaml(pipe, tmp_path, epochs=3)
    args = ["pretrain", "--config", str(yml), "--manifest", str(manifest), "--device", "cpu", "-q"]
    run_cli([*args, "--out", str(tmp_path / "full")])
    full = tmp_path / "full"
    rows = log_rows(full)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss"] < rows[0]["loss"], rows
    assert (full / "plots" / "pretrain_loss.png").stat().st_size > 1000
    meta = json.loads((full / "pretrain.json").read_text())
    assert meta["format"] == "mmai-pretrain" and meta["encoder"] == "resnet" and meta["in_channels"] == 1
    assert meta["widths"] == [4, 8, 8, 16] and meta["n_volumes"] == 48

    # killed right after epoch 2's commit, then resumed: the same weights and log as the uninterrupted run
    killed = run_cli([*args, "--out", str(tmp_path / "k")], kill_after_epoch=2, check=False)
    assert killed.returncode != 0 and not (tmp_path / "k" / "pretrain.json").exists()
    run_cli([*args, "--out", str(tmp_path / "k"), "--resume"])
    assert_same_weights(full / "encoder.safetensors", tmp_path / "k" / "encoder.safetensors")
    assert log_rows(tmp_path / "k") == rows

    # model.pretrained: DIR in mmai train: every encoder tensor arrives, reported in metrics.json
    cfg = yaml.safe_load(pipe.read_text())
    cfg["model"].update(pretrained=str(full), pretrained_lr=0.5)
    cfg["train"].update(epochs=1)
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump(cfg))
    run_cli(["train", "--config", str(train_yaml), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
             "--fusion", "image_only", "--device", "cpu", "-q"])
    rep = metrics(tmp_path / "run")["pretrained"]
    enc = load_file(str(full / "encoder.safetensors"))
    assert rep["format"] == "mmai_pretrain" and rep["n_matched"] == len(enc)
    assert rep["n_missing"] == 0 and rep["n_unexpected"] == 0 and rep["lr_multiplier"] == 0.5
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    conv = "image.encoder.net.layer1.0.conv1.weight"
    assert not torch.equal(trained[conv], enc["net.layer1.0.conv1.weight"])  # fine-tuned at lr x 0.5

    # freeze_pretrained: true: the encoder's weights leave training exactly as pretrained
    cfg["model"].update(freeze_pretrained=True)
    train_yaml.write_text(yaml.safe_dump(cfg))
    run_cli(["train", "--config", str(train_yaml), "--manifest", str(manifest), "--out", str(tmp_path / "frozen"),
             "--fusion", "image_only", "--device", "cpu", "-q"])
    frozen = load_file(str(tmp_path / "frozen" / "model.safetensors"))
    weights_ = [k for k in enc if k.endswith("weight") and enc[k].dim() == 5]
    assert weights_ and all(torch.equal(frozen[f"image.encoder.{k}"], enc[k]) for k in weights_)
    assert metrics(tmp_path / "frozen")["pretrained"]["frozen"] is True


def test_pretrain_output_of_another_encoder_is_refused(cohort, tmp_path):
    from mmai.config import load_config
    from mmai.models.pretrained import apply_pretrained
    from mmai.models.registry import create_model

    _, pipe, _ = cohort
    out = tmp_path / "p"
    out.mkdir()
    (out / "pretrain.json").write_text(json.dumps({"format": "mmai-pretrain", "encoder": "resnet18",
                                                   "widths": [4, 8, 8, 16]}))
    (out / "encoder.safetensors").write_bytes(b"")
    cfg = yaml.safe_load(pipe.read_text())
    cfg["model"]["pretrained"] = str(out)
    yml = tmp_path / "t.yaml"
    yml.write_text(yaml.safe_dump(cfg))
    config = load_config(yml)
    model = create_model("image_only", n_outputs=1, widths=config.model.widths)
    with pytest.raises(CheckpointError, match="'resnet18'.*this run uses 'resnet'"):
        apply_pretrained(model, config)


def test_pretrain_cli_needs_images(cohort, tmp_path, capsys):
    _, pipe, _ = cohort
    (tmp_path / "m.csv").write_text("case_id,image\na,\nb,\n")
    code = main(["pretrain", "--config", str(pipe), "--manifest", str(tmp_path / "m.csv"), "--out",
                 str(tmp_path / "o"), "-q"])
    assert code != 0 and "at least 2 cases with an image" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_pretrains_with_ddp(cohort, tmp_path):
    from tests.engine.test_ddp import _torchrun

    _, pipe, manifest = cohort
    yml = _pretrain_yaml(pipe, tmp_path, epochs=1, batch_size=4)
    out = tmp_path / "ddp"
    _torchrun(["-m", "mmai", "pretrain", "--config", str(yml), "--manifest", str(manifest), "--out", str(out),
               "--device", "cpu", "--threads", "1", "-q"], tmp_path)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["world_size"] == 2 and meta["n_volumes"] == 48
    assert [r["world_size"] for r in log_rows(out)] == [2]
