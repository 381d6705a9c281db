"""Manifest validation: each error names the row, the case and the column."""

import json
from pathlib import Path

import pandas as pd
import pytest

from mmai.config import config_from_dict
from mmai.errors import ClinicalError, ManifestError
from mmai.io.manifest import load_manifest

CFG = config_from_dict({
    "task": {"kind": "binary", "target": "label"},
    "clinical": {"numeric": [{"name": "age", "range": [0, 120]}],
                 "categorical": [{"name": "smoking", "levels": ["never", "current"], "strict": True}]},
}, "test.yaml")


def manifest(tmp_path: Path, rows: list[dict], name: str = "m.csv") -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for r in rows:
        if r.get("image") and not r["image"].startswith("missing"):
            (tmp_path / r["image"]).write_bytes(b"x")
    p = tmp_path / name
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def row(cid="a", image="img/a.nii.gz", age="50", smoking="never", label="1", **kw):
    return {"case_id": cid, "image": image, "age": age, "smoking": smoking, "label": label, **kw}


def test_valid_manifest_resolves_paths_relative_to_manifest(tmp_path):
    p = manifest(tmp_path, [row("a"), row("b", image="img/b.nii.gz", label="0"), row("c", image="")])
    df = load_manifest(p, CFG)
    assert df["image"][0] == str((tmp_path / "img/a.nii.gz").resolve())
    assert df["image"][2] is None  # empty cell = image missing, kept
    assert list(df["patient_id"]) == ["a", "b", "c"]  # defaults to case_id
    assert list(df["label"]) == ["1", "0", "1"]


def test_duplicate_case_id(tmp_path):
    p = manifest(tmp_path, [row("a"), row("b", image="img/b.nii.gz"), row("a", image="img/c.nii.gz")])
    with pytest.raises(ManifestError, match=r"duplicate case_id 'a' on rows \[2, 4\]"):
        load_manifest(p, CFG)


def test_missing_file_names_row_case_and_column(tmp_path):
    p = manifest(tmp_path, [row("a"), row("b", image="missing/b.nii.gz")])
    with pytest.raises(ManifestError) as exc:
        load_manifest(p, CFG)
    msg = str(exc.value)
    assert "row 3 (case_id=b)" in msg and "column 'image'" in msg and "file not found" in msg


def test_unparseable_number(tmp_path):
    p = manifest(tmp_path, [row("a"), row("b", image="img/b.nii.gz", age="fifty")])
    with pytest.raises(ClinicalError) as exc:
        load_manifest(p, CFG)
    assert "age" in str(exc.value) and "fifty" in str(exc.value) and "b" in str(exc.value)


def test_unknown_category_in_strict_column(tmp_path):
    p = manifest(tmp_path, [row("a"), row("b", image="img/b.nii.gz", smoking="sometimes")])
    with pytest.raises(ClinicalError) as exc:
        load_manifest(p, CFG)
    assert "smoking" in str(exc.value) and "sometimes" in str(exc.value)


def test_label_missing(tmp_path):
    p = manifest(tmp_path, [row("a"), row("b", image="img/b.nii.gz", label="")])
    with pytest.raises(ManifestError, match=r"row 3 \(case_id=b\), column 'label': label missing"):
        load_manifest(p, CFG)


def test_label_not_required_for_prediction(tmp_path):
    p = manifest(tmp_path, [row("a", label="")])
    assert len(load_manifest(p, CFG, require_targets=False)) == 1


def test_missing_columns_are_named(tmp_path):
    p = tmp_path / "m.csv"
    pd.DataFrame([{"id": 1}]).to_csv(p, index=False)
    with pytest.raises(ManifestError, match="required column 'case_id'"):
        load_manifest(p, CFG)
    pd.DataFrame([{"case_id": "a", "image": "", "label": 1}]).to_csv(p, index=False)
    with pytest.raises(ManifestError, match=r"clinical column\(s\) \['age', 'smoking'\]"):
        load_manifest(p, CFG)


def test_bad_split_and_survival_targets(tmp_path):
    p = manifest(tmp_path, [row("a", split="training")])
    with pytest.raises(ManifestError, match="'training' is not one of"):
        load_manifest(p, CFG)
    surv = config_from_dict({"task": {"kind": "survival"}, "image": None}, "s.yaml")
    p2 = tmp_path / "s.csv"
    pd.DataFrame([{"case_id": "a", "time": "-1", "event": "1"}, {"case_id": "b", "time": "3", "event": "2"}]
                 ).to_csv(p2, index=False)
    with pytest.raises(ManifestError) as exc:
        load_manifest(p2, surv)
    assert "positive number" in str(exc.value) and "event must be 0" in str(exc.value)


def test_many_problems_are_collected(tmp_path):
    rows = [row(f"c{i}", image=f"missing/{i}.nii.gz") for i in range(15)]
    p = manifest(tmp_path, rows)
    with pytest.raises(ManifestError, match=r"15 problem\(s\)[\s\S]*and 5 more"):
        load_manifest(p, CFG)


def test_parquet_and_decathlon_json(tmp_path):
    manifest(tmp_path, [row("a")])
    pd.DataFrame([row("a")]).to_parquet(tmp_path / "m.parquet")
    assert load_manifest(tmp_path / "m.parquet", CFG)["case_id"][0] == "a"
    (tmp_path / "d.json").write_text(json.dumps({"training": [row("a")]}))
    df = load_manifest(tmp_path / "d.json", CFG)
    assert df["split"][0] == "train"


def test_unknown_format(tmp_path):
    (tmp_path / "m.xlsx").write_bytes(b"")
    with pytest.raises(ManifestError, match="unsupported table type '.xlsx'"):
        load_manifest(tmp_path / "m.xlsx", CFG)
