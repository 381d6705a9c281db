"""``mmai export``: TorchScript and ONNX compute what the eager model computes, on real-shaped
inputs (a preprocessed case, the run's clinical state), at batch sizes 1 and 3, within 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mmai.inference.export import _Exported
from mmai.inference.predictor import Predictor
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture
from tests.test_cli import run_cli


def _real_inputs(world, batch: int) -> tuple[torch.Tensor, ...]:  # noqa: F811
    """``batch`` preprocessed cases of the cohort: (B, 1, 24, 24, 16) volumes, clinical values and
    masks from the run's state; the second case without its image, the third without clinical."""
    p = Predictor(world.run, device="cpu")
    m = pd.read_csv(world.pre / "manifest.csv").iloc[:batch]
    image = torch.from_numpy(np.stack([p.loader(str(world.pre / f)) for f in m["image"]]))
    values, mask = p.pre.transform(m, source="manifest")
    present = torch.ones(batch)
    if batch > 1:
        present[1] = 0.0
        image[1] = 0.0
    if batch > 2:
        mask[2] = 0.0
    return image, present, torch.from_numpy(values), torch.from_numpy(mask)


def _eager(world, inputs) -> torch.Tensor:  # noqa: F811
    p = Predictor(world.run, device="cpu")
    with torch.no_grad():
        return _Exported(p.model, p.encoding.kind).eval()(*inputs)


def test_torchscript_equals_eager_at_batch_1_and_3(world, tmp_path):  # noqa: F811
    out = tmp_path / "model.ts"
    assert run_cli(["export", "--run", str(world.run), "--format", "torchscript", "--out", str(out), "-q"]) == 0
    mod = torch.jit.load(str(out))
    for batch in (1, 3):
        x = _real_inputs(world, batch)
        assert x[0].shape == (batch, 1, 24, 24, 16)
        got = mod(*x)
        assert got.shape == (batch, 2)
        torch.testing.assert_close(got, _eager(world, x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_equals_eager_at_batch_1_and_3(world, tmp_path):  # noqa: F811
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert run_cli(["export", "--run", str(world.run), "--format", "onnx", "--out", str(out), "-q"]) == 0
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob(".*tmp*"))  # one self-contained file
    sess = ort.InferenceSession(str(out))
    names = [i.name for i in sess.get_inputs()]
    assert names == ["image", "image_present", "clinical", "clinical_mask"]
    for batch in (1, 3):
        x = _real_inputs(world, batch)
        (got,) = sess.run(None, {n: t.numpy() for n, t in zip(names, x, strict=True)})
        np.testing.assert_allclose(got, _eager(world, x).numpy(), atol=1e-4, rtol=0)


def test_windowed_models_are_refused_not_exported_wrong():
    from mmai.clinical.preprocess import FeatureSpec
    from mmai.errors import MmaiError
    from mmai.inference.export import check_exportable
    from mmai.models.registry import create_model

    specs = [FeatureSpec("age", "numeric")]
    kw = dict(n_outputs=1, feature_specs=specs, widths=(4, 8, 8, 16), dim=16, heads=2)
    check_exportable(create_model("cross_attention", **kw), Path("run"))  # one pass: exportable
    with pytest.raises(MmaiError, match="affine"):
        check_exportable(create_model("cross_attention", windows={"roi_size": [16, 16, 16]}, **kw), Path("run"))
