"""predictions.csv carries ``input_flags`` (issue 15): a raw DICOM case with a truncated file is
predicted with the repair named (case row + file name); a NaN volume is an error row, never a
prediction; clean cases have an empty flag."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd

from mmai.io.reader import load_volume
from tests.inference.predict_world import world  # noqa: F401


def test_predictions_carry_input_flags_and_refuse_nan(world, tmp_path, capsys):  # noqa: F811
    man = pd.read_csv(world.cohort / "manifest.csv").iloc[:3].copy()
    src = [world.cohort / p for p in man["image"]]
    broken = tmp_path / "broken"
    shutil.copytree(src[0], broken)
    victim = sorted(broken.iterdir())[10]
    victim.write_bytes(victim.read_bytes()[:-3000])  # pixel data cut short
    vol = load_volume(src[2])
    arr = vol.array.copy()
    arr[:5] = np.nan
    nib.save(nib.Nifti1Image(arr, vol.affine), str(tmp_path / "nan.nii.gz"))
    man["image"] = [str(broken), str(src[1]), str(tmp_path / "nan.nii.gz")]
    man.to_csv(tmp_path / "m.csv", index=False)
    assert world.predict(tmp_path / "p.csv", "--manifest", str(tmp_path / "m.csv")) == 0
    pred = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("case_id")
    ids = list(man["case_id"])
    assert list(pred.index) == ids[:2]  # the NaN case is not predicted
    assert pred.loc[ids[0], "input_flags"] == (f"dropped_file_names={victim.name};dropped_files=1;"
                                               "interpolated_slices=1")
    assert pred.loc[ids[1], "input_flags"] == ""
    err = pd.read_csv(tmp_path / "p.errors.csv")
    assert list(err["case_id"]) == [ids[2]] and "non-finite" in err["error"][0]
    logged = capsys.readouterr().err
    assert f"case {ids[0]}: input repaired" in logged and victim.name in logged
