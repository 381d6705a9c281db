"""Explanations of a lesion-box (``image.roi``) model on the raw scan: the saliency map is written
in the patient's full scan geometry (the box placed back into the volume: non-zero only in the
box around the lesion), and the attention map of a one-token model (a constant) is skipped with
a note instead of being written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd

from mmai.cli import main
from mmai.transforms.roi import mask_center_ras
from tests.inference.test_raw_input_predict import AFFINE, SHAPE, N, _cohort, _pipeline, _preprocess_and_train

BOX_MM = 30.0


def test_roi_saliency_on_the_full_scan_and_no_constant_attention(tmp_path):
    manifest = _cohort(tmp_path, "CT")
    pipe = _pipeline(tmp_path, "ct_chest", roi={"mask": "mask", "size_mm": [BOX_MM] * 3}, crop_foreground=False)
    _preprocess_and_train(tmp_path, pipe, manifest)
    assert main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(manifest), "--out",
                 str(tmp_path / "p.csv"), "--explain", str(tmp_path / "ex"), "--device", "cpu", "-q"]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == N
    for cid in ("c0", "c1"):
        info = json.loads((tmp_path / "ex" / f"{cid}_explain.json").read_text())
        assert f"{cid}_attention.nii.gz" not in info["files"] and not (tmp_path / "ex" / f"{cid}_attention.nii.gz").exists()
        assert any("one image token" in n for n in info["notes"])
        sal = nib.load(str(tmp_path / "ex" / f"{cid}_saliency.nii.gz"))
        assert sal.shape == SHAPE and np.allclose(sal.affine, AFFINE)  # the patient's scan, not the box
        arr = np.asarray(sal.dataobj)
        mask = nib.load(str(tmp_path / "cohort" / "images" / f"{cid}_mask.nii.gz"))
        centre = mask_center_ras(np.asarray(mask.dataobj), mask.affine)
        ijk = np.argwhere(arr > 0)
        assert len(ijk) > 0 and arr.max() == np.float32(1.0)
        ras = nib.affines.apply_affine(AFFINE, ijk)
        # every non-zero voxel lies inside the lesion box (half the box + one voxel of interpolation)
        assert np.abs(ras - centre).max() <= BOX_MM / 2 + 6.0
        assert (arr > 0).mean() < 0.2  # the rest of the scan is zero


def test_roi_run_predicts_a_dicom_root_with_the_table_s_mask_column(tmp_path):
    """``--dicom-root`` + a clinical table carrying the mask column: the box is cut from the DICOM
    series as from the same series given in a manifest (equal predictions)."""
    from mmai.inference.explain_geometry import native_image
    from tests.data.real_pixels import ct_series

    manifest = _cohort(tmp_path, "CT")
    pipe = _pipeline(tmp_path, "ct_chest", roi={"mask": "mask", "size_mm": [BOX_MM] * 3}, crop_foreground=False)
    _preprocess_and_train(tmp_path, pipe, manifest)
    series = ct_series(tmp_path / "dicom" / "p1")
    from mmai.config import ImageConfig

    vol, aff = native_image(str(series), ImageConfig())  # (X, Y, Z) and its RAS affine
    mask = np.zeros(vol.shape, np.uint8)
    c = np.array(vol.shape) // 2
    mask[c[0] - 8 : c[0] + 8, c[1] - 8 : c[1] + 8, c[2] - 2 : c[2] + 2] = 1
    nib.save(nib.Nifti1Image(mask, aff), str(tmp_path / "dicom_mask.nii.gz"))
    # which case id the DICOM root gives the study
    assert main(["predict", "--run", str(tmp_path / "run"), "--dicom-root", str(tmp_path / "dicom"), "--out",
                 str(tmp_path / "probe.csv"), "--device", "cpu", "-q"]) == 1  # no mask: the case fails
    probe = pd.read_csv(tmp_path / "probe.errors.csv")
    assert "needs the lesion column(s) ['mask']" in probe["error"].iloc[0]
    cid = probe["case_id"].iloc[0]
    pd.DataFrame({"case_id": [cid], "age": [50.0], "mask": ["dicom_mask.nii.gz"]}).to_csv(tmp_path / "t.csv",
                                                                                           index=False)
    assert main(["predict", "--run", str(tmp_path / "run"), "--dicom-root", str(tmp_path / "dicom"), "--clinical",
                 str(tmp_path / "t.csv"), "--out", str(tmp_path / "d.csv"), "--device", "cpu", "-q"]) == 0
    pd.DataFrame({"case_id": [cid], "image": [str(series)], "age": [50.0], "mask": ["dicom_mask.nii.gz"]}).to_csv(
        tmp_path / "m.csv", index=False)
    assert main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(tmp_path / "m.csv"), "--out",
                 str(tmp_path / "mm.csv"), "--device", "cpu", "-q"]) == 0
    d, m = pd.read_csv(tmp_path / "d.csv"), pd.read_csv(tmp_path / "mm.csv")
    assert len(d) == 1 and not (tmp_path / "d.errors.csv").exists()
    np.testing.assert_allclose(d["prob_1"], m["prob_1"], atol=1e-6)
