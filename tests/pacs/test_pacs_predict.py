"""``mmai predict --dicomweb / --dimse`` against a real Orthanc: the same case ids and probabilities as
``--dicom-root`` on the same files, one SR per study holding them, reruns that add nothing, a corrupt
instance and an unreachable server (issue 14)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from mmai.pacs.sr import derived_uid
from tests.inference.predict_world import World
from tests.pacs.helpers import case_dirs, result_srs, sr_table, study_of_case, upload
from tests.pacs.orthanc import Orthanc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pacs(orthanc: Orthanc, world: World) -> Orthanc:
    """The world's 24 studies on the server: the first half sent by STOW-RS, the rest by C-STORE."""
    orthanc.clear()
    dirs = case_dirs(world.cohort)
    n = upload(orthanc, dirs[:12], "stow") + upload(orthanc, dirs[12:], "cstore")
    assert len(orthanc.instances()) == n == sum(len(list(d.glob("*.dcm"))) for d in dirs)
    return orthanc


@pytest.fixture(scope="module")
def folder(world: World) -> pd.DataFrame:
    """Folder prediction of the same files with the same clinical table (the acceptance reference)."""
    out = world.tmp / "pacs_folder_reference.csv"
    if not out.exists():
        assert world.predict(out, "--dicom-root", str(world.cohort / "images"), "--clinical",
                             str(world.cohort / "clinical.csv")) == 0
    return pd.read_csv(out).set_index("case_id").sort_index()


def _check_same(got: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert list(got.index) == list(ref.index)
    np.testing.assert_allclose(got[["prob_0", "prob_1"]], ref[["prob_0", "prob_1"]], atol=1e-4)
    assert (got["prediction"] == ref["prediction"]).all()
    assert (got["clinical_present"] == ref["clinical_present"]).all()


def test_dicomweb_predict_matches_folder_and_stores_one_sr_per_study(pacs, world, folder, tmp_path):
    n_before = len(pacs.instances())
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical",
                         str(world.cohort / "clinical.csv"), "--store-results") == 0
    got = pd.read_csv(out).set_index("case_id").sort_index()
    _check_same(got, folder)
    assert not (tmp_path / "p.errors.csv").exists()
    assert not (tmp_path / "p.cache").exists()  # every study's files removed once done
    assert len(pacs.instances()) == n_before + 24  # one SR per study

    srs = sr_table(result_srs(pacs)).set_index("study_uid")
    studies = study_of_case(world.cohort)
    for case_id, row in got.iterrows():
        sr = srs.loc[studies[case_id]]
        assert sr["prob_1"] == pytest.approx(folder.loc[case_id, "prob_1"], abs=1e-4)  # the acceptance rule
        assert sr["prob_1"] == pytest.approx(row["prob_1"], abs=1e-6)
        assert sr["prob_0"] == pytest.approx(row["prob_0"], abs=1e-6)
        assert str(sr["prediction"]) == str(row["prediction"])
        assert sr["clinical_present"] == row["clinical_present"] and sr["model_id"] == row["model_id"]
    src = pydicom.dcmread(next(case_dirs(world.cohort)[0].glob("*.dcm")), stop_before_pixels=True)
    assert srs.loc[str(src.StudyInstanceUID), "series_uid"] == str(src.SeriesInstanceUID)  # the series it read

    # a rerun into a fresh output predicts and sends again: the same UIDs, so nothing is added
    again = tmp_path / "again.csv"
    assert world.predict(again, "--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical",
                         str(world.cohort / "clinical.csv"), "--store-results") == 0
    assert len(pacs.instances()) == n_before + 24
    # the same output again: every study is skipped (row written and SR stored)
    before = out.read_text()
    assert world.predict(out, "--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical",
                         str(world.cohort / "clinical.csv"), "--store-results") == 0
    assert out.read_text() == before and len(pacs.instances()) == n_before + 24


def test_killed_run_resumes_without_duplicates(pacs, world, folder, tmp_path):
    out = tmp_path / "p.csv"
    args = ["--dicomweb", pacs.dicomweb, "--query", "StudyDate=19000101-", "--clinical",
            str(world.cohort / "clinical.csv"), "--store-results"]
    assert world.predict(out, *args) == 0
    n_after = len(pacs.instances())
    # what a kill leaves: 10 rows (the last one torn) and 7 SRs recorded as stored
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:10]) + lines[10][:15])
    ledger = tmp_path / "p.stored.csv"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:8]))
    assert world.predict(out, *args) == 0
    got = pd.read_csv(out).set_index("case_id").sort_index()
    _check_same(got, folder)
    assert len(pd.read_csv(ledger)) == 24
    assert len(pacs.instances()) == n_after


def test_a_run_killed_for_real_resumes_without_duplicates(pacs, world, folder, tmp_path):
    """SIGKILL a ``mmai predict --store-results`` process once its first rows are written (its retrieval
    threads, preparing processes and store thread in flight): no process of it is left; rerun it: every
    study predicted once, every SR recorded once, one SR per study on the server, no cache left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "p.csv"
    args = ["--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical",
            str(world.cohort / "clinical.csv"), "--store-results"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mmai", "predict", "--run", str(world.run), "--out", str(out),
                             "-q", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = tmp_path / "p.stored.csv"

    def lines(path: Path) -> int:
        return path.read_bytes().count(b"\n") - 1 if path.exists() else 0  # rows below the header

    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and lines(out) < 1:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    if Path("/proc").is_dir():  # its preparing processes die with it (none left waiting for work)
        def left() -> list[str]:
            found = []
            for d in Path("/proc").iterdir():
                try:
                    if d.name.isdigit() and str(out).encode() in (d / "cmdline").read_bytes():
                        found.append(d.name)
                except OSError:
                    pass
            return found

        for _ in range(100):
            if not left():
                break
            time.sleep(0.1)
        assert left() == []
    if lines(out) >= 24 and lines(ledger) >= 24:
        pytest.skip("killed after its work was done")
    assert world.predict(out, *args) == 0
    got = pd.read_csv(out).set_index("case_id").sort_index()
    _check_same(got, folder)  # every study once, the same values
    stored = pd.read_csv(ledger)
    assert len(stored) == len(stored.drop_duplicates()) and stored["study_uid"].nunique() == 24
    srs = sr_table(result_srs(pacs))
    assert srs["study_uid"].is_unique and set(study_of_case(world.cohort).values()) <= set(srs["study_uid"])
    assert not (tmp_path / "p.cache").exists()


def test_dimse_cget_and_cmove_match_folder(pacs, world, folder, tmp_path):
    studies = study_of_case(world.cohort)
    picked = ["case0001", "case0013", "case0020"]
    pd.DataFrame({"StudyInstanceUID": [studies[c] for c in picked]}).to_csv(tmp_path / "s.csv", index=False)
    for name, extra in (("get", ["--workers", "1"]),  # 1: no preparing processes, volumes loaded in place
                        ("move", ["--move-port", str(pacs.move_port), "--calling-aet", "MMAI"])):
        out = tmp_path / f"{name}.csv"
        assert world.predict(out, "--dimse", pacs.dimse, "--studies", str(tmp_path / "s.csv"), "--clinical",
                             str(world.cohort / "clinical.csv"), *extra) == 0
        got = pd.read_csv(out).set_index("case_id").sort_index()
        _check_same(got, folder.loc[picked])


def test_dry_run_writes_sr_files_with_only_source_identifiers(pacs, world, tmp_path):
    n_before = len(pacs.instances())
    out = tmp_path / "p.csv"
    assert world.predict(out, "--dicomweb", pacs.dicomweb, "--query", "PatientID=P0003", "--store-results",
                         "--dry-run", "--explain", str(tmp_path / "explain")) == 0
    assert len(pacs.instances()) == n_before  # nothing sent
    kinds = {"1.2.840.10008.5.1.4.1.1.88.33": "SR", "1.2.840.10008.5.1.4.1.1.30": "PM", "1.2.840.10008.5.1.4.1.1.7": "SC"}
    objects = {kinds[str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)]: f
               for f in (tmp_path / "p.dicom").rglob("*.dcm")}
    assert sorted(objects) == ["PM", "SC", "SR"]  # the SR, the saliency parametric map and its overlay
    pm = pydicom.dcmread(objects["PM"])
    n_src = len(list((world.cohort / "images" / "case0003").glob("*.dcm")))
    assert pm.NumberOfFrames == n_src and 0 < float(np.asarray(pm.pixel_array).max()) <= 1.0
    assert list((tmp_path / "explain").glob("*_saliency.nii.gz"))
    files = [objects["SR"]]
    sr = pydicom.dcmread(files[0])
    src = pydicom.dcmread(next((world.cohort / "images" / "case0003").glob("*.dcm")), stop_before_pixels=True)
    assert sr.SOPInstanceUID == derived_uid(src.StudyInstanceUID, pd.read_csv(out)["model_id"][0], "sr")
    for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "AccessionNumber"):
        assert str(sr.get(key, "")) == str(src.get(key, "")), key
    person_names = {str(e.value) for e in sr.iterall() if e.VR == "PN" and str(e.value)}
    assert person_names <= {str(src.get("PatientName", "")), str(src.get("ReferringPhysicianName", ""))}
    text = files[0].read_bytes()
    assert pd.read_csv(out)["case_id"][0].encode() not in text  # no mmai case id / pseudonym in the SR


def test_preprocess_from_pacs_matches_the_folder(pacs, world, tmp_path):
    assert pd.read_csv(world.pre / "manifest.csv").shape[0] == 24
    out = tmp_path / "pre"
    from mmai.cli import main

    assert main(["preprocess", "--config", str(world.pipe), "--dicomweb", pacs.dicomweb, "--query",
                 "PatientID=P0002", "--out", str(out), "-q"]) == 0
    man = pd.read_csv(out / "manifest.csv")
    assert len(man) == 1
    ref = tmp_path / "ref"
    assert main(["preprocess", "--config", str(world.pipe), "--input",
                 str(world.cohort / "images"), "--out", str(ref), "-q"]) == 0
    ref_man = pd.read_csv(ref / "manifest.csv").set_index("case_id")
    case = man["case_id"][0]
    assert case in ref_man.index
    import nibabel as nib

    a = np.asarray(nib.load(out / man["image"][0]).dataobj)
    b = np.asarray(nib.load(ref / ref_man.loc[case, "image"]).dataobj)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not (out / "pacs_cache").exists()


def test_a_study_that_fails_to_retrieve_is_an_error_row(pacs, world, folder, tmp_path, monkeypatch):
    from mmai.pacs import dicomweb
    from mmai.pacs.retry import PacsError

    lost = study_of_case(world.cohort)["case0005"]
    real = dicomweb.DicomWebSource.retrieve
    calls: list[str] = []

    def flaky(self, study_uid, cache):
        calls.append(study_uid)
        if study_uid == lost:
            raise PacsError(f"{self} retrieve study {study_uid}: HTTP 404 (gave up after 1 attempt(s))")
        return real(self, study_uid, cache)

    monkeypatch.setattr(dicomweb.DicomWebSource, "retrieve", flaky)
    out = tmp_path / "p.csv"
    args = ["--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical", str(world.cohort / "clinical.csv")]
    assert world.predict(out, *args) == 0
    got = pd.read_csv(out).set_index("case_id").sort_index()
    assert "case0005" not in got.index and len(got) == 23
    _check_same(got, folder.drop(index="case0005"))
    err = pd.read_csv(tmp_path / "p.errors.csv")
    assert list(err["case_id"]) == ["case0005"] and err["stage"][0] == "retrieve"
    assert err["series"][0] == f"study {lost}" and "HTTP 404" in err["error"][0]
    # the rerun fetches only the study that failed
    calls.clear()
    monkeypatch.setattr(dicomweb.DicomWebSource, "retrieve", lambda self, s, c: (calls.append(s), real(self, s, c))[1])
    assert world.predict(out, *args) == 0
    assert calls == [lost] and len(pd.read_csv(out)) == 24 and not (tmp_path / "p.errors.csv").exists()


def test_explain_stores_sr_parametric_map_and_overlay_once(pacs, world, tmp_path):
    n_before = len(pacs.instances())
    args = ["--dicomweb", pacs.dicomweb, "--query", "PatientID=P0004", "--store-results"]
    assert world.predict(tmp_path / "a.csv", *args, "--explain", str(tmp_path / "ea")) == 0
    added = len(pacs.instances()) - n_before
    assert added in (2, 3)  # the PM and the overlay, plus the SR unless an earlier test stored it already
    assert world.predict(tmp_path / "b.csv", *args, "--explain", str(tmp_path / "eb")) == 0
    assert len(pacs.instances()) - n_before == added  # the same UIDs: replaced, not added


def test_full_resolution_studies_go_to_the_model_one_by_one_on_the_cores_left(pacs, world, folder, tmp_path,
                                                                                monkeypatch):
    """As for a folder: with ``image.size: null`` (predict_chunk 1) each model call gets one study, so the
    model works while the next studies load, and it runs on the cores the preparing processes leave."""
    import torch

    from mmai.inference import pipelined
    from mmai.inference.predictor import Predictor

    calls: list[tuple[int, int]] = []
    real = Predictor.predict_batch

    def spy(self, df, errors):
        calls.append((len(df), torch.get_num_threads()))
        return real(self, df, errors)

    monkeypatch.setattr(pipelined, "predict_chunk", lambda predictor: 1)  # what size: null gives
    monkeypatch.setattr(Predictor, "predict_batch", spy)
    monkeypatch.setattr(pipelined, "usable_cores", lambda: 3)  # 2 preparing processes leave 1 core
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = tmp_path / "p.csv"
        assert world.predict(out, "--dicomweb", pacs.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical",
                             str(world.cohort / "clinical.csv"), "--workers", "2") == 0
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    _check_same(pd.read_csv(out).set_index("case_id").sort_index(), folder)
    assert [n for n, _ in calls] == [1] * 24
    assert {t for _, t in calls} == {1}  # the model's threads while the workers load
    assert after == 3  # given back when the workers stop
