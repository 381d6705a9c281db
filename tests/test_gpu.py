"""GPU paths (run on a CUDA machine; skipped elsewhere): CUDA preprocessing equals CPU, AMP trains."""

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
def test_amp_forward_backward_on_cuda():
    from mmai.clinical.preprocess import FeatureSpec
    from mmai.models.registry import create_model

    model = create_model("cross_attention", n_outputs=1, feature_specs=[FeatureSpec("a", "numeric")],
                         widths=(8, 16, 32, 64), dim=32, heads=4).cuda()
    x = torch.randn(4, 1, 32, 32, 24, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, torch.ones(4, device="cuda"), torch.randn(4, 1, device="cuda"), torch.ones(4, 1, device="cuda"))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all()
