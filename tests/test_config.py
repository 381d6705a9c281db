"""Pipeline YAML -> config: every error names the key, the file and the allowed values."""

from pathlib import Path

import pytest

from mmai.config import config_from_dict, dump_config, load_config
from mmai.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml")))
def test_shipped_pipelines_load(name):
    cfg = load_config(ROOT / "pipelines" / name)
    assert cfg.task.kind in ("binary", "multiclass", "regression", "survival")


def test_demo_pipeline_values():
    cfg = load_config(ROOT / "pipelines" / "demo.yaml")
    assert cfg.image.size == (32, 32, 24)
    assert cfg.image.spacing == (9.0, 9.0, 9.0)
    assert cfg.model.fusion == "cross_attention"
    assert [c.name for c in cfg.clinical.columns] == ["age", "crp", "bmi", "sex", "smoking", "diabetes"]


def test_roundtrip(tmp_path):
    cfg = load_config(ROOT / "pipelines" / "demo.yaml")
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text, needles", [
    ("image:\n  sise: [1, 2, 3]\n", ["image.sise", "pipe.yaml", "allowed keys", "size"]),
    ("foo: 1\n", ["unknown top-level key 'foo'", "task"]),
    ("train:\n  epochs: three\n", ["train.epochs", "integer", "three"]),
    ("train:\n  lr: true\n", ["train.lr", "number"]),
    ("task:\n  kind: bin\n", ["task.kind", "'bin'", "binary", "survival"]),
    ("image:\n  size: [1, 2]\n", ["image.size", "3 entries"]),
    ("image:\n  intensity: {kind: clip}\n", ["image.intensity.kind", "window"]),
    ("model:\n  fusion: magic\n", ["model.fusion", "magic", "cross_attention"]),
    ("model:\n  dim: 30\n  heads: 4\n", ["divisible"]),
    ("train:\n  epochs: 0\n", ["train.epochs", "> 0"]),
    ("image:\n  augment: {flip: yes, wobble: 1}\n", ["image.augment.wobble"]),
    ("- a\n- b\n", ["top level must be a mapping"]),
    ("task: [unclosed\n", ["not valid YAML"]),
])
def test_errors_name_key_and_file(tmp_path, text, needles):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_no_code_execution(tmp_path):
    # PyYAML's unsafe tags must be rejected by safe_load, never executed
    p = write(tmp_path, "task: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_image_null_is_clinical_only():
    cfg = config_from_dict({"task": {"kind": "survival"}, "image": None,
                            "clinical": {"numeric": ["age"]}}, "x.yaml")
    assert cfg.image is None and cfg.task.kind == "survival"
