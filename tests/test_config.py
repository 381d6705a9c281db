"""Pipeline YAML -> config: every error names the key, the file and the allowed values."""

import dataclasses
from pathlib import Path

import pytest

from mmai.config import config_from_dict, dump_config, load_config
from mmai.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipe.yaml"
    p.write_text(text)
    return p


def _leaves(tree, prefix=""):
    """(dotted key, value) for every leaf of a parsed YAML mapping (lists are leaves)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml")))
def test_shipped_pipelines_load_every_value_as_written(name):
    """Each value the shipped YAML sets reaches the config unchanged (no key dropped, renamed or
    defaulted), and the config survives dump -> load."""
    import yaml

    path = ROOT / "pipelines" / name
    cfg = load_config(path)
    data = yaml.safe_load(path.read_text())
    plain = cfg.to_dict()
    leaves = [(k, v) for k, v in _leaves({s: v for s, v in data.items() if s != "clinical"})]
    assert leaves, f"{name} sets nothing outside clinical"
    for key, value in leaves:
        got = plain
        for part in key.split("."):
            got = got[part]
        assert got == value, (key, got, value)
    if data.get("clinical"):
        named = {c if isinstance(c, str) else c["name"] for kind in data["clinical"].values()
                 for c in (kind if isinstance(kind, list) else list(kind))}
        assert {c.name for c in cfg.clinical.columns} == named
    assert config_from_dict(plain, name).to_dict() == plain


def test_dicom_section_keys_values_and_errors(tmp_path):
    """image.dicom: defaults equal the loader's GeometryPolicy; values reach the policy; bad
    values name the key and the allowed set."""
    from mmai.config import DicomConfig
    from mmai.io.dicom_geometry import GeometryPolicy, policy_from

    assert dataclasses.asdict(DicomConfig()) == dataclasses.asdict(GeometryPolicy())
    cfg = load_config(write(tmp_path, "image:\n  dicom: {uneven: keep, tilt: resample, spacing_tolerance: 0.02,"
                                      " tilt_tolerance_deg: 0.5, orientation_tolerance: 0.002}\n"))
    pol = policy_from(cfg.image.dicom)
    assert (pol.uneven, pol.tilt, pol.spacing_tolerance, pol.tilt_tolerance_deg, pol.orientation_tolerance) == \
        ("keep", "resample", 0.02, 0.5, 0.002)
    for text, needles in (("uneven: warn", ["image.dicom.uneven", "'warn'", "resample", "keep"]),
                          ("spacing_tolerance: 0.9", ["image.dicom.spacing_tolerance", "0.9", "(0, 0.5)"]),
                          ("tilt_tolerance_deg: -1", ["image.dicom.tilt_tolerance_deg", "-1"]),
                          ("tolerance: 1", ["image.dicom.tolerance", "spacing_tolerance"])):
        with pytest.raises(ConfigError) as exc:
            load_config(write(tmp_path, f"image:\n  dicom: {{{text}}}\n"))
        for needle in needles:
            assert needle in str(exc.value), (needle, str(exc.value))


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
