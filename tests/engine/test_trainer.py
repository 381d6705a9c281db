"""The training loop's settings: AMP choice, LR scheduler state, TensorBoard, accumulation."""

import json
import logging

import pytest
import torch
import yaml

from mmai.config import config_from_dict
from mmai.engine import loop
from mmai.engine.checkpoint import CheckpointStore
from mmai.engine.trainer import train_from_files
from mmai.errors import ConfigError
from tests.engine.conftest import log_rows


@pytest.mark.parametrize(("value", "expected"), [("bf16", "bf16"), ("fp16", "fp16"), ("off", "off"),
                                                 (True, "bf16"), (False, "off")])
def test_amp_setting_accepts_modes_and_old_booleans(value, expected, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = config_from_dict({"train": {"amp": value}}, "p.yaml")
    assert cfg.train.amp == expected
    assert ("deprecated" in caplog.text) == (value is True)


def test_amp_setting_rejects_other_values_and_yaml_off_is_off():
    with pytest.raises(ConfigError, match=r"train.amp = 'fp8'.*\['bf16', 'fp16', 'off'\]"):
        config_from_dict({"train": {"amp": "fp8"}}, "p.yaml")
    assert config_from_dict(yaml.safe_load("train: {amp: off}"), "p.yaml").train.amp == "off"
    assert config_from_dict({}, "p.yaml").train.amp == "off"  # off by default


def test_cli_amp_flag_overrides_the_yaml_and_rejects_other_values(cohort, tmp_path, capsys, one_thread):
    from mmai.cli import main

    _, pipe, manifest = cohort
    base = ["train", "--config", str(pipe), "--manifest", str(manifest), "--fusion", "clinical_only", "--epochs", "1",
            "--device", "cpu", "-q"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--out", str(tmp_path / "a"), "--amp", "fp8"])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--amp", "bf16"]) == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["train"]["amp"] == "bf16"


def test_fp16_on_cpu_is_refused_with_the_alternatives(cohort, tmp_path):
    _, pipe, manifest = cohort
    with pytest.raises(ConfigError, match="fp16 needs CUDA.*bf16 or off"):
        train_from_files(pipe, manifest, tmp_path / "r", fusion="clinical_only", epochs=1, device="cpu",
                         progress=False, amp="fp16")


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_amp_runs_through_the_training_step(cohort, tmp_path, monkeypatch, amp, one_thread):
    _, pipe, manifest = cohort
    seen = []
    real = loop.autocast

    def spy(device, dtype):
        seen.append(dtype)
        return real(device, dtype)

    monkeypatch.setattr(loop, "autocast", spy)
    out = tmp_path / "r"
    # clinical_only: torch 2.13's CPU bf16 conv3d weight gradient reads uninitialised memory when a
    # feature map is smaller than the kernel (this tiny grid ends at 2x2x1); see docs/training.md
    train_from_files(pipe, manifest, out, fusion="clinical_only", epochs=1, device="cpu", progress=False, amp=amp)
    assert seen and set(seen) == {torch.bfloat16 if amp == "bf16" else None}
    rows = log_rows(out)
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["train_loss"]))
    tensors, state = CheckpointStore(out / "ckpt").load()
    assert state["train"]["step"] == state["scheduler"]["last_epoch"] > 0  # optimizer steps were taken
    assert any(k.endswith(".exp_avg") for k in tensors)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["amp"] == amp


def test_lr_schedule_is_a_torch_scheduler_saved_with_the_checkpoint(cohort, tmp_path, one_thread):
    _, pipe, manifest = cohort
    out = tmp_path / "r"
    train_from_files(pipe, manifest, out, fusion="clinical_only", epochs=3, device="cpu", progress=False)
    _, state = CheckpointStore(out / "ckpt").load()
    sched = state["scheduler"]
    steps = state["train"]["step"]
    assert sched["last_epoch"] == steps and sched["base_lrs"] == [1e-3]
    cfg = config_from_dict(yaml.safe_load(pipe.read_text()), "p")
    factor = loop.lr_schedule(cfg.replace(train=cfg.train.__class__(**{**cfg.train.__dict__, "epochs": 3})),
                              steps // 3)
    lrs = [r["lr"] for r in log_rows(out)]
    # the last step of epoch e ran at lr * factor(e * steps_per_epoch - 1); cosine decays to ~0
    assert lrs == pytest.approx([1e-3 * factor(e * (steps // 3) - 1) for e in (1, 2, 3)])
    assert lrs[0] > lrs[1] > lrs[2]


def test_tensorboard_scalars_beside_the_jsonl_log(cohort, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, pipe, manifest = cohort
    out = tmp_path / "r"
    train_from_files(pipe, manifest, out, fusion="clinical_only", epochs=2, device="cpu", progress=False)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "lr"} <= set(tags)
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert losses == pytest.approx([r["train_loss"] for r in log_rows(out)])


def test_gradient_accumulation_takes_one_optimizer_step_per_group(cohort, tmp_path, one_thread):
    _, pipe, manifest = cohort
    cfg = yaml.safe_load(pipe.read_text())
    cfg["train"]["accumulate"] = 2
    p = tmp_path / "acc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "r"
    summary = train_from_files(p, manifest, out, fusion="clinical_only", epochs=2, device="cpu", progress=False)
    batches = -(-summary["n_train"] // cfg["train"]["batch_size"])
    _, state = CheckpointStore(out / "ckpt").load()
    assert state["train"]["step"] == 2 * -(-batches // 2)
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 1
