"""The PACS layer without a server: options, study lists, retries, the cache, the SR and its UIDs."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from mmai.cli import main
from mmai.errors import ConfigError, ManifestError
from mmai.pacs.cache import StudyCache
from mmai.pacs.dimse import parse_address
from mmai.pacs.query import parse_query, read_study_list
from mmai.pacs.retry import PacsError, RetryPolicy, TransientPacsError, with_retries
from mmai.pacs.sr import build_sr, derived_uid, read_sr_values


def _uid() -> str:
    return generate_uid()[:50].rstrip(".")


def _instance(study: str, series: str, k: int, rows: int = 8) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = "PSEUDO-7", "Anon^Seven", "F", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
        "20240101", "120000", "1", "ACC7", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((rows, rows), np.int16).tobytes()
    return ds


def test_query_keys_and_dates_are_checked():
    assert parse_query(["StudyDate=20240101-20240131", "ModalitiesInStudy=CT"]) == {
        "StudyDate": "20240101-20240131", "ModalitiesInStudy": "CT"}
    with pytest.raises(ConfigError, match="'Sex' is not allowed.*StudyDate"):
        parse_query(["Sex=F"])
    with pytest.raises(ConfigError, match="YYYYMMDD"):
        parse_query(["StudyDate=2024-01-01"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_query(["StudyDate"])
    with pytest.raises(ConfigError, match="twice"):
        parse_query(["PatientID=a", "PatientID=b"])


def test_study_list_columns(tmp_path):
    (tmp_path / "a.csv").write_text("AccessionNumber\nA1\nA2\nA1\n")
    assert read_study_list(tmp_path / "a.csv") == [("AccessionNumber", "A1"), ("AccessionNumber", "A2")]
    (tmp_path / "b.csv").write_text("study_uid\n1.2.3\n\n")
    assert read_study_list(tmp_path / "b.csv") == [("StudyInstanceUID", "1.2.3")]
    (tmp_path / "c.csv").write_text("uid\n1.2.3\n")
    with pytest.raises(ManifestError, match="StudyInstanceUID.*columns are \\['uid'\\]"):
        read_study_list(tmp_path / "c.csv")


def test_dimse_address():
    assert parse_address("ORTHANC@pacs.local:4242") == ("ORTHANC", "pacs.local", 4242)
    for bad in ("pacs:4242", "A@h:0", "WAYTOOLONGAETITLE17@h:1"):
        with pytest.raises(PacsError, match="AET@HOST:PORT"):
            parse_address(bad)


def test_retries_back_off_then_give_up_in_one_line():
    waits: list[float] = []
    calls = [0]

    def flaky() -> str:
        calls[0] += 1
        if calls[0] < 3:
            raise TransientPacsError("association refused")
        return "ok"

    policy = RetryPolicy(attempts=4, base_s=0.5, max_s=8)
    assert with_retries(flaky, "C-FIND", policy, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]

    def down() -> None:
        raise TransientPacsError("cannot reach\nhttp://x")

    waits.clear()
    with pytest.raises(PacsError) as info:
        with_retries(down, "DICOMweb http://x search", RetryPolicy(attempts=3, base_s=1, max_s=1.5), sleep=waits.append)
    assert waits == [1, 1.5]
    assert "\n" not in str(info.value) and "gave up after 3 attempt(s)" in str(info.value)

    def refused() -> None:
        raise PacsError("HTTP 403")

    calls[0] = 0
    with pytest.raises(PacsError, match="HTTP 403"):
        with_retries(refused, "x", policy, sleep=waits.append)


def test_cache_is_keyed_by_sop_uid_and_bounded(tmp_path):
    cache = StudyCache(tmp_path / "c", max_bytes=10_000)
    a, b = _uid(), _uid()
    first = [_instance(a, a + ".1", k, rows=32) for k in range(3)]
    paths = [cache.add(ds) for ds in first]
    assert [p.name for p in paths] == [f"{ds.SOPInstanceUID}.dcm" for ds in first]
    own = _instance(a, a + ".9", 0)
    own.Manufacturer = "mmai"  # an image mmai wrote (mmai synth) is an input ...
    assert cache.add(own) is not None and cache.n_instances(a) == 4
    own.SOPClassUID, own.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.30", _uid()  # ... a result it stored is not
    assert cache.add(own) is None and cache.n_instances(a) == 4
    mtime = paths[0].stat().st_mtime_ns
    cache.add(first[0])  # again: not rewritten
    assert paths[0].stat().st_mtime_ns == mtime and cache.n_instances(a) == 4
    for k in range(3):
        cache.add(_instance(b, b + ".1", k, rows=32))
    assert cache.size() > 10_000
    cache.make_room(busy={b})
    assert not cache.study_dir(a).exists() and cache.n_instances(b) == 3
    cache.release(b)
    cache.remove_if_empty()
    assert not (tmp_path / "c").exists()
    with pytest.raises(PacsError, match="not a DICOM UID"):
        cache.study_dir("../etc")


def test_derived_uids_are_fixed_by_study_model_and_kind():
    uid = derived_uid("1.2.3", "cross_attention-abc", "sr")
    assert uid == derived_uid("1.2.3", "cross_attention-abc", "sr")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    assert len({uid, derived_uid("1.2.4", "cross_attention-abc", "sr"), derived_uid("1.2.3", "other", "sr"),
                derived_uid("1.2.3", "cross_attention-abc", "sr-series")}) == 4


@pytest.mark.parametrize("kind", ["binary", "survival"])
def test_sr_holds_the_row_and_only_source_identifiers(kind):
    study = _uid()
    src = [_instance(study, study + ".5", k) for k in range(4)]
    if kind == "binary":
        row = {"case_id": "p-0123456789abcdef-aa", "prob_benign": 0.25, "prob_malignant": 0.75,
               "prediction": "malignant", "clinical_present": 1, "input_flags": "nonfinite_voxels=3", "model_id": "m-1"}
    else:
        row = {"case_id": "p-0123456789abcdef-aa", "risk": -0.4321, "surv_365": 0.9, "surv_730": 0.8,
               "clinical_present": 0, "model_id": "m-1"}
    sr = build_sr(row, src, model_id="m-1", version="9.9", kind=kind)
    got = read_sr_values(sr)
    for k, v in row.items():
        if k != "case_id":
            assert got[k] == (pytest.approx(v) if isinstance(v, float | int) and k != "prediction" else v), k
    assert got["series_uid"] == study + ".5" and got["version"] == "9.9"
    assert sr.SOPInstanceUID == derived_uid(study, "m-1", "sr") and sr.StudyInstanceUID == study
    for key in ("PatientID", "PatientName", "PatientSex", "AccessionNumber", "StudyDate"):
        assert str(sr.get(key)) == str(src[0].get(key))
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == study + ".5" and len(refs.ReferencedSOPSequence) == 4
    assert "p-0123456789abcdef" not in str(sr)  # no mmai case id / pseudonym added


def test_pacs_options_need_a_pacs_and_one_source(tmp_path, capsys):
    rc = main(["predict", "--run", str(tmp_path), "--out", str(tmp_path / "p.csv"), "--manifest", "m.csv",
               "--store-results"])
    assert rc == 2 and "--store-results go(es) with --dicomweb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["predict", "--run", str(tmp_path), "--out", str(tmp_path / "p.csv"), "--dicomweb", "http://x",
              "--dimse", "A@b:1"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    rc = main(["preprocess", "--config", "x.yaml", "--out", str(tmp_path / "o")])
    assert rc == 2 and "needs --input" in capsys.readouterr().err


def test_parametric_map_samples_each_source_pixel(tmp_path):
    """Sampling the series' own volume (mmai's reader: RAS grid) at every source pixel gives back each
    instance's pixels: the geometry of the parametric map is the source series', pixel for pixel."""
    import nibabel as nib

    from mmai.config import load_config
    from mmai.inference.explain_geometry import native_image
    from mmai.pacs.pmap import build_overlay, build_parametric_map, sample_on_series
    from tests.test_end_to_end import ROOT

    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "4", "-q"]) == 0
    files = sorted(str(f) for f in (tmp_path / "c" / "images" / "case0002").glob("*.dcm"))
    arr, affine = native_image(files, load_config(ROOT / "pipelines" / "demo.yaml").image)
    nib.save(nib.Nifti1Image(arr, affine), tmp_path / "vol.nii.gz")
    headers = [pydicom.dcmread(f) for f in files]
    frames = sample_on_series(tmp_path / "vol.nii.gz", headers)
    want = np.stack([h.pixel_array * float(h.get("RescaleSlope", 1)) + float(h.get("RescaleIntercept", 0))
                     for h in headers])
    assert frames.shape == want.shape
    np.testing.assert_allclose(frames, want, atol=1e-3)
    pm = build_parametric_map(frames / max(1.0, float(frames.max())), [pydicom.dcmread(f, stop_before_pixels=True)
                                                                       for f in files], model_id="m-1", version="9")
    assert pm.NumberOfFrames == len(files) and pm.SOPInstanceUID == derived_uid(headers[0].StudyInstanceUID, "m-1", "pm")
    assert pm.PatientID == headers[0].PatientID and pm.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    # the overlay: the peak slice (a blob in frame 7), RGB, red where the map is high
    peak = np.zeros_like(frames)
    peak[7, 40:44, 30:34] = 0.6
    sc = build_overlay(peak, files, model_id="m-1", version="9")
    rgb = sc.pixel_array.astype(int)
    assert rgb.shape == (*frames.shape[1:], 3) and sc.SOPInstanceUID == derived_uid(headers[0].StudyInstanceUID, "m-1", "sc")
    assert rgb[41, 31, 0] > rgb[41, 31, 2] + 50  # hot colour over the blob
    assert abs(int(rgb[5, 5, 0]) - int(rgb[5, 5, 2])) <= 1  # grey elsewhere
    assert sc.PatientID == headers[0].PatientID and sc.BurnedInAnnotation == "NO"


def test_ledger_survives_a_torn_last_row(tmp_path):
    from mmai.pacs.store import Ledger

    path = tmp_path / "p.stored.csv"
    led = Ledger(path)
    led.add("1.2", "2.25.1", "DICOMweb http://x")
    path.write_bytes(path.read_bytes() + b"1.3,2.25.2,DICOMw")  # killed while writing
    again = Ledger(path)
    assert again.has("1.2", "2.25.1", "DICOMweb http://x") and len(again.done) == 1
    again.add("1.3", "2.25.2", "DICOMweb http://x")
    assert Ledger(path).done == {("1.2", "2.25.1", "DICOMweb http://x"), ("1.3", "2.25.2", "DICOMweb http://x")}
