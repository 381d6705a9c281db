"""A case's prediction never depends on the other cases of its batch: volumes of different
sizes (``image.size: null``) are predicted in groups of one shape, never padded together."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.inference.predictor import Predictor
from mmai.models.registry import create_model

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("crp", "numeric")]


def _stub(images: list[np.ndarray]) -> Predictor:
    torch.manual_seed(0)
    p = object.__new__(Predictor)  # only what predict_batch uses
    p.model = create_model("cross_attention", n_outputs=1, feature_specs=SPECS, widths=(4, 8, 8, 16), dim=16, heads=2,
                           windows={"roi_size": [16, 16, 16], "overlap": 0.25, "batch": 2}).eval()
    with torch.no_grad():  # a trained model reads the image (the fused term starts at 0)
        torch.nn.init.normal_(p.model.head.fc.weight, std=0.5)
    p.uses_image, p.device = True, "cpu"
    n = len(images)
    p._clinical = lambda df, errors, pre, ok: (np.ones((n, 2), np.float32), np.ones((n, 2), np.float32), ok)
    p._images = lambda df, ok, errors: (images, [1.0] * n, {i: np.diag([2.0, 2.0, 2.0, 1.0]) for i in range(n)})
    member = SimpleNamespace(clinical=None, predictions=lambda out: out.numpy())  # the raw outputs
    p.members = [(member, p.model)]
    p.spec = SimpleNamespace(rows=lambda ids, values, present, extra: torch.from_numpy(values))
    p.extra_columns, p.descriptors, p.input_flags = (), (), {}
    return p


def test_prediction_does_not_depend_on_batch_neighbours():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(1, 20, 18, 16, generator=g).numpy()
    large = torch.rand(1, 36, 30, 24, generator=g).numpy()
    alone = _stub([small]).predict_batch(pd.DataFrame({"case_id": ["s"]}), [])
    both = _stub([small, large, small]).predict_batch(pd.DataFrame({"case_id": ["s", "l", "s2"]}), [])
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2], alone[0], atol=1e-5, rtol=1e-5)
    assert both.shape == (3, 1)
