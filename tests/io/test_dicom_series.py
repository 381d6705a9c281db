"""DICOM series writer and loader: write_series round trips, then load_series case by case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mmai.errors import DicomError
from mmai.io.dicom_fastread import read_frame_fast
from mmai.io.dicom_series import load_multiframe, load_series
from mmai.io.dicom_write import write_series
from tests.io import dicom_cases as dc

ORIENTATIONS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": (0.8660254, 0.5, 0.0, -0.3535534, 0.6123724, 0.7071068),
}


def _sitk_read(paths: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    return reader.Execute()


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_write_series_geometry_and_values_match_simpleitk(tmp_path: Path, name: str) -> None:
    """SimpleITK (GDCM) reads back the same origin, spacing, direction and HU values."""
    rng = np.random.default_rng(1)
    vol = rng.integers(-1024, 3000, size=(12, 9, 7)).astype(np.float32)
    iop = ORIENTATIONS[name]
    spacing, origin = (0.7, 0.9, 2.5), (-12.5, 30.25, 101.0)
    paths = write_series(vol, tmp_path / name, spacing=spacing, origin=origin, orientation=iop)
    assert [p.name for p in paths] == [f"IM{k:05d}.dcm" for k in range(1, 8)]
    img = _sitk_read(paths)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-4)
    direction = np.array(img.GetDirection()).reshape(3, 3)  # columns = axis directions (LPS)
    np.testing.assert_allclose(direction[:, 0], row, atol=1e-4)
    np.testing.assert_allclose(direction[:, 1], col, atol=1e-4)
    np.testing.assert_allclose(direction[:, 2], normal, atol=1e-4)
    arr = sitk.GetArrayFromImage(img)  # (K, J, I)
    np.testing.assert_array_equal(arr.transpose(2, 1, 0).astype(np.float32), vol)


def test_write_series_headers(tmp_path: Path) -> None:
    """Headers a validating pydicom accepts: UIDs, PixelSpacing order, rescale, identifying fields."""
    vol = np.full((6, 4, 3), 40.0, dtype=np.float32)
    vol[0, 0, 0] = -1024
    paths = write_series(vol, tmp_path / "s", spacing=(0.5, 0.75, 3.0), modality="MR", patient_id="P42",
                         patient_name="DOE^JANE", series_number=7, series_description="T1 AX",
                         rescale_slope=2.0, rescale_intercept=-1024.0, extra={"EchoTime": 12.5})
    with pydicom.config.strict_reading():
        headers = [pydicom.dcmread(p) for p in paths]
    ds = headers[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len({h.SOPInstanceUID for h in headers}) == 3
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.FrameOfReferenceUID for h in headers}) == 1
    assert [int(h.InstanceNumber) for h in headers] == [1, 2, 3]
    assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.5]  # [row spacing (j), column spacing (i)]
    assert (ds.Rows, ds.Columns) == (4, 6)
    assert float(ds.SliceThickness) == 3.0
    assert ds.PatientID == "P42" and str(ds.PatientName) == "DOE^JANE" and ds.PatientBirthDate
    assert ds.SeriesNumber == 7 and ds.SeriesDescription == "T1 AX" and float(ds.EchoTime) == 12.5
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
    assert ds.PixelRepresentation == 0  # every stored value >= 0 -> uint16
    real = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(real.T, vol[:, :, 0])
    assert [float(h.ImagePositionPatient[2]) for h in headers] == [0.0, 3.0, 6.0]


def test_write_series_signed_when_needed(tmp_path: Path) -> None:
    vol = np.array([-2000.0, 0.0, 500.0]).reshape(3, 1, 1)
    (path,) = write_series(vol, tmp_path / "s")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(ds.pixel_array[0] + float(ds.RescaleIntercept), [-2000, 0, 500])


def test_write_series_rejects_bad_input(tmp_path: Path) -> None:
    vol = np.zeros((4, 4, 2))
    with pytest.raises(DicomError, match="modality 'XA'"):
        write_series(vol, tmp_path, modality="XA")
    with pytest.raises(DicomError, match="orthonormal"):
        write_series(vol, tmp_path, orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(DicomError, match="InstanceNumber"):
        write_series(vol, tmp_path, extra={"InstanceNumber": 3})
    with pytest.raises(DicomError, match="NotAKeyword"):
        write_series(vol, tmp_path, extra={"NotAKeyword": 3})
    with pytest.raises(DicomError, match=r"\[0, 65535\]"):
        write_series(np.full((2, 2, 1), 1e6), tmp_path)


# ============================================================================ load_series
# Reference tools: dcm2niix (the converter users trust; compared in world space with
# dicom_cases.world_match), SimpleITK for per-slice geometry, and the analytic truth the fixture
# wrote. docs/dicom.md explains which reference each case uses and why.


def _check_against_dcm2niix(vol, folder: Path, out: Path, *, name: str | None = None, atol: float = 0.0,
                            volume: int = 0) -> None:
    images = dict(dc.dcm2niix(folder, out))
    img = images[name] if name else next(iter(images.values()))
    ours, ref = dc.world_match(vol.array, vol.affine, img, volume=volume)  # grids agree within 1e-3 mm
    assert ours.size >= 0.5 * vol.array.size
    np.testing.assert_allclose(ours, ref, atol=atol)


@pytest.mark.parametrize("orientation", ["AXIAL", "SAGITTAL", "CORONAL", "OBLIQUE"])
def test_single_series_matches_truth_and_dcm2niix(tmp_path: Path, orientation: str) -> None:
    case = dc.series(tmp_path / "s", orientation=getattr(dc, orientation))
    vol = load_series(case.files)
    np.testing.assert_array_equal(vol.array, case.volume)
    np.testing.assert_allclose(vol.affine, case.affine, atol=1e-6)
    assert vol.warnings == []
    assert vol.meta["orientation"] == orientation.lower()
    assert vol.meta["spacing"] == pytest.approx(list(dc.SPACING))
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(vol.meta)
    _check_against_dcm2niix(vol, tmp_path / "s", tmp_path / "nii")


def test_file_order_and_instance_numbers_do_not_matter(tmp_path: Path) -> None:
    """Sorting is along the normal: reversed/shuffled files and scrambled InstanceNumbers agree."""
    case = dc.series(tmp_path / "s", orientation=dc.OBLIQUE)
    dc.rewrite(case.files, lambda ds, k: setattr(ds, "InstanceNumber", (7 * k) % 20 + 1))
    ref = load_series(case.files)
    shuffled = list(np.random.default_rng(3).permutation(case.files))
    for files in (case.files[::-1], shuffled):
        vol = load_series(files)
        np.testing.assert_array_equal(vol.array, ref.array)
        np.testing.assert_array_equal(vol.affine, ref.affine)
    np.testing.assert_array_equal(ref.array, case.volume)


@pytest.mark.parametrize("builder", ["series", "signed_12bit", "monochrome1", "implicit_vr", "per_slice_rescale",
                                     "long_header"])
def test_fast_path_is_bit_identical_to_pydicom(tmp_path: Path, builder: str) -> None:
    case = getattr(dc, builder)(tmp_path / "s")
    assert read_frame_fast(str(case.files[0])) is not None  # the fast path handles this case
    fast = load_series(case.files)
    slow = load_series(case.files, fast=False)
    assert fast.array.dtype == slow.array.dtype
    np.testing.assert_array_equal(fast.array, slow.array)
    np.testing.assert_array_equal(fast.affine, slow.affine)
    np.testing.assert_array_equal(fast.array, case.volume)


def test_fast_path_on_pydicom_test_files() -> None:
    """Every file of pydicom's own test data that the fast path accepts decodes to exactly
    pydicom's pixel_array (the rest fall back to pydicom)."""
    import warnings

    root = Path(pydicom.__file__).parent / "data" / "test_files"
    accepted = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            frame = read_frame_fast(str(path))
            if frame is None:
                continue
            accepted += 1
            np.testing.assert_array_equal(frame.read_stored(), pydicom.dcmread(path).pixel_array, err_msg=str(path))
    assert accepted >= 20


@pytest.mark.parametrize("builder", ["big_endian", "no_preamble"])
def test_unusual_files_fall_back_to_pydicom(tmp_path: Path, builder: str) -> None:
    """Big-endian files and raw data sets (no preamble/file meta) load correctly via pydicom."""
    case = getattr(dc, builder)(tmp_path / "s")
    assert read_frame_fast(str(case.files[0])) is None
    vol = load_series(case.files)
    np.testing.assert_array_equal(vol.array, case.volume)
    np.testing.assert_allclose(vol.affine, case.affine, atol=1e-6)


def test_rescale_sign_and_bits(tmp_path: Path) -> None:
    """Per-slice slope/intercept and signed 12-bit data agree with dcm2niix; MONOCHROME1 is
    inverted as SimpleITK does."""
    for builder in ("per_slice_rescale", "signed_12bit"):
        case = getattr(dc, builder)(tmp_path / builder)
        vol = load_series(case.files)
        np.testing.assert_array_equal(vol.array, case.volume)
        _check_against_dcm2niix(vol, tmp_path / builder, tmp_path / f"{builder}_nii", atol=1e-3)
    # MONOCHROME1: dcm2niix keeps the raw stored values; SimpleITK (GDCM) inverts, like mmai.
    case = dc.monochrome1(tmp_path / "m1")
    vol = load_series(case.files)
    np.testing.assert_array_equal(vol.array, case.volume)
    ref = sitk.GetArrayFromImage(_sitk_read(case.files)).transpose(2, 1, 0)
    np.testing.assert_array_equal(vol.array, ref)


def test_native_dtype(tmp_path: Path) -> None:
    case = dc.series(tmp_path / "s")
    vol = load_series(case.files, dtype="native")
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, case.volume)
    big = dc.phantom((4, 4, 3))
    big[0, 0, 2] = 40000.0  # stored 41024 as uint16: the real value needs int32
    vol = load_series(write_series(big, tmp_path / "big"), dtype="native")
    assert vol.array.dtype == np.int32
    np.testing.assert_array_equal(vol.array, big)
    case = dc.per_slice_rescale(tmp_path / "r")
    vol = load_series(case.files, dtype="native")
    assert vol.array.dtype == np.float32 and any("native" in w for w in vol.warnings)


def test_missing_slice(tmp_path: Path) -> None:
    """Default: resampled onto the uniform grid (dcm2niix's _Eq); error and keep on request."""
    case = dc.missing_slice(tmp_path / "s", drop=7)
    res = load_series(case.files)
    assert res.array.shape == (32, 24, 20) and res.meta["resampled"] and res.meta["geometry"] == "resampled"
    assert res.meta["problems"] == ["missing slices"]
    assert "116.000->121.000" not in res.warnings[0]  # a whole missing slice is not an uneven step
    assert res.warnings[0].startswith("missing slices: 19 slices") and "image.dicom.uneven: error" in res.warnings[0]
    np.testing.assert_allclose(res.affine, case.affine, atol=1e-6)
    np.testing.assert_allclose(res.array[:, :, 7], (case.volume[:, :, 6] + case.volume[:, :, 8]) / 2, atol=1e-3)
    # dcm2niix writes the equidistant version as *_Eq_1.nii (rounded to int16: atol 0.5).
    _check_against_dcm2niix(res, tmp_path / "s", tmp_path / "nii", name="1_1_Eq_1.nii", atol=0.5 + 1e-3)
    with pytest.raises(DicomError, match=r"IM00001\.dcm \+18 files\): missing slices.*image\.dicom\.uneven: error"):
        load_series(case.files, uneven="error")
    kept = load_series(case.files, uneven="keep")
    assert kept.array.shape == (32, 24, 19) and kept.meta["geometry"] == "irregular"
    assert kept.meta["slice_positions_mm"][6:8] == [15.0, 20.0]
    assert "image.dicom.uneven: keep" in kept.warnings[0]


def test_uneven_spacing(tmp_path: Path) -> None:
    case = dc.uneven_series(tmp_path / "s")
    res = load_series(case.files)
    assert res.meta["problems"] == ["uneven spacing"] and "(4.000)" in res.warnings[0]
    assert res.array.shape == (32, 24, 21)
    assert res.meta["spacing"][2] == pytest.approx(49.0 / 20)
    _check_against_dcm2niix(res, tmp_path / "s", tmp_path / "nii", name="1_1_Eq_1.nii", atol=0.5 + 1e-3)
    assert load_series(case.files, uneven="keep").array.shape[2] == 20


def test_gantry_tilt_shear_places_every_slice_where_the_file_says(tmp_path: Path) -> None:
    """tilt='shear': voxel (0, 0, k) lands on slice k's ImagePositionPatient as SimpleITK reads it
    file by file; SimpleITK's series reader (orthogonal grid) misplaces the last slice."""
    case = dc.tilted_series(tmp_path / "s", tilt_deg=15.0)
    vol = load_series(case.files)
    assert vol.meta["tilt_deg"] == pytest.approx(15.0, abs=1e-3) and "gantry tilt" in vol.warnings[0]
    np.testing.assert_allclose(vol.affine, case.affine, atol=1e-6)
    np.testing.assert_array_equal(vol.array, case.volume)
    for k, path in enumerate(case.files):
        img = sitk.ReadImage(str(path))
        ras = vol.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(ras[:3] * [-1, -1, 1], img.GetOrigin(), atol=1e-3)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img)[0].T, vol.array[:, :, k])
    series_img = _sitk_read(case.files)
    last = series_img.TransformIndexToPhysicalPoint((0, 0, len(case.files) - 1))
    assert np.linalg.norm(np.subtract(last, sitk.ReadImage(str(case.files[-1])).GetOrigin())) > 1.0


def test_gantry_tilt_resample_matches_simpleitk_resample(tmp_path: Path) -> None:
    """tilt='resample': every output slice equals SimpleITK's linear resampling of that file's
    slice onto the orthogonal grid (dcm2niix's *_Tilt_1.nii is ~0.9 voxel off; docs/dicom.md)."""
    case = dc.tilted_series(tmp_path / "s", tilt_deg=15.0)
    vol = load_series(case.files, tilt="resample")
    assert vol.array.shape == (32, 39, 20)  # grown in j so no acquired voxel is lost (like dcm2niix)
    aff = vol.affine
    np.testing.assert_allclose(aff[:3, :3], np.diag([-0.8, -0.9, 2.5]), atol=1e-6)  # orthogonal
    for k, path in enumerate(case.files):
        src = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat64)
        origin = (aff @ np.array([0, 0, k, 1.0]))[:3] * [-1, -1, 1]
        ref = sitk.Image([vol.array.shape[0], vol.array.shape[1], 1], sitk.sitkFloat64)
        ref.SetOrigin(origin.tolist())
        ref.SetSpacing((0.8, 0.9, 2.5))
        out = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, -1e9))[0].T
        inside = out > -1e8
        assert inside.mean() > 0.5
        np.testing.assert_allclose(vol.array[:, :, k][inside], out[inside], atol=1e-3)


def test_duplicate_positions_are_refused_with_the_way_out(tmp_path: Path) -> None:
    """Two interleaved phases: load_series refuses and names the way out (the scan's splitter,
    used by load_volume's select={'phase': n}; tests/io/test_reader.py loads each phase)."""
    case = dc.two_phases(tmp_path / "s")
    with pytest.raises(DicomError, match=r"share one position.*select=\{'phase': n\}"):
        load_series(case.files)


def test_localizer_in_the_list_is_dropped(tmp_path: Path) -> None:
    case = dc.with_localizer(tmp_path / "s")
    vol = load_series(sorted((tmp_path / "s").glob("*.dcm")))
    np.testing.assert_array_equal(vol.array, case.volume)
    assert any("localizer" in w for w in vol.warnings)


def test_mixed_series_is_an_error(tmp_path: Path) -> None:
    dc.series(tmp_path / "s")
    dc.series(tmp_path / "s", file_prefix="SAG", orientation=dc.SAGITTAL, shape=(32, 24, 5))
    with pytest.raises(DicomError, match="ImageOrientationPatient"):
        load_series(sorted((tmp_path / "s").glob("*.dcm")))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe_matches_truth_and_dcm2niix(tmp_path: Path, modality: str) -> None:
    folder = tmp_path / "mf"
    folder.mkdir()
    orientation = dc.AXIAL if modality == "CT" else dc.OBLIQUE
    n_t = 1 if modality == "CT" else 2
    cases = dc.enhanced(folder / "mf.dcm", modality=modality, n_temporal=n_t, orientation=orientation)
    vols = load_multiframe(folder / "mf.dcm")
    assert len(vols) == n_t
    for t, (vol, case) in enumerate(zip(vols, cases, strict=True)):
        np.testing.assert_array_equal(vol.array, case.volume)
        np.testing.assert_allclose(vol.affine, case.affine, atol=1e-6)
        _check_against_dcm2niix(vol, folder, tmp_path / f"nii{t}", volume=t)
    if n_t == 1:
        np.testing.assert_array_equal(load_series([folder / "mf.dcm"]).array, vols[0].array)
    else:
        with pytest.raises(DicomError, match="load_multiframe"):
            load_series([folder / "mf.dcm"])


def test_enhanced_multiframe_per_phase_rescale(tmp_path: Path) -> None:
    cases = dc.enhanced(tmp_path / "mf.dcm", modality="CT", n_temporal=2, intercept_step=-100.0)
    vols = load_multiframe(tmp_path / "mf.dcm")
    assert [v.meta["stack"] for v in vols] == ["stack 1, temporal 1", "stack 1, temporal 2"]
    for vol, case in zip(vols, cases, strict=True):
        np.testing.assert_array_equal(vol.array, case.volume)


def test_enhanced_multiframe_split_by_other_dimension(tmp_path: Path) -> None:
    """Phases told apart only by a DimensionIndexSequence entry (a b-value) are split too."""
    cases = dc.enhanced(tmp_path / "mf.dcm", modality="MR", n_temporal=3, phase_by="diffusion")
    vols = load_multiframe(tmp_path / "mf.dcm")
    assert [v.meta["stack"] for v in vols] == [f"stack 1, dimension index [{t}]" for t in (1, 2, 3)]
    for vol, case in zip(vols, cases, strict=True):
        np.testing.assert_array_equal(vol.array, case.volume)


@pytest.mark.parametrize("syntax", ["rle", "jpeg-lossless", "jpegls", "jpeg2000"])
def test_compressed_series(tmp_path: Path, syntax: str) -> None:
    case = dc.compressed(tmp_path / "s", syntax)
    assert read_frame_fast(str(case.files[0])) is None  # goes through pydicom's decoders
    vol = load_series(case.files)
    np.testing.assert_array_equal(vol.array, case.volume)
    assert vol.meta["transfer_syntax"] == case.notes["transfer_syntax"]
    _check_against_dcm2niix(vol, tmp_path / "s", tmp_path / "nii")


def test_undecodable_transfer_syntax_names_file_and_syntax(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate

    case = dc.series(tmp_path / "s", shape=(8, 8, 3))

    def to_mpeg2(ds: pydicom.Dataset, k: int) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        ds.PixelData = encapsulate([b"\x00\x01" * 16])
    dc.rewrite(case.files[:1], to_mpeg2)
    with pytest.raises(DicomError, match=r"IM00001\.dcm.*1\.2\.840\.10008\.1\.2\.4\.100"):
        load_series(case.files)


def test_bad_options_list_the_choices(tmp_path: Path) -> None:
    case = dc.series(tmp_path / "s", shape=(4, 4, 2))
    with pytest.raises(DicomError, match=r"image\.dicom\.uneven = 'warn'.*\['resample', 'error', 'keep'\]"):
        load_series(case.files, uneven="warn")
    with pytest.raises(DicomError, match=r"image\.dicom\.spacing_tolerance = 0\.7"):
        load_series(case.files, policy={"spacing_tolerance": 0.7})
    with pytest.raises(DicomError, match="empty"):
        load_series([])


@pytest.mark.parametrize("kind", ["temporal", "diffusion", "two_orientations", "two_stacks"])
def test_multiframe_split_is_the_scans_split(tmp_path: Path, kind: str) -> None:
    """One splitter: the frames the loader groups into each stack of an enhanced multi-frame
    file are exactly the frames the scan assigns to each stack (what convert and the reader load)."""
    from mmai.io.dicom_multiframe import split_frames
    from mmai.io.dicom_scan import scan_stacks
    from mmai.io.dicom_series import read_frames
    from tests.io.test_dicom_scan import AXIAL, SAGITTAL, write_enhanced

    path = tmp_path / "mf.dcm"
    if kind == "temporal":
        dc.enhanced(path, n_temporal=2)
    elif kind == "diffusion":
        dc.enhanced(path, modality="MR", n_temporal=3, phase_by="diffusion")
    else:
        write_enhanced(path, n_per_stack=3, orientations=[AXIAL, SAGITTAL if kind == "two_orientations" else AXIAL])
    loader = sorted(sorted(f.frame_index for f in st.frames) for st in split_frames(read_frames(path, fast=False)))
    scan = sorted(sorted(s.frames) for s in scan_stacks(tmp_path) if s.frames is not None)
    assert loader == scan and len(loader) == {"temporal": 2, "diffusion": 3}.get(kind, 2)
