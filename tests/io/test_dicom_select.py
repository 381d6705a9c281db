"""Selection rules: every key, AND/OR, tie-breaking, and errors that list the candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mmai.errors import ConfigError, SeriesSelectionError
from mmai.io.dicom_scan import SeriesStack, scan_stacks, scan_tree
from mmai.io.dicom_select import SelectionRule, filter_stacks, group_by_study, select_one


def row(**kw: Any) -> dict[str, Any]:
    base = {"kind": "image", "modality": "CT", "series_description": "CHEST 1.0 B31f", "orientation": "axial",
            "n_instances": 120, "slice_thickness": 1.0, "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
            "problems": "", "is_localizer": False, "phase_index": 0, "series_number": 3,
            "study_uid": "1.2.3", "stack_id": "s0001", "path": "/x"}
    base.update(kw)
    return base


def stack(**kw: Any) -> SeriesStack:
    return SeriesStack(files=[], row=row(**kw), frames=None)


def rule(d: dict[str, Any]) -> SelectionRule:
    return SelectionRule.from_dict(d, "test.yaml: image.select")


def test_example_rule_from_yaml() -> None:
    text = """select: {modality: CT, description: "(?i)chest|thorax", orientation: axial, min_slices: 40,
                       thickness: [0.5, 3.0], exclude_image_type: [LOCALIZER]}"""
    r = rule(yaml.safe_load(text)["select"])
    assert r.matches(row())
    assert not r.matches(row(series_description="ABDOMEN"))
    assert r.matches(row(series_description="Thorax routine"))


@pytest.mark.parametrize(("d", "good", "bad"), [
    ({"modality": "MR"}, {"modality": "MR"}, {"modality": "CT"}),
    ({"modality": ["MR", "CT"]}, {"modality": "CT"}, {"modality": "PT"}),
    ({"description": "chest"}, {"series_description": "my CHEST scan"}, {"series_description": "head"}),
    ({"exclude_description": "mip|scout"}, {"series_description": "chest"}, {"series_description": "Chest MIP"}),
    ({"orientation": "coronal"}, {"orientation": "coronal"}, {"orientation": "axial"}),
    ({"orientation": ["axial", "oblique"]}, {"orientation": "oblique"}, {"orientation": "sagittal"}),
    ({"min_slices": 40}, {"n_instances": 40}, {"n_instances": 39}),
    ({"max_slices": 40}, {"n_instances": 40}, {"n_instances": 41}),
    ({"thickness": [0.5, 3]}, {"slice_thickness": 3.0}, {"slice_thickness": 5.0}),
    ({"thickness": [0.5, 3]}, {"slice_thickness": 0.5}, {"slice_thickness": None}),
    ({"image_type": ["ORIGINAL", "PRIMARY"]}, {}, {"image_type": "DERIVED\\SECONDARY"}),
    ({"exclude_image_type": ["MPR"]}, {}, {"image_type": "DERIVED\\SECONDARY\\MPR"}),
    ({"exclude_problems": ["missing slices"]}, {"problems": "uneven spacing"}, {"problems": "missing slices"}),
    ({"phase": 2}, {"phase_index": 2}, {"phase_index": 1}),
    ({"phase": 1}, {"phase_index": 0}, {"phase_index": 2}),
    ({"localizer": True}, {"is_localizer": True}, {"is_localizer": False}),
    ({}, {}, {"is_localizer": True}),
    ({}, {}, {"kind": "non-image"}),
])
def test_each_rule_kind(d: dict[str, Any], good: dict[str, Any], bad: dict[str, Any]) -> None:
    r = rule(d)
    assert r.matches(row(**good)), r.why_not(row(**good))
    assert not r.matches(row(**bad))
    assert r.why_not(row(**bad))


def test_any_is_or_all_is_and() -> None:
    r = rule({"any": [{"description": "chest"}, {"description": "thorax"}]})
    assert r.matches(row(series_description="thorax"))
    assert not r.matches(row(series_description="abdomen"))
    assert "none holds" in r.why_not(row(series_description="abdomen"))
    r = rule({"all": [{"modality": "CT"}, {"min_slices": 100}]})
    assert r.matches(row())
    assert not r.matches(row(n_instances=50))
    nested = rule({"modality": "CT", "any": [{"all": [{"orientation": "axial"}, {"thickness": [0, 1.5]}]},
                                            {"orientation": "coronal"}]})
    assert nested.matches(row())
    assert nested.matches(row(orientation="coronal", slice_thickness=5.0))
    assert not nested.matches(row(slice_thickness=5.0))


def test_unknown_key_names_key_allowed_and_source() -> None:
    with pytest.raises(ConfigError) as ei:
        rule({"modality": "CT", "slices_min": 3})
    msg = str(ei.value)
    assert "slices_min" in msg and "min_slices" in msg and "test.yaml: image.select" in msg
    with pytest.raises(ConfigError, match=r"any\[0\].*prefer"):
        rule({"any": [{"prefer": "thinnest"}]})


@pytest.mark.parametrize("d", [
    {"min_slices": "40"}, {"min_slices": True}, {"thickness": [3, 1]}, {"thickness": 2}, {"modality": 3},
    {"orientation": "transverse"}, {"description": "("}, {"any": []}, {"any": {"modality": "CT"}},
    {"prefer": "biggest"}, {"localizer": "yes"}, [1, 2],
])
def test_wrong_types_are_config_errors(d: Any) -> None:
    with pytest.raises(ConfigError, match="test.yaml"):
        rule(d)


def test_select_one_no_match_lists_every_candidate_and_why() -> None:
    cands = [stack(series_description="HEAD", stack_id="s1"), stack(n_instances=10, stack_id="s2"),
             stack(is_localizer=True, problems="localizer", stack_id="s3")]
    with pytest.raises(SeriesSelectionError) as ei:
        select_one(cands, rule({"description": "chest", "min_slices": 40}), "case-007")
    msg = str(ei.value)
    assert "case-007" in msg and "3 candidate(s)" in msg
    assert "'HEAD'" in msg and "does not match 'chest'" in msg
    assert "10 slices < min_slices 40" in msg
    assert "localizer" in msg and "problems: localizer" in msg


def test_select_one_tie_is_an_error_then_prefer_resolves() -> None:
    thin = stack(slice_thickness=1.0, n_instances=300, stack_id="thin")
    thick = stack(slice_thickness=5.0, n_instances=60, stack_id="thick")
    with pytest.raises(SeriesSelectionError) as ei:
        select_one([thin, thick], rule({"modality": "CT"}), "case-1")
    assert "2 series match" in str(ei.value) and "thin" in str(ei.value) and "prefer" in str(ei.value)
    assert select_one([thin, thick], rule({"prefer": "thinnest"}), "c").row["stack_id"] == "thin"
    assert select_one([thin, thick], rule({"prefer": "thickest"}), "c").row["stack_id"] == "thick"
    assert select_one([thin, thick], rule({"prefer": ["fewest_slices"]}), "c").row["stack_id"] == "thick"
    same = stack(slice_thickness=1.0, n_instances=300, stack_id="same")
    with pytest.raises(SeriesSelectionError, match="left a tie"):
        select_one([thin, same], rule({"prefer": ["thinnest", "most_slices"]}), "c")


def test_rows_from_an_index_csv_work(tmp_path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame([row(), row(slice_thickness=None, series_description=None)])
    df.to_csv(tmp_path / "i.csv", index=False)
    back = pd.read_csv(tmp_path / "i.csv")
    r = rule({"thickness": [0.5, 2], "description": "chest"})
    assert [r.matches(x) for _, x in back.iterrows()] == [True, False]


def test_group_by_study_and_scan_integration(tmp_path: Path) -> None:
    from pydicom.uid import generate_uid

    from tests.io.test_dicom_scan import make_series

    s1, s2 = generate_uid(), generate_uid()
    make_series(tmp_path / "a1", k=12, study_uid=s1, series_number=1, series_description="Chest 1mm")
    make_series(tmp_path / "a2", k=5, study_uid=s1, series_number=2, series_description="Chest 5mm")
    make_series(tmp_path / "b1", k=12, study_uid=s2, series_number=1, series_description="Head")
    stacks = scan_stacks(tmp_path)
    studies = group_by_study(stacks)
    assert sorted(len(v) for v in studies.values()) == [1, 2]
    r = rule({"description": "chest", "min_slices": 10})
    assert select_one(studies[s1], r, "study-1").row["n_instances"] == 12
    with pytest.raises(SeriesSelectionError, match="Head"):
        select_one(studies[s2], r, "study-2")
    assert len(filter_stacks(stacks, rule({"modality": "CT"}))) == 3
    df = scan_tree(tmp_path)  # DataFrame rows (nullable Int64 columns) work as rows too
    assert [r.matches(x) for _, x in df.iterrows()].count(True) == 1
