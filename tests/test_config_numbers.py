"""Numeric text in YAML float fields: PyYAML (YAML 1.1) reads ``1e-3`` (no dot) as a string."""

from __future__ import annotations

import pytest
import yaml

from mmai.config import load_config
from mmai.errors import ConfigError


def _write(tmp_path, train: str):
    p = tmp_path / "p.yaml"
    p.write_text(f"task: {{kind: binary, target: label}}\nimage: null\ntrain: {train}\n")
    return p


def test_exponent_without_dot_is_accepted(tmp_path):
    assert isinstance(yaml.safe_load("lr: 1e-3")["lr"], str)  # the failing case of issue 10
    cfg = load_config(_write(tmp_path, "{lr: 1e-3, weight_decay: 5E-2}"))
    assert cfg.train.lr == pytest.approx(0.001) and cfg.train.weight_decay == pytest.approx(0.05)


def test_non_numeric_text_still_fails_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.lr must be a number, got 'fast'"):
        load_config(_write(tmp_path, "{lr: fast}"))


def test_horizons_are_numbers(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("task: {kind: survival, horizons: [12, 2.5e1, '36']}\nimage: null\n")
    assert load_config(p).task.horizons == (12.0, 25.0, 36.0)
