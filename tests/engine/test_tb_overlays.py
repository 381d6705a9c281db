"""TensorBoard image summaries of validation overlays: written during training for a few fixed
validation cases, cheap (no parameter gradient touched), and off without TensorBoard."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmai.engine.runlog import RunLog
from mmai.engine.trainer import train_from_files
from mmai.figures import tensorboard as tbi


def test_overlays_are_written_to_tensorboard_during_training(cohort, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, pipe, manifest = cohort
    out = tmp_path / "r"
    train_from_files(pipe, manifest, out, fusion="cross_attention", epochs=1, device="cpu", progress=False)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["images"] if t.startswith("val_overlay/")]
    assert len(tags) == tbi.N_CASES
    (event,) = acc.Images(tags[0])
    assert event.step == 1 and event.width > 300 and event.height > 150


def test_overlay_of_a_validation_case_touches_no_parameter_gradient():
    from mmai.clinical.preprocess import FeatureSpec
    from mmai.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("cross_attention", n_outputs=1, feature_specs=[FeatureSpec("age", "numeric")],
                         widths=(4, 8, 8, 16), dim=16, heads=2).train()
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    items = [{"case_id": f"v{i}", "image": torch.rand(1, 24, 24, 16), "image_present": torch.tensor(float(i > 0)),
              "affine": affine, "clinical": torch.ones(1), "clinical_mask": torch.ones(1),
              "target": torch.tensor(1.0)} for i in range(4)]
    eng = SimpleNamespace(val_loader=SimpleNamespace(dataset=items), eval_model=model, kind="binary",
                          classes=["no", "yes"], device="cpu")
    images = tbi.validation_overlays(eng, epoch=5)
    assert list(images) == ["val_overlay/v1", "val_overlay/v2"]  # v0 has no image: skipped
    rgb = images["val_overlay/v1"]
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 10
    assert all(p.grad is None for p in model.parameters()) and model.training  # mode restored
    assert [tbi.due(e) for e in range(1, 11)] == [True, False, False, False, True, False, False, False, False, True]


def test_no_tensorboard_no_overlay_work(tmp_path):
    calls = []
    log = RunLog(tmp_path / "log.jsonl", tensorboard=False)
    log.start(0, 1)
    log.write_images(1, lambda: calls.append(1) or {})
    assert calls == [] and not (tmp_path / "tensorboard").exists()
