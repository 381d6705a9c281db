"""GPU paths (run on a CUDA machine; skipped elsewhere): CUDA preprocessing equals CPU, AMP trains
through the trainer (bf16, and fp16 with a GradScaler)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmai.config import config_from_dict
from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
def test_cuda_preprocessing_matches_cpu(tmp_path):
    from tests.io.dicom_cases import series

    case = series(tmp_path / "s")
    cfg = config_from_dict(yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text()), "demo.yaml").image
    cpu = apply_chain(preprocess_transforms(cfg, device="cpu"), {KEY: str(case.folder)})[KEY]
    gpu = apply_chain(preprocess_transforms(cfg, device="cuda"), {KEY: str(case.folder)})[KEY]
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-4)
    np.testing.assert_allclose(gpu.affine.cpu().numpy(), cpu.affine.numpy(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_through_the_trainer_on_cuda(tmp_path, amp, monkeypatch):
    """``--amp bf16|fp16`` through mmai's training loop: autocast to that dtype in the step,
    a GradScaler for fp16 (its state saved in the checkpoint), optimizer steps taken, finite loss,
    weights that moved."""
    from mmai.cli import main
    from mmai.engine import loop
    from mmai.engine.checkpoint import CheckpointStore

    seen = []
    real = loop.autocast
    monkeypatch.setattr(loop, "autocast", lambda device, dtype: (seen.append((device, dtype)), real(device, dtype))[1])
    cfg = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    cfg["train"].update(epochs=2, batch_size=8, patience=5)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump(cfg))
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "32", "--format", "nifti", "-q"]) == 0
    assert main(["preprocess", "--config", str(pipe), "--input", str(tmp_path / "c" / "manifest.csv"),
                 "--out", str(tmp_path / "pre"), "-q"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--config", str(pipe), "--manifest", str(tmp_path / "pre" / "manifest.csv"), "--out",
                 str(out), "--device", "cuda", "--amp", amp, "-q"]) == 0
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    assert seen and all(d == dtype and dev.startswith("cuda") for dev, d in seen)
    tensors, state = CheckpointStore(out / "ckpt").load()
    assert state["train"]["step"] > 0 and np.isfinite(state["train"]["history"][-1]["train_loss"])
    assert (state["scaler"] is not None) == (amp == "fp16")
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    assert all(torch.isfinite(v.float()).all() for v in model.values())
    adam_steps = [float(v) for k, v in tensors.items() if k.startswith("optim.") and k.endswith(".step")]
    assert adam_steps and max(adam_steps) > 0  # AdamW really stepped (a GradScaler skips inf steps)
    assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if k.endswith(".exp_avg"))
