"""MONAI reader for DICOM folders/files backed by mmai's loader, and ``load_volume`` for any input.

``mmai_load_image()`` / ``mmai_load_imaged(keys)`` (or ``LoadImage(reader=MmaiDicomReader())``) load a
DICOM folder (scanned with :func:`mmai.io.dicom_scan.scan_stacks`; exactly one image stack must
match the selection rule, else SeriesSelectionError lists the candidates), one DICOM file, or a
list of files of one series. The metadata carries the RAS ``affine`` and only non-identifying
fields (see :class:`mmai.io.dicom_series.DicomVolume`). The geometry policy (pipeline YAML
``image.dicom``, :class:`mmai.io.dicom_geometry.GeometryPolicy`) is used for the scan and the
load alike, so the index's problems and the loader's warnings agree.

Beware: MONAI's ``LoadImage(reader=X)`` catches any exception X raises and retries with its own
readers (ITK, pydicom ...), which stack every series of a folder, and if all fail it raises a
RuntimeError. A SeriesSelectionError would vanish or change type. ``mmai_load_image`` /
``mmai_load_imaged`` pass MmaiDicomReader as the runtime ``reader`` argument of MONAI's public
``__call__``, which uses that reader alone and lets its errors reach the caller unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage, LoadImaged
from monai.utils import MetaKeys, SpaceKeys

from mmai.errors import DicomError
from mmai.io.dicom_geometry import GeometryPolicy, orientation_label, policy_from
from mmai.io.dicom_scan import scan_stacks
from mmai.io.dicom_select import SelectionRule, select_one
from mmai.io.dicom_series import DicomVolume, load_series
from mmai.io.input_flags import META_KEY, add_flag, file_names, format_flags

logger = logging.getLogger(__name__)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".ima")


def _rule(select: Any, source: str) -> Any:
    if select is None or isinstance(select, Mapping):
        return SelectionRule.from_dict(select, source)
    if isinstance(select, SelectionRule):
        return select
    raise DicomError(f"{source}: select must be a SelectionRule, a mapping or None, got {type(select).__name__}")


def load_dicom_folder(folder: PathLike, *, select: Any = None, dtype: str = "float32", uneven: str | None = None,
                      tilt: str | None = None, policy: Any = None) -> DicomVolume:
    """Scan ``folder``, pick the one stack ``select`` matches, and load it.

    Args:
        folder: a DICOM folder (walked recursively).
        select: a :class:`mmai.io.dicom_select.SelectionRule`, its mapping form (pipeline YAML
            ``image.select``), or None: every image stack except localizers is a candidate.
        dtype, uneven, tilt, policy: as in :func:`mmai.io.dicom_series.load_series`; the same
            policy's tolerances split and check the stacks in the scan.

    Raises:
        SeriesSelectionError: no stack or several stacks match (the message lists them).
    """
    folder = Path(folder)
    pol = policy_from(policy, uneven=uneven, tilt=tilt)
    rule = _rule(select, f"MmaiDicomReader(select=...) for {folder}")
    found = scan_stacks(folder, policy=pol)
    stacks = [s for s in found if s.row.get("kind") == "image"]
    stack = select_one(stacks, rule, study_label=str(folder))
    vol = load_series(stack.files, dtype=dtype, policy=pol, frames=stack.frames)
    _note_unreadable_neighbours(vol, stack.files, _broken(found, stack.row.get("series_uid")))
    return vol


def _broken(found: Sequence[Any], series: str | None) -> list[Any]:
    """Scan stacks of unreadable files that may belong to ``series``: unreadable ones, and
    header-cut ones of that SeriesInstanceUID (or of none: the cut came before it)."""
    return [s for s in found if s.row.get("kind") == "unreadable" or (
        s.row.get("kind") == "non-image" and s.row.get("series_uid") in ("", None, series)
        and "unreadable:" in str(s.row.get("problems")))]


def load_file_list(files: Sequence[Path], *, dtype: str = "float32", policy: GeometryPolicy) -> DicomVolume:
    """Load the files of one series (e.g. a stack of ``mmai predict --dicom-root``); when the stack
    has a gap, the folder is scanned for unreadable files that may have filled it (flagged
    ``dropped_files`` like :func:`load_dicom_folder` does)."""
    vol = load_series(files, dtype=dtype, policy=policy)
    if not (vol.meta.get(META_KEY) or {}).get("interpolated_slices"):
        return vol
    found = [s for folder in sorted({Path(f).parent for f in files}) for s in scan_stacks(folder, policy=policy)]
    mine = {str(f) for f in files}
    series = next((s.row.get("series_uid") for s in found if any(str(f) in mine for f in s.files)), None)
    _note_unreadable_neighbours(vol, files, _broken(found, series))
    return vol


def _note_unreadable_neighbours(vol: DicomVolume, files: Sequence[Path], unreadable: Sequence[Any]) -> None:
    """Flag the unreadable files of the selected series: those of its SeriesInstanceUID whose
    header is cut, and those in its folder(s) whose header cannot even say their series.

    Such a file most likely is one of the series' slices (the scan then sees a gap, which the
    loader interpolates). Its name goes into the warning and the ``dropped_files`` flag.
    """
    folders = {Path(f).parent for f in files}
    near = [Path(f) for s in unreadable for f in s.files if Path(f).parent in folders]
    if not near:
        return
    flags = vol.meta.setdefault(META_KEY, {})
    add_flag(flags, "dropped_files", len(near))
    names = [n for n in (flags.get("dropped_file_names") or "").split(",") if n]
    flags["dropped_file_names"] = file_names([*names, *(p.name for p in near)])
    text = (f"{len(near)} unreadable file(s) in the series' folder left out ({file_names(near)}): "
            "a cut header does not say which series a file belongs to")
    vol.warnings.append(text)
    logger.warning("%s: %s", Path(files[0]).name, text)


def load_volume(path: PathLike, *, select: Any = None, dtype: str = "float32", uneven: str | None = None,
                tilt: str | None = None, policy: Any = None) -> DicomVolume:
    """Load a NIfTI file, a DICOM folder or a single DICOM file as a DicomVolume.

    NIfTI comes back as stored: ``array`` (I, J, K) float32 (``dtype="native"``: the on-disk
    dtype when the file has no scaling) and ``affine`` = the image's voxel -> RAS affine, the same
    convention as DICOM volumes. 4D NIfTI files are refused.

    Args:
        path: ``*.nii`` / ``*.nii.gz``, a DICOM folder, or one DICOM file.
        select, dtype, uneven, tilt, policy: as in :func:`load_dicom_folder` (DICOM only).
    """
    p = Path(path)
    if not p.exists():
        raise DicomError(f"{p}: no such file or folder")
    pol = policy_from(policy, uneven=uneven, tilt=tilt)
    if p.is_dir():
        return load_dicom_folder(p, select=select, dtype=dtype, policy=pol)
    if p.name.lower().endswith(_NIFTI_SUFFIXES):
        return _load_nifti(p, dtype)
    return load_series([p], dtype=dtype, policy=pol)


def _load_nifti(path: Path, dtype: str) -> DicomVolume:
    import nibabel as nib

    img: Any = nib.load(str(path))
    if len(img.shape) > 3 and all(s == 1 for s in img.shape[3:]):  # (I, J, K, 1): one volume
        img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
    if len(img.shape) != 3:
        what = (f"{img.shape[3]} volumes (a 4D series: fMRI, DWI, dynamic)" if len(img.shape) == 4
                else f"{len(img.shape)} dimensions")
        raise DicomError(f"{path}: NIfTI shape {img.shape} is not 3D: {what}; allowed: one 3D volume (I, J, K) "
                         "per case (extract the volume the pipeline is for, e.g. nibabel's img.slicer[..., 0])")
    scaled = getattr(img.dataobj, "slope", 1) != 1 or getattr(img.dataobj, "inter", 0) != 0
    array = np.asanyarray(img.dataobj) if dtype == "native" and not scaled else img.get_fdata(dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    # DICOM-style orientation cosines of the i and j axes (LPS) give the same label as for DICOM.
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    cos = np.concatenate([lps[:, 0] / np.linalg.norm(lps[:, 0]), lps[:, 1] / np.linalg.norm(lps[:, 1])])
    meta = {"modality": sidecar_modality(path), "series_description": "", "shape": list(array.shape), "spacing": zooms,
            "orientation": orientation_label(cos), "tilt_deg": 0.0, "source_format": "nifti",
            "dtype": str(array.dtype)}
    meta[META_KEY] = {}
    return DicomVolume(array=array, affine=affine, warnings=[], meta=meta)


def sidecar_modality(path: Path) -> str:
    """The DICOM Modality a NIfTI's JSON sidecar records ('' without one): ``mmai convert`` and
    dcm2niix (BIDS) both write ``"Modality"`` into ``<name>.json`` beside ``<name>.nii[.gz]``."""
    name = path.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]
    side = path.with_name(stem + ".json")
    if not side.is_file():
        return ""
    try:
        value = json.loads(side.read_text()).get("Modality")
    except (OSError, ValueError, AttributeError):
        return ""
    return str(value).strip().upper() if isinstance(value, str) else ""


class MmaiDicomReader(ImageReader):
    """MONAI ImageReader over :func:`load_series` / :func:`load_dicom_folder` (and, for one
    ``.nii``/``.nii.gz`` path, nibabel via :func:`load_volume`, so one reader serves manifests
    that mix NIfTI files and DICOM folders).

    Args:
        select: selection rule for folders holding several stacks (see :func:`load_dicom_folder`).
        dtype: "float32" or "native" (see :func:`mmai.io.dicom_series.load_series`).
        uneven: "resample" | "error" | "keep" (overrides ``policy.uneven``).
        tilt: "shear" | "resample" (overrides ``policy.tilt``).
        policy: geometry tolerances and policy: a GeometryPolicy, the pipeline's
            ``mmai.config.DicomConfig`` (YAML ``image.dicom``), a mapping, or None (defaults).

    Example:
        >>> from monai.transforms import LoadImage
        >>> img = LoadImage(reader=MmaiDicomReader(select={"modality": "CT"}), image_only=True)(folder)
        >>> img.shape, img.affine  # (I, J, K), voxel -> RAS
    """

    def __init__(self, select: Any = None, *, dtype: str = "float32", uneven: str | None = None,
                 tilt: str | None = None, policy: Any = None) -> None:
        super().__init__()
        self.select = select
        self.dtype = dtype
        self.policy: GeometryPolicy = policy_from(policy, uneven=uneven, tilt=tilt)

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """True for folders, DICOM-like names (no suffix, .dcm, .dicom, .ima) and one NIfTI file."""
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        if len(names) == 1 and Path(names[0]).name.lower().endswith(_NIFTI_SUFFIXES):
            return True
        for name in names:
            p = Path(name)
            if p.is_dir():
                continue
            if p.name.lower().endswith(_NIFTI_SUFFIXES) or p.suffix.lower() not in _DICOM_SUFFIXES:
                return False
        return bool(names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> DicomVolume:
        """Load a folder (one stack selected), a file (DICOM or NIfTI, see :func:`load_volume`),
        or a list of DICOM files of one series.

        Args:
            data: a folder, a file, or a sequence of files (a one-item sequence may be a folder).
            kwargs: overrides of dtype / uneven / tilt / policy / select for this call.
        """
        dtype = kwargs.get("dtype", self.dtype)
        policy = policy_from(kwargs.get("policy", self.policy), uneven=kwargs.get("uneven"),
                             tilt=kwargs.get("tilt"))
        select = kwargs.get("select", self.select)
        items = [Path(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data)]
        if len(items) == 1:
            return load_volume(items[0], select=select, dtype=dtype, policy=policy)
        if any(i.is_dir() or i.name.lower().endswith(_NIFTI_SUFFIXES) for i in items):
            raise DicomError(f"MmaiDicomReader: got {len(items)} paths including folders or NIfTI files; "
                             f"allowed: one folder, one file, or the DICOM files of one series")
        return load_file_list(items, dtype=dtype, policy=policy)

    def get_data(self, img: DicomVolume) -> tuple[np.ndarray, dict]:
        """(array (I, J, K), meta) with RAS ``affine``/``original_affine``, ``spatial_shape``,
        ``space``, no channel dim, and the volume's non-identifying meta (+ ``dicom_warnings``).

        Nested meta (``slice_steps``, ``policy``, ``slice_positions_mm``) becomes a JSON string and
        ``problems`` a ';'-joined string, so batches of volumes still collate.
        """
        meta: dict[str, Any] = {}
        for k, v in img.meta.items():
            if k == "shape":
                continue
            if k == "problems":
                v = ";".join(v)
            elif k == META_KEY:
                v = format_flags(v)
            elif isinstance(v, (dict, list)) and k != "spacing":
                v = json.dumps(v)
            meta[k] = v
        meta[MetaKeys.AFFINE] = img.affine.copy()
        meta[MetaKeys.ORIGINAL_AFFINE] = img.affine.copy()
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(img.array.shape[:3])
        meta[MetaKeys.SPACE] = SpaceKeys.RAS
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")  # "no_channel"
        meta["spacing"] = np.asarray(img.meta.get("spacing", np.linalg.norm(img.affine[:3, :3], axis=0)))
        meta["dicom_warnings"] = "; ".join(img.warnings)
        return img.array, meta


class _MmaiLoadImage(LoadImage):
    """LoadImage that always reads with its MmaiDicomReader (MONAI's public runtime ``reader``
    argument: that reader alone, its errors unchanged, no fallback to MONAI's own readers)."""

    def __init__(self, mmai_reader: MmaiDicomReader, **load_kwargs: Any) -> None:
        super().__init__(reader=mmai_reader, **load_kwargs)
        self.mmai_reader = mmai_reader

    def __call__(self, filename: Any, reader: ImageReader | None = None) -> Any:
        return super().__call__(filename, reader=reader or self.mmai_reader)


class _MmaiLoadImaged(LoadImaged):
    """LoadImaged that always reads with its MmaiDicomReader (as :class:`_MmaiLoadImage`)."""

    def __init__(self, keys: Any, mmai_reader: MmaiDicomReader, **load_kwargs: Any) -> None:
        super().__init__(keys, reader=mmai_reader, **load_kwargs)  # type: ignore[arg-type]
        self.mmai_reader = mmai_reader

    def __call__(self, data: Any, reader: ImageReader | None = None) -> Any:
        return super().__call__(data, reader=reader or self.mmai_reader)


@contextlib.contextmanager
def _quiet_optional_readers() -> Iterator[None]:
    """LoadImage instantiates every optional MONAI reader it knows; without a CUDA build of
    nvImageCodec one of them logs a warning per process (so per preprocessing worker). mmai reads
    with its own reader only, so that message is noise: silence it while the loader is built."""
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def mmai_load_image(*, select: Any = None, dtype: str = "float32", uneven: str | None = None,
                    tilt: str | None = None, policy: Any = None, dicom: Any = None, load_dtype: Any = np.float32,
                    **load_kwargs: Any) -> LoadImage:
    """A ``monai.transforms.LoadImage`` that reads only with MmaiDicomReader; errors propagate.

    Args:
        select, dtype, uneven, tilt, policy: MmaiDicomReader's options.
        dicom: the pipeline's ``image.dicom`` section (``mmai.config.DicomConfig``); same as
            ``policy`` (give one of them).
        load_dtype: LoadImage's own output ``dtype`` (None keeps the reader's dtype).
        load_kwargs: other LoadImage keywords (image_only, ensure_channel_first ...).
    """
    reader = MmaiDicomReader(select, dtype=dtype, uneven=uneven, tilt=tilt, policy=policy or dicom)
    with _quiet_optional_readers():
        return _MmaiLoadImage(reader, dtype=load_dtype, **load_kwargs)


def mmai_load_imaged(keys: Any, *, select: Any = None, dtype: str = "float32", uneven: str | None = None,
                     tilt: str | None = None, policy: Any = None, dicom: Any = None, load_dtype: Any = np.float32,
                     **load_kwargs: Any) -> LoadImaged:
    """A ``monai.transforms.LoadImaged`` that reads only with MmaiDicomReader (see mmai_load_image).

    ``dicom=cfg.dicom`` (the pipeline's ``image.dicom`` section) sets the geometry policy.
    """
    reader = MmaiDicomReader(select, dtype=dtype, uneven=uneven, tilt=tilt, policy=policy or dicom)
    with _quiet_optional_readers():
        return _MmaiLoadImaged(keys, reader, dtype=load_dtype, **load_kwargs)
