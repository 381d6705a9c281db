"""Fixture builders for DICOM cases, importable by any test (``from tests.io.dicom_cases import ...``).

Each builder writes small files into a folder and returns a :class:`Case`: the files, the
volume that should come back (I, J, K), and the expected voxel -> RAS affine where it is known
analytically. Normal series are written with :func:`mmai.io.dicom_write.write_series`; odd
cases rewrite those files with pydicom (positions, rescale, photometric, compression ...) or
build enhanced multi-frame files by hand. Keep volumes small: the whole suite runs in seconds.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mmai.io.dicom_write import write_series

SHAPE = (32, 24, 20)
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-12.5, 30.25, 101.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
OBLIQUE = (0.8660254, 0.5, 0.0, -0.3535534, 0.6123724, 0.7071068)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Case:
    """A written case: ``files`` in slice order, the volume and affine a correct loader returns."""

    files: list[Path]
    volume: np.ndarray
    affine: np.ndarray | None = None
    folder: Path | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def phantom(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """(I, J, K) float32 HU test volume: a smooth gradient (makes flips visible) plus noise."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    vol = -1000 + 20 * i + 7 * j + 45 * k + rng.integers(0, 50, size=shape)
    return vol.astype(np.float32)


def smooth_phantom(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """(I, J, K) float32 without noise: a steep slice gradient (150 per slice, so a slice placed
    1 mm off shows as tens of HU) plus a smooth in-plane pattern, for the resampled cases (their
    values are interpolated, which noise would blur)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    vol = -1000 + 20 * i + 7 * j + 150 * k + 40 * np.sin(2 * np.pi * i / 16) * np.cos(2 * np.pi * j / 12)
    return np.rint(vol).astype(np.float32)


def expected_affine(spacing: tuple[float, float, float] = SPACING, origin: tuple[float, float, float] = ORIGIN,
                    orientation: tuple[float, ...] = AXIAL, step: np.ndarray | None = None) -> np.ndarray:
    """Voxel -> RAS affine of a write_series volume (``step``: LPS k displacement, default normal*dz)."""
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row * spacing[0], col * spacing[1]
    lps[:3, 2] = normal * spacing[2] if step is None else step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def series(folder: Path, *, orientation: tuple[float, ...] = AXIAL, shape: tuple[int, int, int] = SHAPE,
           seed: int = 0, smooth: bool = False, **kwargs: Any) -> Case:
    """A plain single-frame CT series written by write_series (``smooth``: :func:`smooth_phantom`)."""
    vol = smooth_phantom(shape) if smooth else phantom(shape, seed)
    kwargs.setdefault("spacing", SPACING)
    kwargs.setdefault("origin", ORIGIN)
    files = write_series(vol, folder, orientation=orientation, **kwargs)
    return Case(files, vol, expected_affine(kwargs["spacing"], kwargs["origin"], orientation), folder)


def rewrite(files: list[Path], edit: Callable[[Dataset, int], None], **save_kwargs: Any) -> None:
    """Apply ``edit(ds, k)`` to every file (k = slice index) and save it in place."""
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        edit(ds, k)
        ds.save_as(path, enforce_file_format=True, **save_kwargs)


def set_positions(files: list[Path], positions: list[np.ndarray]) -> None:
    """Overwrite ImagePositionPatient (and SliceLocation) of each file."""
    def edit(ds: Dataset, k: int) -> None:
        ds.ImagePositionPatient = [round(float(v), 6) for v in positions[k]]
        if "SliceLocation" in ds:
            del ds.SliceLocation
    rewrite(files, edit)


def missing_slice(folder: Path, drop: int = 7, **kwargs: Any) -> Case:
    """An axial series with slice ``drop`` deleted (the volume keeps the slice for reference).

    Stored as int16 (intercept 0): dcm2niix only makes equidistant slices from signed data.
    """
    case = series(folder, rescale_intercept=0.0, **kwargs)
    case.files[drop].unlink()
    case.notes["dropped"] = drop
    case.files = case.files[:drop] + case.files[drop + 1:]
    return case


def uneven_series(folder: Path, gaps: tuple[float, ...] = (2.5,) * 9 + (4.0,) + (2.5,) * 9, **kwargs: Any) -> Case:
    """An axial int16 series whose slice gaps vary (positions along z given by ``gaps``)."""
    kwargs.setdefault("shape", SHAPE[:2] + (len(gaps) + 1,))
    case = series(folder, rescale_intercept=0.0, **kwargs)
    z = ORIGIN[2] + np.concatenate([[0.0], np.cumsum(gaps)])
    set_positions(case.files, [np.array([ORIGIN[0], ORIGIN[1], zk]) for zk in z])
    case.notes["z"] = z
    return case


def tilted_series(folder: Path, tilt_deg: float = 15.0, **kwargs: Any) -> Case:
    """Axial CT with gantry tilt: slice k's origin moves along +y (posterior) by k*dz*tan(tilt).

    Stored as int16 (intercept 0): dcm2niix corrects tilt only for signed 16-bit data. The
    GantryDetectorTilt tag gets dcm2niix's sign convention (-tilt for this geometry).
    """
    case = series(folder, rescale_intercept=0.0, **kwargs)
    dz = SPACING[2]
    shift = dz * math.tan(math.radians(tilt_deg))
    set_positions(case.files, [np.array([ORIGIN[0], ORIGIN[1] + k * shift, ORIGIN[2] + k * dz])
                               for k in range(len(case.files))])
    rewrite(case.files, lambda ds, k: setattr(ds, "GantryDetectorTilt", -tilt_deg))
    case.affine = expected_affine(step=np.array([0.0, shift, dz]))
    case.notes["tilt_deg"] = tilt_deg
    return case


def two_step_series(folder: Path) -> Case:
    """24 slices 2.5 mm apart, then 8 slices 5 mm apart (smooth phantom)."""
    return uneven_series(folder, gaps=(2.5,) * 23 + (5.0,) * 8, smooth=True)


def ge_jitter_series(folder: Path, *, tilt_deg: float = 0.022, jitter: bool = True, seed: int = 7) -> Case:
    """A GE-like brain MR: 20 axial slices ~7 mm apart with steps of 6.96-7.07 mm (1.4% jitter;
    median step ~6.97, end-to-end mean ~7.0, so a slice sits up to ~0.2 mm off the uniform grid)
    and a 0.022 degree drift of the slice origins (rounding-size tilt).

    ``jitter=False`` writes an exact 7 mm grid (with the same tiny tilt).
    """
    rng = np.random.default_rng(seed)  # median ~6.97 mm against an end-to-end mean ~7.0 mm, as in the real one
    steps = np.array([6.97] * 6 + [7.07] * 6 + [6.965] * 7) + rng.uniform(-0.005, 0.005, 19)
    steps[3], steps[11] = 6.96, 7.07
    if not jitter:
        steps[:] = 7.0
    case = series(folder, shape=(32, 24, 20), smooth=True, modality="MR", spacing=(0.9, 0.9, 7.0),
                  series_description="AX T2 FLAIR")
    z = np.concatenate([[0.0], np.cumsum(steps)])
    drift = math.tan(math.radians(tilt_deg))
    set_positions(case.files, [np.array([ORIGIN[0], ORIGIN[1] + zk * drift, ORIGIN[2] + zk]) for zk in z])
    case.notes.update(z=z, steps=steps)
    case.affine = None  # not a single analytic affine: checked against the headers
    return case


def feet_first(folder: Path) -> Case:
    """A feet-first axial series: row cosine -x, slices written with z decreasing, PatientPosition FFS."""
    return series(folder, orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), extra={"PatientPosition": "FFS"})


def reversed_instances(folder: Path) -> Case:
    """InstanceNumber counts down while the position goes up (slice order reversed in the files)."""
    case = series(folder)
    rewrite(case.files, lambda ds, k: setattr(ds, "InstanceNumber", len(case.files) - k))
    return case


def per_slice_rescale(folder: Path) -> Case:
    """Each slice has its own RescaleSlope/Intercept; the stored values are re-encoded to match."""
    case = series(folder)
    slopes = [0.5 + 0.25 * (k % 3) for k in range(len(case.files))]
    intercepts = [-1024.0 - 10 * k for k in range(len(case.files))]
    vol = case.volume

    def edit(ds: Dataset, k: int) -> None:
        stored = np.rint((vol[:, :, k].T - intercepts[k]) / slopes[k]).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], intercepts[k]
    rewrite(case.files, edit)
    stored = np.stack([np.rint((vol[:, :, k] - intercepts[k]) / slopes[k]) for k in range(vol.shape[2])], -1)
    case.volume = (stored * np.array(slopes) + np.array(intercepts)).astype(np.float32)
    return case


def monochrome1(folder: Path) -> Case:
    """MONOCHROME1 unsigned 12-bit data (bright = low value); the loader inverts to MONOCHROME2."""
    case = series(folder, rescale_intercept=0.0)  # stored = HU + 1000 offset below
    vol = case.volume + 1000.0  # 0 .. ~2500, fits 12 bits

    def edit(ds: Dataset, k: int) -> None:
        stored = (4095 - vol[:, :, k].T).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    rewrite(case.files, edit)
    case.volume = vol
    return case


def signed_12bit(folder: Path) -> Case:
    """Signed 12-bit stored values with garbage in the unused high bits (must be sign-extended)."""
    case = series(folder)
    vol = np.clip(case.volume, -2048, 2047)

    def edit(ds: Dataset, k: int) -> None:
        stored = vol[:, :, k].T.astype(np.int16)
        raw = (stored.view(np.uint16) & 0x0FFF) | 0x5000  # 12-bit two's complement + junk bits 12..15
        ds.PixelData = raw.astype(np.uint16).tobytes()
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    rewrite(case.files, edit)
    case.volume = vol
    return case


def implicit_vr(folder: Path) -> Case:
    """The plain series saved as Implicit VR Little Endian."""
    case = series(folder)

    def edit(ds: Dataset, k: int) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    rewrite(case.files, edit)
    return case


def compressed(folder: Path, syntax: str) -> Case:
    """The plain series compressed with ``syntax`` ("rle", "jpeg2000", "jpegls", "jpeg-lossless").

    RLE uses pydicom's ``Dataset.compress`` (its native encoder); JPEG-LS, JPEG lossless and
    JPEG 2000 use gdcmconv (python-gdcm's tool; pylibjpeg-openjpeg's encoder rejects 32x24 frames).
    """
    case = series(folder)
    if syntax == "rle":
        rewrite(case.files, lambda ds, k: ds.compress(pydicom.uid.RLELossless))
    else:
        flag = {"jpegls": "--jpegls", "jpeg-lossless": "--jpeg", "jpeg2000": "--j2k"}[syntax]
        tool = shutil.which("gdcmconv") or str(Path(sys.executable).parent / "gdcmconv")
        for path in case.files:
            subprocess.run([tool, flag, str(path), str(path)], check=True, capture_output=True)
    case.notes["transfer_syntax"] = str(pydicom.dcmread(case.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return case


def two_phases(folder: Path) -> Case:
    """Two phases (TemporalPositionIdentifier 1 and 2) of one series sharing every position."""
    uids = {"study_uid": generate_uid(), "series_uid": generate_uid()}
    a = series(folder, **uids, file_prefix="P1_", extra={"TemporalPositionIdentifier": 1}, seed=1)
    b = series(folder, **uids, file_prefix="P2_", extra={"TemporalPositionIdentifier": 2}, seed=2)
    interleaved = [f for pair in zip(a.files, b.files, strict=True) for f in pair]
    return Case(interleaved, a.volume, a.affine, folder, {"phase2": b})


def with_localizer(folder: Path) -> Case:
    """An axial series plus a one-image coronal localizer (its own series) in the same folder."""
    study = generate_uid()
    case = series(folder, study_uid=study)
    write_series(phantom((32, 1, 24), seed=5), folder, spacing=(1.0, 1.0, 1.0), orientation=CORONAL,
                 study_uid=study, series_number=99, file_prefix="LOC", extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    return case


def two_series(folder: Path) -> Case:
    """Two unrelated axial series (different SeriesInstanceUID) in one folder."""
    study = generate_uid()
    a = series(folder, study_uid=study, series_number=2, file_prefix="A", series_description="AX 2.5")
    series(folder, study_uid=study, series_number=3, file_prefix="B", series_description="AX SOFT", seed=3)
    return a


# ----------------------------------------------------------------------------- enhanced multi-frame
def _item(**kwargs: Any) -> Dataset:
    ds = Dataset()
    for k, v in kwargs.items():
        setattr(ds, k, v)
    return ds


def enhanced(path: Path, *, modality: str = "CT", n_temporal: int = 1, orientation: tuple[float, ...] = AXIAL,
             shape: tuple[int, int, int] = (16, 12, 10), slope: float = 1.0, intercept: float = -1024.0,
             reverse: bool = True, intercept_step: float = 0.0, phase_by: str = "temporal") -> list[Case]:
    """One enhanced CT/MR multi-frame file; ``n_temporal`` phases with interleaved frames.

    Geometry lives only in the functional groups: orientation and pixel measures in the shared
    group, position and (per-phase) rescale per frame. Frames are stored in descending position
    when ``reverse`` (the loader must sort them). Phase t's RescaleIntercept is
    ``intercept + t * intercept_step`` (dcm2niix's 4D output has one scaling, so compare it with
    step 0). ``phase_by="diffusion"`` tells phases apart only by a DiffusionBValue dimension
    (no TemporalPositionIndex). Returns one Case per phase (same ``files``).
    """
    sop = {"CT": "1.2.840.10008.5.1.4.1.1.2.1", "MR": "1.2.840.10008.5.1.4.1.1.4.1"}[modality]
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    vols = [phantom(shape, seed=10 + t) for t in range(n_temporal)]
    ni, nj, nk = shape
    order = list(range(nk))[::-1] if reverse else list(range(nk))
    frames, per_frame = [], []
    for k in order:
        for t in range(n_temporal):
            t_intercept = intercept + intercept_step * t
            frames.append(np.rint((vols[t][:, :, k].T - t_intercept) / slope).astype(np.uint16))
            pos = np.array(ORIGIN) + k * SPACING[2] * normal
            per_frame.append(_item(
                FrameContentSequence=DicomSequence([_item(
                    StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[t + 1, k + 1],
                    **({"TemporalPositionIndex": t + 1} if phase_by == "temporal" else {}))]),
                PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[float(v) for v in pos])]),
                PixelValueTransformationSequence=DicomSequence([_item(
                    RescaleSlope=slope, RescaleIntercept=t_intercept, RescaleType="HU" if modality == "CT" else "US")]),
            ))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, "MF1", "MULTI^FRAME"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20200101", 5, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = nj, ni, len(frames)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = DicomSequence([_item(
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=list(orientation))]),
        PixelMeasuresSequence=DicomSequence([_item(PixelSpacing=[SPACING[1], SPACING[0]],
                                                   SliceThickness=SPACING[2])]),
    )])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    org = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=org)])
    ds.DimensionIndexSequence = DicomSequence([  # dimension 1: temporal index, 2: position in stack
        _item(DimensionOrganizationUID=org, DimensionIndexPointer=0x00209128, FunctionalGroupPointer=0x00209111)
        if phase_by == "temporal" else  # DiffusionBValue in MRDiffusionSequence
        _item(DimensionOrganizationUID=org, DimensionIndexPointer=0x00189087, FunctionalGroupPointer=0x00189117),
        _item(DimensionOrganizationUID=org, DimensionIndexPointer=0x00209057, FunctionalGroupPointer=0x00209111),
    ])
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    icpt = [intercept + intercept_step * t for t in range(n_temporal)]
    cut = [np.rint((v - icpt[t]) / slope) * slope + icpt[t] for t, v in enumerate(vols)]
    return [Case([path], c.astype(np.float32), expected_affine(orientation=orientation), path.parent)
            for c in cut]


# ----------------------------------------------------------------------------- reference tools
def dcm2niix(folder: Path, out: Path, *extra_args: str) -> list[tuple[str, Any]]:
    """Run the dcm2niix wheel on ``folder``; return [(file name, nibabel image)] sorted by name."""
    import nibabel as nib

    tool = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([tool, "-z", "n", "-b", "n", "-f", "%s_%u", *extra_args, "-o", str(out), str(folder)],
                   check=True, capture_output=True, timeout=60)
    return [(p.name, nib.load(p)) for p in sorted(out.glob("*.nii"))]


def world_match(array: np.ndarray, affine: np.ndarray, ref_img: Any, *, tol_mm: float = 1e-3,
                volume: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pair every voxel of (array, affine) with the reference image's voxel at the same place.

    Works across flips, axis permutations and a larger reference field of view. Checks that the
    two grids coincide: each of our voxel centres must be within ``tol_mm`` of a reference voxel
    centre (this is the "affine within 1e-3 mm" test).

    Args:
        volume: index along the 4th axis of a 4D reference (dcm2niix writes phases as 4D).

    Returns:
        (ours, ref): 1D float64 arrays of the values of the voxels both images cover.
    """
    ref = np.asarray(ref_img.get_fdata())
    ref = ref.reshape(ref.shape[:3] + (-1,))[..., volume]  # 4D reference: pick one volume
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in array.shape[:3]), indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    ref_aff = ref_img.affine
    ref_idx = (world - ref_aff[:3, 3]) @ np.linalg.inv(ref_aff[:3, :3]).T
    nearest = np.rint(ref_idx)
    err_mm = np.linalg.norm((nearest - ref_idx) @ ref_aff[:3, :3].T, axis=1)
    if err_mm.max() > tol_mm:
        raise AssertionError(f"grids differ: a voxel centre is {err_mm.max():.4g} mm from the nearest reference voxel")
    nearest = nearest.astype(int)
    inside = np.all((nearest >= 0) & (nearest < np.array(ref.shape)), axis=1)
    if inside.mean() < 0.5:
        raise AssertionError(f"only {inside.mean():.0%} of the voxels lie inside the reference image")
    ours = np.asarray(array, dtype=np.float64)[tuple(idx[inside].T)]
    return ours, ref[tuple(nearest[inside].T)]


def big_endian(folder: Path) -> Case:
    """The plain series saved as (retired) Explicit VR Big Endian: the loader falls back to pydicom."""
    from pydicom.filewriter import dcmwrite

    case = series(folder)
    for path in case.files:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    return case


def no_preamble(folder: Path) -> Case:
    """The plain series with the 128-byte preamble, 'DICM' and the file meta group stripped."""
    case = series(folder)
    for path in case.files:
        raw = path.read_bytes()
        group_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
        path.write_bytes(raw[144 + group_len:])
    return case


def long_header(folder: Path) -> Case:
    """A series whose header is longer than the fast path's first read (16 KiB)."""
    return series(folder, extra={"TextValue": "x" * 30000})  # UT: no length limit
