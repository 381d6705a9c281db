"""`mmai preprocess` over a DICOM root: one case per study, selection errors listed, no PHI, resumable."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from mmai.cli import main
from tests.io.dicom_cases import ORIGIN, SPACING, phantom, series, two_series, with_localizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def pipeline(tmp_path) -> Path:
    cfg = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    cfg["image"].update(spacing=[2.0, 2.0, 5.0], size=[16, 12, 10], select={"modality": "CT"})
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_dicom_root(tmp_path, pipeline):
    root = tmp_path / "root"
    series(root / "A", patient_id="MRN-A", patient_name="DOE^JANE")
    with_localizer(root / "B")  # CT + a localizer: the localizer is never a candidate
    two_series(root / "C")  # two CT series in one study: ambiguous -> error row, not a guess
    (root / "junk.txt").write_text("not dicom")
    out = tmp_path / "out"
    assert main(["preprocess", "--config", str(pipeline), "--input", str(root), "--out", str(out), "-q"]) == 0
    m = pd.read_csv(out / "manifest.csv")
    err = pd.read_csv(out / "errors.csv")
    assert len(m) == 2 and len(err) == 1
    assert err["stage"][0] == "select" and "2 series match" in err["error"][0]
    text = (out / "manifest.csv").read_text() + (out / "errors.csv").read_text()
    assert "MRN-A" not in text and "DOE" not in text  # case ids are pseudonyms
    assert m["case_id"].str.startswith("p-").all()
    img = nib.load(out / m["image"][0])
    assert img.shape == (16, 12, 10)
    # rerun: nothing redone, same outputs
    before = (out / m["image"][0]).stat().st_mtime_ns
    assert main(["preprocess", "--config", str(pipeline), "--input", str(root), "--out", str(out), "-q"]) == 0
    assert (out / m["image"][0]).stat().st_mtime_ns == before


def test_bad_case_does_not_stop_the_others(tmp_path, pipeline):
    data = tmp_path / "data"
    good = series(data / "good")
    bad = data / "bad"
    bad.mkdir()
    (bad / "x.dcm").write_bytes(b"\x00" * 200)
    nii = data / "vol.nii.gz"
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]]
    nib.save(nib.Nifti1Image(phantom(), affine), str(nii))
    pd.DataFrame({"case_id": ["g", "b", "n", "none"], "image": ["data/good", "data/bad", "data/vol.nii.gz", ""],
                  "age": [50, 60, 70, 80], "sex": ["F"] * 4, "smoking": ["never"] * 4, "diabetes": [0] * 4,
                  "crp": [1, 2, 3, 4], "bmi": [20, 21, 22, 23], "label": [0, 1, 0, 1]}).to_csv(tmp_path / "m.csv",
                                                                                            index=False)
    out = tmp_path / "out"
    assert main(["preprocess", "--config", str(pipeline), "--input", str(tmp_path / "m.csv"), "--out", str(out),
                 "--workers", "2", "-q"]) == 0
    m = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(m["case_id"]) == ["g", "n", "none"] and m["image"].tolist()[-1] == ""
    err = pd.read_csv(out / "errors.csv")
    assert list(err["case_id"]) == ["b"] and "bad" in err["error"][0]
    # the DICOM series and the NIfTI of the same volume give the same preprocessed array
    a = np.asarray(nib.load(out / "images" / "g.nii.gz").dataobj)
    b = np.asarray(nib.load(out / "images" / "n.nii.gz").dataobj)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert good.files


def test_shards_cover_every_case_once(tmp_path, pipeline):
    data = tmp_path / "data"
    for i in range(5):
        series(data / f"s{i}", seed=i, shape=(16, 12, 6))
    pd.DataFrame({"case_id": [f"c{i}" for i in range(5)], "image": [f"data/s{i}" for i in range(5)],
                  "label": [0, 1, 0, 1, 0]}).assign(age=1, sex="F", smoking="never", diabetes=0, crp=1, bmi=20
                                                    ).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        assert main(["preprocess", "--config", str(pipeline), "--input", str(tmp_path / "m.csv"), "--out", str(out),
                     "--shard", shard, "-q"]) == 0
    a = pd.read_csv(out / "manifest.shard0of2.csv")
    b = pd.read_csv(out / "manifest.shard1of2.csv")
    assert sorted([*a["case_id"], *b["case_id"]]) == [f"c{i}" for i in range(5)]
    assert main(["preprocess", "--config", str(pipeline), "--input", str(tmp_path / "m.csv"), "--out", str(out),
                 "-q"]) == 0  # merge: every case is already done
    assert len(pd.read_csv(out / "manifest.csv")) == 5


def test_bad_options(tmp_path, pipeline, capsys):
    assert main(["preprocess", "--config", str(pipeline), "--input", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["preprocess", "--config", str(pipeline), "--input", "x", "--out", "o", "--shard", "3/2"])


def test_every_case_failing_exits_nonzero(tmp_path, pipeline, capsys):
    """preprocess and convert: a batch where every case fails is exit status 1 with one line, not 0."""
    bad = tmp_path / "data" / "bad"
    bad.mkdir(parents=True)
    (bad / "x.dcm").write_bytes(b"\x00" * 200)
    pd.DataFrame({"case_id": ["b"], "image": ["data/bad"], "age": [60], "sex": ["F"], "smoking": ["never"],
                  "diabetes": [0], "crp": [2], "bmi": [21], "label": [1]}).to_csv(tmp_path / "m.csv", index=False)
    assert main(["preprocess", "--config", str(pipeline), "--input", str(tmp_path / "m.csv"),
                 "--out", str(tmp_path / "out"), "-q"]) == 1
    assert "mmai preprocess: error: every case failed" in capsys.readouterr().err
    # convert: a folder whose files are all unreadable (cut short: not DICOM any more)
    s = series(tmp_path / "conv" / "s")
    for f in s.files:
        Path(f).write_bytes(Path(f).read_bytes()[:-4000])
    assert main(["convert", str(tmp_path / "conv"), "--out", str(tmp_path / "nii"), "-q"]) == 1
    assert "mmai convert: error: every case failed" in capsys.readouterr().err
    good = series(tmp_path / "conv2" / "s")
    assert good.files and main(["convert", str(tmp_path / "conv2"), "--out", str(tmp_path / "nii2"), "-q"]) == 0
