"""Every numeric config value is range-checked at load, the message naming the key path and what
is allowed (values that used to load and then crash or silently misbehave)."""

from __future__ import annotations

import re

import pytest
import yaml

from mmai.config import load_config
from mmai.errors import ConfigError


def _load(tmp_path, section: str, values: dict):
    base = {"task": {"kind": "binary", "target": "label"}, "image": {"spacing": [2, 2, 2]}}
    base.setdefault(section, {}).update(values)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(base))
    return load_config(p)


@pytest.mark.parametrize("section, values, key", [
    ("model", {"heads": 0}, "model.heads"),  # was: ZeroDivisionError
    ("model", {"encoder": "vit"}, "model.encoder"),
    ("model", {"dropout": 5.0}, "model.dropout"),
    ("model", {"dropout": -0.1}, "model.dropout"),
    ("model", {"image_dropout": 1.0}, "model.image_dropout"),
    ("model", {"widths": [8]}, "model.widths"),
    ("model", {"widths": [8, 16, 0, 32]}, "model.widths"),
    ("model", {"layers": 0}, "model.layers"),
    ("model", {"aux_weight": -1}, "model.aux_weight"),
    ("train", {"ema": -1}, "train.ema"),
    ("train", {"ema": 1.0}, "train.ema"),
    ("train", {"warmup": 2.0}, "train.warmup"),
    ("train", {"weight_decay": -0.1}, "train.weight_decay"),
    ("train", {"patience": 0}, "train.patience"),
    ("train", {"num_workers": -1}, "train.num_workers"),
    ("infer", {"batch_size": 0}, "infer.batch_size"),
    ("task", {"kind": "survival", "horizons": [12, -1]}, "task.horizons[1]"),
    ("image", {"intensity": {"a_min": 400, "a_max": -1000}}, "image.intensity.a_max"),
    ("image", {"intensity": {"b_min": 1, "b_max": 1}}, "image.intensity.b_max"),
])
def test_value_out_of_range_names_the_key(tmp_path, section, values, key):
    with pytest.raises(ConfigError, match=re.escape(key) + r".*(allowed|choose|must)"):
        _load(tmp_path, section, values)


def test_unknown_encoder_lists_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"model.encoder = 'vit' is not allowed; choose one of \['resnet', "
                                          r"'densenet', 'resnet10', 'resnet18', 'resnet34', 'resnet50'\]"):
        _load(tmp_path, "model", {"encoder": "vit"})


def test_edges_of_the_ranges_load(tmp_path):
    cfg = _load(tmp_path, "train", {"ema": 0.0, "warmup": 1.0, "weight_decay": 0.0})
    assert cfg.train.warmup == 1.0
    assert _load(tmp_path, "model", {"encoder": "densenet", "widths": [8]}).model.widths == (8,)


def test_encoder_names_agree_with_the_registry():
    from mmai.models.fusion_names import ENCODER_NAMES
    from mmai.models.image_encoders import ENCODERS

    assert set(ENCODER_NAMES) == set(ENCODERS)
