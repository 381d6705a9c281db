"""The typed clinical schema: YAML parsing, validation messages, proposals and `mmai clinical-schema`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from mmai.cli import main
from mmai.clinical.propose import propose_schema, propose_schema_from_file
from mmai.clinical.schema import (
    ClinicalColumn,
    ClinicalSchema,
    normalize_level,
)
from mmai.errors import ClinicalError, ConfigError, ManifestError

CONTRACT = """
clinical:
  numeric: [age, {name: creatinine, log: true, range: [0, 20], unit: mg/dL}]
  categorical: [sex, smoking]
  binary: [diabetes]
  ordinal: {grade: [I, II, III]}
"""


def contract_schema() -> ClinicalSchema:
    return ClinicalSchema.from_dict(yaml.safe_load(CONTRACT)["clinical"], "pipe.yaml")


def table(**overrides: list) -> pd.DataFrame:
    data = {
        "case_id": ["c1", "c2", "c3", "c4"],
        "age": [61, "54.5", "", 70],
        "creatinine": [1.1, 0.8, None, 2.5],
        "sex": ["F", "M", "M", ""],
        "smoking": ["never", "current", None, "former"],
        "diabetes": ["yes", "No", "1", np.nan],
        "grade": ["I", "III", "II", None],
    }
    data.update(overrides)
    return pd.DataFrame(data)


# ----------------------------------------------------------------------------- parsing the YAML


def test_contract_example_parses_and_round_trips():
    s = contract_schema()
    assert s.names == ["age", "creatinine", "sex", "smoking", "diabetes", "grade"]
    crea = s.column("creatinine")
    assert crea == ClinicalColumn("creatinine", "numeric", unit="mg/dL", range=(0.0, 20.0), log=True)
    assert s.column("grade").levels == ("I", "II", "III")
    assert ClinicalSchema.from_dict(s.to_dict(), "again") == s
    # to_dict is plain YAML (safe_dump accepts it) and keeps the contract's shape
    assert ClinicalSchema.from_dict(yaml.safe_load(yaml.safe_dump(s.to_dict())), "x") == s


def test_strict_categorical_and_ordinal_list_form_round_trip():
    s = ClinicalSchema.from_dict({"categorical": [{"name": "site", "levels": ["A", "B", 3], "strict": True}],
                                  "ordinal": [{"name": "stage", "levels": [1, 2, 3]}]}, "p.yaml")
    assert s.column("site").levels == ("A", "B", "3") and s.column("site").strict
    assert ClinicalSchema.from_dict(s.to_dict(), "p.yaml") == s


@pytest.mark.parametrize("section, needles", [
    ({"numerc": ["age"]}, ["'clinical.numerc'", "pipe.yaml", "numeric", "categorical", "binary", "ordinal"]),
    ({"numeric": [{"name": "age", "units": "y"}]}, ["'clinical.numeric[0].units'", "pipe.yaml", "unit", "range", "log"]),
    ({"binary": [{"name": "dm", "levels": [0, 1]}]}, ["'clinical.binary[0].levels'", "['name']"]),
    ({"ordinal": ["grade"]}, ["grade", "levels"]),
    ({"ordinal": {"grade": []}}, ["clinical.ordinal[0].levels", "non-empty"]),
    ({"categorical": [{"name": "smoking", "strict": True}]}, ["strict", "levels", "smoking"]),
    ({"categorical": [{"name": "smoker", "levels": [True, False]}]}, ["boolean", "quote"]),
    ({"numeric": [{"name": "age", "range": [100, 0]}]}, ["low is greater than high", "[100, 0]"]),
    ({"numeric": [{"name": "age", "range": "0-100"}]}, ["[low, high]", "'0-100'"]),
    ({"numeric": [{"name": "age", "log": "yes"}]}, ["log must be true or false", "'yes'"]),
    ({"numeric": [{"name": "x", "log": True, "range": [-1, 5]}]}, ["log: true needs values >= 0"]),
    ({"numeric": ["age"], "categorical": ["age"]}, ["'age'", "more than once"]),
    ({"numeric": [3]}, ["must be a column name", "got 3"]),
    ({"numeric": [{"name": ""}]}, ["non-empty column name"]),
    ({"numeric": "age"}, ["clinical.numeric must be a list", "'age'"]),
    ({"numeric": [{"unit": "y"}]}, ["needs a 'name'"]),
    ({"categorical": [{"name": "s", "levels": ["a", "a"]}]}, ["['a']", "more than once"]),
    ({}, ["declares no columns"]),
    (["age"], ["clinical must be a mapping", "['age']"]),
])
def test_bad_sections_raise_config_error_naming_key_source_and_allowed(section, needles):
    with pytest.raises(ConfigError) as err:
        ClinicalSchema.from_dict(section, "pipe.yaml")
    msg = str(err.value)
    assert "pipe.yaml" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ----------------------------------------------------------------------------- validating a table


def test_valid_table_passes_and_empty_cells_are_missing_not_zero():
    s = contract_schema()
    s.validate(table(), "manifest.csv")
    parsed = s.parse_frame(table(), "manifest.csv")
    assert math.isnan(parsed["age"][2]) and parsed["age"][1] == 54.5
    assert parsed["sex"][3] is None
    assert list(parsed["diabetes"][:3]) == [1.0, 0.0, 1.0] and math.isnan(parsed["diabetes"][3])
    assert list(parsed["grade"][:3]) == [0.0, 2.0, 1.0] and math.isnan(parsed["grade"][3])


@pytest.mark.parametrize("token, expected", [
    ("0", 0.0), ("1", 1.0), ("TRUE", 1.0), ("false", 0.0), ("Yes", 1.0), ("no", 0.0), ("Y", 1.0), ("n", 0.0),
    (1, 1.0), (0.0, 0.0), (True, 1.0), (" yes ", 1.0),
])
def test_binary_tokens(token, expected):
    col = ClinicalColumn("dm", "binary")
    values, problems = col.parse(pd.Series([token], dtype=object))
    assert not problems and values[0] == expected


@pytest.mark.parametrize("token", ["2", "maybe", "t", "-1", 0.5, "yess"])
def test_binary_rejects_anything_else(token):
    s = ClinicalSchema((ClinicalColumn("dm", "binary"),))
    with pytest.raises(ClinicalError) as err:
        s.validate(pd.DataFrame({"case_id": ["p9"], "dm": [token]}), "clin.csv")
    assert "'p9'" in str(err.value) and "'dm'" in str(err.value) and repr(token) in str(err.value)
    assert "yes/no" in str(err.value)


@pytest.mark.parametrize("column, value, reason", [
    ("age", "sixty", "is not a number"),
    ("age", "inf", "is not a number"),
    ("creatinine", 25.0, "outside the plausible range [0, 20] mg/dL"),
    ("creatinine", -0.5, "outside the plausible range"),
    ("grade", "IV", "not one of the ordinal levels ['I', 'II', 'III']"),
])
def test_invalid_cells_name_row_column_value_and_reason(column, value, reason):
    df = table()
    df[column] = df[column].astype(object)
    df.loc[1, column] = value
    with pytest.raises(ClinicalError) as err:
        contract_schema().validate(df, "manifest.csv")
    msg = str(err.value)
    for needle in ("manifest.csv", "case_id 'c2'", f"column '{column}'", repr(value), reason):
        assert needle in msg, (needle, msg)


def test_strict_categorical_rejects_unknown_but_lenient_accepts():
    strict = ClinicalSchema((ClinicalColumn("smoking", "categorical", levels=("never", "former"), strict=True),))
    lenient = ClinicalSchema((ClinicalColumn("smoking", "categorical", levels=("never", "former")),))
    df = pd.DataFrame({"case_id": ["a", "b"], "smoking": ["never", "sometimes"]})
    lenient.validate(df, "t.csv")
    with pytest.raises(ClinicalError, match=r"case_id 'b', column 'smoking': 'sometimes' is not one of the declared levels"):
        strict.validate(df, "t.csv")


def test_many_problems_are_collected_into_one_message():
    s = ClinicalSchema((ClinicalColumn("age", "numeric", range=(0, 120)),))
    df = pd.DataFrame({"case_id": [f"p{i}" for i in range(25)], "age": [200] * 25})
    with pytest.raises(ClinicalError) as err:
        s.validate(df, "t.csv")
    msg = str(err.value)
    assert msg.startswith("t.csv: 25 invalid clinical value(s)")
    assert "'p0'" in msg and "'p9'" in msg and "'p10'" not in msg and "and 15 more" in msg
    assert "\n" not in msg  # one line for the CLI


def test_rows_without_id_column_are_named_by_position_and_absent_columns_listed():
    s = ClinicalSchema((ClinicalColumn("age", "numeric"), ClinicalColumn("bmi", "numeric")))
    with pytest.raises(ClinicalError, match=r"\['bmi'\].*not in the table.*\['age'\]"):
        s.validate(pd.DataFrame({"age": [1]}), "t.csv")
    with pytest.raises(ClinicalError, match=r"row 2, column 'age': 'x' is not a number"):
        s.validate(pd.DataFrame({"age": [1, "x"], "bmi": [1, 2]}), "t.csv")


def test_normalize_level():
    assert normalize_level(2) == normalize_level(2.0) == normalize_level("2.0") == normalize_level(" 2 ") == "2"
    assert normalize_level("II") == "II" and normalize_level(1.5) == "1.5" and normalize_level("007") == "007"


# ----------------------------------------------------------------------------- proposals


def proposal_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 60
    return pd.DataFrame({
        "case_id": [f"c{i}" for i in range(n)],
        "label": rng.integers(0, 2, n),
        "age": rng.integers(30, 90, n).astype(float),
        "crp": np.exp(rng.normal(0, 1.5, n)).round(2),
        "sex": rng.choice(["F", "M"], n),
        "smoker": rng.choice(["yes", "no", ""], n),
        "stage": rng.choice(["I", "II", "III"], n),
        "sex_code": rng.choice([1, 2], n),
        "empty": [None] * n,
        "note": [f"free text {i}" for i in range(n)],
    })


def test_propose_schema_types_and_it_parses():
    prop = propose_schema(proposal_table())
    schema = ClinicalSchema.from_dict(prop, "proposal")
    kinds = {c.name: c.kind for c in schema.columns}
    assert kinds == {"age": "numeric", "crp": "numeric", "sex": "categorical", "smoker": "binary",
                     "stage": "categorical", "note": "categorical", "sex_code": "categorical"}
    assert schema.column("crp").log and not schema.column("age").log
    lo, hi = schema.column("age").range
    assert lo <= 30 and hi >= 89
    assert schema.column("sex").levels == ("F", "M") and schema.column("note").levels is None
    assert schema.column("sex_code").levels == ("1", "2")
    schema.validate(proposal_table(), "t.csv")  # the proposal accepts the table it came from


def test_propose_schema_exclude():
    prop = propose_schema(proposal_table(), exclude=["case_id", "label", "note", "crp"])
    assert "note" not in str(prop) and "crp" not in str(prop) and "age" in str(prop)


def test_propose_from_file_and_bad_files(tmp_path):
    p = tmp_path / "clin.csv"
    proposal_table().to_csv(p, index=False)
    assert propose_schema_from_file(p) == propose_schema(pd.read_csv(p, dtype=str))
    with pytest.raises(ManifestError, match="clinical table not found"):
        propose_schema_from_file(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="empty"):
        propose_schema_from_file(tmp_path / "empty.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ManifestError, match="unsupported table type '.xlsx'"):
        propose_schema_from_file(tmp_path / "t.xlsx")
    (tmp_path / "ids.csv").write_text("case_id,label\na,1\n")
    with pytest.raises(ManifestError, match="no clinical column"):
        propose_schema_from_file(tmp_path / "ids.csv")


# ----------------------------------------------------------------------------- the CLI verb


def test_cli_clinical_schema_stdout_and_out(tmp_path, capsys):
    p = tmp_path / "clin.csv"
    proposal_table().to_csv(p, index=False)
    assert main(["clinical-schema", str(p), "-q"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert set(doc) == {"clinical"}
    ClinicalSchema.from_dict(doc["clinical"], "stdout")
    out = tmp_path / "schema.yaml"
    assert main(["clinical-schema", str(p), "--out", str(out), "--exclude", "case_id", "label", "note", "-q"]) == 0
    written = yaml.safe_load(out.read_text())["clinical"]
    assert "note" not in str(written) and ClinicalSchema.from_dict(written, str(out)).column("age").kind == "numeric"


def test_cli_clinical_schema_bad_input_is_one_line(tmp_path, capsys):
    assert main(["clinical-schema", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert "mmai clinical-schema: error: clinical table not found" in err and "Traceback" not in err
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00a,b\n\x00\xff")
    assert main(["clinical-schema", str(tmp_path / "bin.csv")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_column_constructor_checks_kind():
    with pytest.raises(ConfigError, match=r"kind 'text' is not allowed; choose one of \['numeric'"):
        ClinicalColumn("note", "text")
    with pytest.raises(ConfigError, match="needs levels"):
        ClinicalColumn("grade", "ordinal")
