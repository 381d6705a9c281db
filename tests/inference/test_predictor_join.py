"""``mmai predict --dicom-root [--clinical T]``: the join rule, from the failing cases of issue 10.

A table keyed on mmai's pseudonyms used to lose every clinical value silently; two rows for one
patient made two predictions; no --clinical failed every case with exit 0.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mmai.io.deid import pseudonym
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture

CLIN = ["age", "sex", "smoking", "diabetes", "crp", "bmi"]


def test_pseudonym_keyed_table_matches_and_says_so(world, tmp_path):  # noqa: F811
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    table["patient_id"] = [pseudonym(p) for p in table["patient_id"]]  # what `mmai scan` shows
    table.to_csv(tmp_path / "pseudo.csv", index=False)
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "pseudo.csv")) == 0
    got = pd.read_csv(out).set_index("case_id").sort_index()
    ref = world.reference()
    assert list(got.index) == list(ref.index)  # named by the table's case_id
    np.testing.assert_allclose(got["prob_1"], ref["prob_1"], atol=1e-4)  # the clinical values were used
    assert (got["clinical_present"] == 1).all()
    report = json.loads((tmp_path / "p.join.json").read_text())
    assert report["rule"] == "patient_id"
    assert report["matched_by"] == {"raw PatientID": 0, "pseudonym": 24}
    assert report["n_unmatched_studies"] == 0 and report["n_unmatched_rows"] == 0


def test_raw_id_table_reports_raw_matches(world, tmp_path):  # noqa: F811
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(world.cohort / "clinical.csv")) == 0
    assert json.loads((tmp_path / "p.join.json").read_text())["matched_by"] == {"raw PatientID": 24,
                                                                                 "pseudonym": 0}


def test_duplicate_patient_rows_fail_up_front_naming_the_rows(world, tmp_path, capsys):  # noqa: F811
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    table = pd.concat([table, table.iloc[[3]]], ignore_index=True)  # patient of row 5 twice
    table.to_csv(tmp_path / "dup.csv", index=False)
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "dup.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rows 5 and 26" in err
    assert not out.exists()  # nothing predicted before the table was checked


def test_same_patient_by_raw_id_and_pseudonym_is_a_duplicate(world, tmp_path, capsys):  # noqa: F811
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    extra = table.iloc[[0]].copy()
    extra["patient_id"] = pseudonym(extra["patient_id"].iloc[0])
    extra["case_id"] = "other"
    pd.concat([table, extra], ignore_index=True).to_csv(tmp_path / "both.csv", index=False)
    assert world.predict(tmp_path / "p.csv", "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "both.csv")) == 2
    assert "rows 2 and 26" in capsys.readouterr().err


def test_missing_clinical_table_predicts_every_study_as_missing_modality(world, tmp_path):  # noqa: F811
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images")) == 0
    got = pd.read_csv(out)
    assert len(got) == 24 and (got["clinical_present"] == 0).all()
    assert not (tmp_path / "p.errors.csv").exists()
    # the same as the manifest with every clinical cell empty (the model's missing clinical modality)
    man = pd.read_csv(world.cohort / "manifest.csv", dtype=str)
    man[CLIN] = None
    man.to_csv(world.cohort / "no_clinical.csv", index=False)
    ref_out = tmp_path / "ref.csv"
    assert world.predict(ref_out, "--manifest", str(world.cohort / "no_clinical.csv")) == 0
    ref = pd.read_csv(ref_out)
    assert (ref["clinical_present"] == 0).all()
    np.testing.assert_allclose(np.sort(got["prob_1"]), np.sort(ref["prob_1"]), atol=1e-4)
    assert json.loads((tmp_path / "p.join.json").read_text())["rule"] == "none"


def test_missing_column_fails_up_front_with_one_line(world, tmp_path, capsys):  # noqa: F811
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str).drop(columns=["crp"])
    table.to_csv(tmp_path / "nocrp.csv", index=False)
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "nocrp.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'crp'" in err and not out.exists()


def test_no_key_column_and_empty_key_fail_up_front(world, tmp_path, capsys):  # noqa: F811
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    table.drop(columns=["case_id", "patient_id"]).to_csv(tmp_path / "nokey.csv", index=False)
    assert world.predict(tmp_path / "a.csv", "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "nokey.csv")) == 2
    assert "patient_id" in capsys.readouterr().err
    table.loc[4, "patient_id"] = ""
    table.to_csv(tmp_path / "empty.csv", index=False)
    assert world.predict(tmp_path / "b.csv", "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "empty.csv")) == 2
    assert "row(s) [6]" in capsys.readouterr().err


def test_unmatched_studies_and_rows_are_counted_listed_and_flagged(world, tmp_path):  # noqa: F811
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    half = table.iloc[:12].copy()
    stranger = half.iloc[[0]].copy()
    stranger["patient_id"], stranger["case_id"] = "NOBODY", "ghost"
    pd.concat([half, stranger], ignore_index=True).to_csv(tmp_path / "half.csv", index=False)
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "half.csv")) == 0
    got = pd.read_csv(out).set_index("case_id")
    assert len(got) == 24  # every study predicted
    matched = set(half["case_id"])
    assert (got.loc[sorted(matched), "clinical_present"] == 1).all()
    assert (got.loc[sorted(set(got.index) - matched), "clinical_present"] == 0).all()
    rep = json.loads((tmp_path / "p.join.json").read_text())
    assert rep["n_matched"] == 12 and rep["n_unmatched_studies"] == 12
    assert rep["n_unmatched_rows"] == 1 and rep["unmatched_rows"] == [14]
    assert set(rep["unmatched_studies"]) == set(got.index) - matched


def test_join_by_case_id_uses_mmai_case_ids(world, tmp_path):  # noqa: F811
    base = tmp_path / "ids.csv"
    assert world.predict(base, "--dicom-root", str(world.cohort / "images")) == 0
    ids = pd.read_csv(base)["case_id"]  # mmai's ids: <patient pseudonym>-<study pseudonym>
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    table["case_id"] = [next(i for i in ids if i.startswith(pseudonym(p) + "-")) for p in table["patient_id"]]
    table.drop(columns=["patient_id"]).to_csv(tmp_path / "byid.csv", index=False)
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                         str(tmp_path / "byid.csv")) == 0
    assert (pd.read_csv(out)["clinical_present"] == 1).all()
    rep = json.loads((tmp_path / "p.join.json").read_text())
    assert rep["rule"] == "case_id" and rep["matched_by"] == {"case_id": 24}


@pytest.mark.parametrize("how", ["file", "env"])
def test_salt_changes_pseudonyms_and_the_keyed_join(world, tmp_path, monkeypatch, how):  # noqa: F811
    secret = "a-site-secret-of-32-characters!!"
    table = pd.read_csv(world.cohort / "clinical.csv", dtype=str)
    table["patient_id"] = [pseudonym(p, salt=secret) for p in table["patient_id"]]
    table.to_csv(tmp_path / "keyed.csv", index=False)
    args = ["--dicom-root", str(world.cohort / "images"), "--clinical", str(tmp_path / "keyed.csv")]
    # without the secret the keyed pseudonyms match nobody
    assert world.predict(tmp_path / "plain.csv", *args) == 0
    assert (pd.read_csv(tmp_path / "plain.csv")["clinical_present"] == 0).all()
    if how == "file":
        (tmp_path / "salt.txt").write_text(secret + "\n")
        args += ["--salt-file", str(tmp_path / "salt.txt")]
    else:
        monkeypatch.setenv("MMAI_PSEUDONYM_KEY", secret)
    assert world.predict(tmp_path / "keyed_p.csv", *args) == 0
    assert (pd.read_csv(tmp_path / "keyed_p.csv")["clinical_present"] == 1).all()
    assert json.loads((tmp_path / "keyed_p.join.json").read_text())["matched_by"]["pseudonym"] == 24
