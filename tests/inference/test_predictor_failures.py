"""``mmai predict`` failures that must tell the truth: exit codes, the closing counts, short error
rows without file lists, torn CSV rows on resume, bad --out kinds and weights of another model."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
from safetensors.torch import load_file, save_file

from mmai.inference.rows import MAX_ERROR_CHARS, error_row
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture
from tests.test_cli import run_cli


def test_all_fail_batch_exits_nonzero_with_counts(world, tmp_path, capsys):  # noqa: F811
    man = world.broken_manifest(tmp_path, range(24))
    capsys.readouterr()
    assert world.predict(tmp_path / "p.csv", "--manifest", man) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: every case failed: 0 predicted, 24 failed, 0 skipped" in err[-1]
    assert len(pd.read_csv(tmp_path / "p.errors.csv")) == 24


def test_partial_failure_exits_zero_and_closing_line_counts(world, tmp_path, capsys):  # noqa: F811
    man = world.broken_manifest(tmp_path, {2, 7})
    capsys.readouterr()
    assert world.predict(tmp_path / "p.csv", "--manifest", man) == 0
    err = capsys.readouterr().err
    assert "22 predicted, 2 failed, 0 skipped (already done) of 24 case(s)" in err
    capsys.readouterr()
    assert world.predict(tmp_path / "p.csv", "--manifest", man) == 0  # resume: the failures are retried
    assert "0 predicted, 2 failed, 22 skipped" in capsys.readouterr().err


def test_error_rows_name_the_series_not_the_patient_folder(world, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "root"
    shutil.copytree(world.cohort / "images" / "case0000", root / "Doe_John")
    shutil.copytree(world.cohort / "images" / "case0001", root / "case0001")
    for i in range(5, 10):  # 5 of 40 files: more than the 10 % a series may lose (mmai.io.dicom_series)
        bad = root / "Doe_John" / f"IM{i:05d}.dcm"
        bad.write_bytes(bad.read_bytes()[:-3000])  # pixel data cut short
    capsys.readouterr()
    assert world.predict(tmp_path / "p.csv", "--dicom-root", str(root)) == 0
    logged = capsys.readouterr().err
    err = pd.read_csv(tmp_path / "p.errors.csv")
    assert len(err) == 1 and err["stage"][0] == "image"
    assert err["series"][0].startswith("series 1.2.")  # the SeriesInstanceUID
    row = err.to_csv(index=False)
    assert "Doe_John" not in row and "Doe_John" not in logged
    assert "IM00001" not in row and "[40 files]" in row  # no list of files
    assert len(err["error"][0]) <= MAX_ERROR_CHARS and "less than expected" in err["error"][0]


def test_error_row_caps_length_and_one_line():
    files = [f"/data/Doe_Jane/s1/IM{i:05d}.dcm" for i in range(200)]
    row = error_row("c1", "image", f"{files}: bad\nsecond line " + "x" * 1000, series="series 1.2.3", files=files)
    assert len(row["error"]) == MAX_ERROR_CHARS and "\n" not in row["error"]
    assert "Doe_Jane" not in row["error"] and row["error"].startswith("[200 files]: bad second line")
    names = error_row("c1", "clinical", "column(s) ['age', 'crp'] are not in the table")
    assert names["error"] == "column(s) ['age', 'crp'] are not in the table"  # not a file list


def test_torn_last_row_is_redone_not_glued(world, tmp_path):  # noqa: F811
    out = tmp_path / "p.csv"
    man = str(world.pre / "manifest.csv")
    assert world.predict(out, "--manifest", man) == 0
    full = pd.read_csv(out).set_index("case_id").sort_index()
    text = out.read_bytes()
    out.write_bytes(text[: len(text) - 12])  # killed inside the last row's model_id field
    assert world.predict(out, "--manifest", man) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 25 and all(line.count(",") == 6 for line in lines)  # 7 columns
    again = pd.read_csv(out).set_index("case_id").sort_index()
    assert list(again.index) == list(full.index) and (again["model_id"] == full["model_id"]).all()
    np.testing.assert_allclose(again["prob_1"], full["prob_1"], atol=1e-6)


def test_bad_out_kinds_are_one_line_errors(world, tmp_path, capsys):  # noqa: F811
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    man = str(world.pre / "manifest.csv")
    cases = [
        ["predict", "--run", str(world.run), "--manifest", man, "--out", str(tmp_path / "adir")],
        ["export", "--run", str(world.run), "--format", "torchscript", "--out", str(tmp_path / "adir")],
        ["evaluate", "--predictions", man, "--manifest", man, "--out", str(tmp_path / "afile")],
        ["train", "--config", str(world.pipe), "--manifest", man, "--out", str(tmp_path / "afile")],
        ["convert", str(world.cohort / "images"), "--out", str(tmp_path / "afile")],
        ["scan", str(world.cohort / "images"), "--out", str(tmp_path / "adir")],
    ]
    for argv in cases:
        capsys.readouterr()
        assert run_cli([*argv, "-q"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--out" in err and "existing" in err, (argv, err)
    assert (tmp_path / "afile").read_text() == "x"


def test_weights_of_another_model_are_a_one_line_error(world, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    weights = load_file(str(run / "model.safetensors"))
    save_file(weights, str(run / "model.safetensors"), metadata={"format": "mmai", "model_id": "concat-0123456789"})
    argv = ["--manifest", str(world.pre / "manifest.csv")]
    from mmai.cli import main

    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "a.csv"), "-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "concat-0123456789" in err and "another run" in err
    weights.pop(sorted(weights)[0])
    weights["head.extra"] = weights[sorted(weights)[0]].clone()
    save_file(weights, str(run / "model.safetensors"))  # no model id: keys tell
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "b.csv"), "-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "1 missing, 1 unexpected" in err and "another model" in err
