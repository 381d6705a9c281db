"""scan_tree / scan_stacks: grouping by study+series and every stack-splitting rule."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from mmai.io.dicom_scan import (
    INDEX_COLUMNS,
    orientation_label,
    scan,
    scan_stacks,
    scan_tree,
    spacing_problems,
)
from mmai.io.dicom_write import write_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def make_series(out: Path, *, k: int = 6, size: tuple[int, int] = (8, 8), prefix: str = "IM",
                **kw) -> list[Path]:
    """A tiny CT series (I, J, K) = (size[0], size[1], k) via A2's writer."""
    rng = np.random.default_rng(k)
    vol = rng.integers(-100, 100, size=(size[0], size[1], k)).astype(np.float32)
    kw.setdefault("spacing", (0.8, 0.8, 2.0))
    kw.setdefault("patient_id", "PID-12345")
    kw.setdefault("patient_name", "Doe^Jane")
    return write_series(vol, out, file_prefix=prefix, **kw)


def rows_of(df, **eq):
    sel = df
    for k, v in eq.items():
        sel = sel[sel[k] == v]
    return sel


def test_two_series_one_folder_and_two_studies(tmp_path: Path) -> None:
    study = generate_uid()
    make_series(tmp_path / "a", k=5, study_uid=study, series_number=1, series_description="one", prefix="A")
    make_series(tmp_path / "a", k=7, study_uid=study, series_number=2, series_description="two", prefix="B")
    make_series(tmp_path / "b", k=4, series_number=1, series_description="other study")
    df = scan_tree(tmp_path)
    assert list(df.columns[: len(INDEX_COLUMNS)]) == INDEX_COLUMNS
    assert len(df) == 3
    assert sorted(df.n_instances) == [4, 5, 7]
    assert df.study_uid.nunique() == 2
    assert set(df.orientation) == {"axial"}
    assert (df.problems == "").all(), df.problems.tolist()
    two = rows_of(df, series_description="two").iloc[0]
    assert two.rows == 8 and two.cols == 8 and two.spacing == pytest.approx(2.0)
    assert Path(two.path) == tmp_path / "a"


def test_localizer_by_image_type_and_lone_slice(tmp_path: Path) -> None:
    series = generate_uid()
    study = generate_uid()
    make_series(tmp_path, k=10, series_uid=series, study_uid=study, prefix="AX")
    make_series(tmp_path, k=1, series_uid=series, study_uid=study, prefix="LOC",
                extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    make_series(tmp_path, k=1, series_uid=series, study_uid=study, prefix="COR", orientation=CORONAL)
    stacks = scan_stacks(tmp_path)
    assert len(stacks) == 3
    main = [s for s in stacks if not s.row["is_localizer"]]
    assert len(main) == 1 and main[0].row["n_instances"] == 10 and main[0].row["problems"] == ""
    locs = [s for s in stacks if s.row["is_localizer"]]
    assert {s.row["orientation"] for s in locs} == {"axial", "coronal"}
    assert all("localizer" in s.row["problems"].split(";") for s in locs)


def test_triplane_scout_series_is_all_localizers(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    for name, ori in (("AX", AXIAL), ("COR", CORONAL), ("SAG", SAGITTAL)):
        make_series(tmp_path, k=1, series_uid=series, study_uid=study, prefix=name, orientation=ori)
    df = scan_tree(tmp_path)
    assert len(df) == 3 and df.is_localizer.all()
    assert sorted(df.orientation) == ["axial", "coronal", "sagittal"]


@pytest.mark.parametrize("key", ["AcquisitionNumber", "TemporalPositionIdentifier", "EchoNumbers", "TriggerTime"])
def test_two_phases_same_positions(tmp_path: Path, key: str) -> None:
    series, study = generate_uid(), generate_uid()
    for v in (1, 2):
        make_series(tmp_path, k=6, series_uid=series, study_uid=study, prefix=f"P{v}_", extra={key: v})
    df = scan_tree(tmp_path)
    assert len(df) == 2
    assert sorted(df.phase_index) == [1, 2]
    assert (df.n_instances == 6).all()
    assert all("2 phases" in p.split(";") for p in df.problems)
    assert set(df.phase_key) == {key}


def test_phases_without_key_split_by_instance_order(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    make_series(tmp_path, k=4, series_uid=series, study_uid=study, prefix="A")
    make_series(tmp_path, k=4, series_uid=series, study_uid=study, prefix="B")
    df = scan_tree(tmp_path)
    assert len(df) == 2
    assert all("phases split by instance order" in p for p in df.problems)


def test_different_orientation_and_mixed_sizes_split(tmp_path: Path) -> None:
    series, study = generate_uid(), generate_uid()
    make_series(tmp_path, k=6, series_uid=series, study_uid=study, prefix="AX")
    make_series(tmp_path, k=5, series_uid=series, study_uid=study, prefix="SAG", orientation=SAGITTAL)
    make_series(tmp_path, k=4, size=(12, 10), series_uid=series, study_uid=study, prefix="BIG",
                origin=(0.0, 0.0, 100.0))
    df = scan_tree(tmp_path)
    assert len(df) == 3
    got = sorted(zip(df.orientation, df.n_instances, df.rows, df.cols, strict=True))
    assert got == [("axial", 4, 10, 12), ("axial", 6, 8, 8), ("sagittal", 5, 8, 8)]
    assert all("series has 3 stacks" in p for p in df.problems)
    assert not df.is_localizer.any()


def test_dicomdir_and_non_dicom_files_are_skipped_and_counted(tmp_path: Path) -> None:
    make_series(tmp_path / "s", k=3)
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("DICOMDIR", read=False), tmp_path / "DICOMDIR")
    (tmp_path / "notes.txt").write_text("not dicom at all\n")
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "s" / "thumbs.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    res = scan(tmp_path)
    assert res.n_dicomdir == 1
    assert res.n_non_dicom == 3
    assert len(res.stacks) == 1 and res.stacks[0].row["n_instances"] == 3
    df = scan_tree(tmp_path)
    assert df.attrs["n_non_dicom"] == 3 and df.attrs["n_dicomdir"] == 1


def test_missing_slice_uneven_spacing_and_tilt(tmp_path: Path) -> None:
    files = make_series(tmp_path / "gap", k=8)
    files[3].unlink()
    df = scan_tree(tmp_path / "gap")
    assert df.problems.iloc[0] == "missing slices" and df.n_missing.iloc[0] == 1
    ipps = np.array([[0, 0, 0], [0, 0, 2], [0, 0, 4], [0, 0, 7], [0, 0, 9]], float)
    geo = spacing_problems(ipps, AXIAL)
    assert geo["uneven"] and geo["n_missing"] == 0
    tilted = np.array([[0, 0.5 * k, 2.0 * k] for k in range(6)], float)
    assert spacing_problems(tilted, AXIAL)["tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.25)), abs=1e-3)


def test_tilted_series_flagged(tmp_path: Path) -> None:
    # Each slice written as its own one-slice series part with a shifted origin = gantry tilt.
    series, study = generate_uid(), generate_uid()
    for k in range(5):
        make_series(tmp_path, k=1, series_uid=series, study_uid=study, prefix=f"T{k}_",
                    origin=(0.0, 0.7 * k, 2.5 * k))
    row = scan_tree(tmp_path).iloc[0]
    assert "gantry tilt" in row.problems.split(";")
    assert row.tilt_deg > 10


def test_truncated_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    files = make_series(tmp_path, k=4, size=(32, 32))
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 500])
    files[2].write_bytes(data[:200])  # header cut: unreadable
    df = scan_tree(tmp_path)
    problems = ";".join(df.problems)
    assert f"unreadable: {files[1].name}: pixel data truncated" in problems
    bad = df[df.kind == "unreadable"]
    assert len(bad) <= 1  # a file cut inside its header is either unreadable or missing its geometry
    assert files[2].name in problems


def test_orientation_labels() -> None:
    assert orientation_label(AXIAL) == "axial"
    assert orientation_label(CORONAL) == "coronal"
    assert orientation_label(SAGITTAL) == "sagittal"
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    assert orientation_label((1, 0, 0, 0, c, s)) == "oblique"
    assert orientation_label(None) == ""


def test_no_phi_in_index_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_series(tmp_path / "s", k=3, patient_id="PID-777-SECRET", patient_name="Secret^Person")
    caplog.set_level(logging.DEBUG)
    df = scan_tree(tmp_path)
    out = tmp_path / "index.csv"
    df.to_csv(out, index=False)
    text = out.read_text() + caplog.text
    for phi in ("PID-777-SECRET", "Secret", "19700101"):
        assert phi not in text
    assert df.patient_id.iloc[0].startswith("p-")
    df2 = scan_tree(tmp_path, include_phi=True)
    assert df2.patient_id.iloc[0] == "PID-777-SECRET"


def test_workers_give_same_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmai.io.dicom_scan_read as reader

    monkeypatch.setattr(reader, "MIN_POOL_FILES", 8)  # make the small tree use the pools
    for i in range(4):
        make_series(tmp_path / f"s{i}", k=20, series_number=i + 1)
    from pydicom import config

    before = config.settings.reading_validation_mode
    a = scan_tree(tmp_path, workers=1)
    b = scan_tree(tmp_path, workers=2)
    assert a.equals(b)
    assert config.settings.reading_validation_mode == before  # the quiet mode is not leaked
    paths = sorted(str(p) for p in tmp_path.rglob("*.dcm"))
    assert reader.read_headers(paths, workers=2, pool="process") == reader.read_headers(paths)
    assert reader.read_headers(paths, workers=2, pool="thread") == reader.read_headers(paths)
    with pytest.raises(Exception, match="pool='fibers'"):
        reader.read_headers(paths, workers=2, pool="fibers")


def test_enhanced_multiframe_two_stacks(tmp_path: Path) -> None:
    path = tmp_path / "mf.dcm"
    write_enhanced(path, n_per_stack=4, orientations=[AXIAL, SAGITTAL])
    stacks = scan_stacks(tmp_path)
    assert len(stacks) == 2
    assert sorted(s.frames for s in stacks) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(s.row["multiframe"] and s.row["path"] == str(path) for s in stacks)
    assert {s.row["orientation"] for s in stacks} == {"axial", "sagittal"}


def write_enhanced(path: Path, *, n_per_stack: int, orientations: list[tuple[float, ...]],
                   rows: int = 8, cols: int = 8) -> None:
    """A minimal enhanced CT multi-frame file: one stack of ``n_per_stack`` frames per orientation."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CT", "PID-MF", "Multi^Frame"
    ds.SeriesNumber, ds.SeriesDescription = 9, "enhanced"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing, pm.SliceThickness = [0.8, 0.8], 2.0
    shared.PixelMeasuresSequence = Sequence([pm])
    tr = Dataset()
    tr.RescaleSlope, tr.RescaleIntercept, tr.RescaleType = 1, 0, "HU"
    shared.PixelValueTransformationSequence = Sequence([tr])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for si, iop in enumerate(orientations):
        normal = np.cross(iop[:3], iop[3:])
        for k in range(n_per_stack):
            item = Dataset()
            pp, po, fc = Dataset(), Dataset(), Dataset()
            pp.ImagePositionPatient = [float(v) for v in normal * 2.0 * k]
            po.ImageOrientationPatient = list(iop)
            fc.StackID = str(si + 1)
            fc.InStackPositionNumber = k + 1
            item.PlanePositionSequence = Sequence([pp])
            item.PlaneOrientationSequence = Sequence([po])
            item.FrameContentSequence = Sequence([fc])
            per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.NumberOfFrames = len(per)
    ds.PixelData = np.arange(len(per) * rows * cols, dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_pydicom_reads_enhanced_fixture(tmp_path: Path) -> None:
    path = tmp_path / "mf.dcm"
    write_enhanced(path, n_per_stack=2, orientations=[AXIAL])
    ds = pydicom.dcmread(path)
    assert ds.pixel_array.shape == (2, 8, 8)


def test_fast_header_path_equals_pydicom_path(tmp_path: Path) -> None:
    import os

    from pydicom.data import get_testdata_files

    from mmai.io.dicom_scan_read import quiet_pydicom, read_header
    from tests.io import dicom_cases as dc

    for name in ("two_phases", "implicit_vr", "monochrome1", "tilted_series"):
        (tmp_path / name).mkdir()
        getattr(dc, name)(tmp_path / name)
    files = [f for f in get_testdata_files() if os.path.isfile(f)] + [str(p) for p in tmp_path.rglob("*.dcm")]
    with quiet_pydicom():
        for f in files:
            assert read_header(f) == read_header(f, fast=False), f


def test_garbage_after_dicm_prefix_is_an_unreadable_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "noise.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.bytes(300))
    (tmp_path / "prefix_only.dcm").write_bytes(b"\0" * 128 + b"DICM")
    make_series(tmp_path / "ok", k=3)
    df = scan_tree(tmp_path)
    bad = df[df.kind == "unreadable"]
    assert sorted(Path(p).name for p in bad.path) == ["noise.dcm", "prefix_only.dcm"]
    assert all(p.startswith("unreadable: ") and ";" not in p for p in bad.problems)
    assert df.attrs["n_unreadable"] == 2
    assert (df[df.kind == "image"].n_instances == 3).all()
