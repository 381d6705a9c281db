"""The saliency map of ``--explain`` as a DICOM Parametric Map (highdicom) in the source series' geometry.

The map written by :mod:`mmai.inference.explain` (``<stem>_saliency.nii.gz``, RAS affine, on the
input's own grid) is sampled at the centre of every pixel of every source instance: pixel
(r, c) of an instance lies at ``IPP + c * dc * row_dir + r * dr * col_dir`` (LPS mm; ``dr, dc`` =
PixelSpacing, the directions from ImageOrientationPatient), which is turned into RAS and then into
map voxel indices with the inverse affine; trilinear, 0 outside the map. The result has one frame
per source instance, so a viewer lays it over the source series pixel for pixel. UIDs are derived
like the SR's (:func:`mmai.pacs.sr.derived_uid`, kinds ``pm`` and ``pm-series``).

For viewers that show neither SR content nor parametric maps, :func:`build_overlay` makes a
Secondary Capture: the source slice where the map peaks, in greyscale (its own window, else the
1st-99th percentile), with the map blended over it in the ``hot`` colour map where it exceeds
0.2; no text is burned in (``BurnedInAnnotation`` NO). Kinds ``sc`` and ``sc-series``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmai.pacs.retry import PacsError
from mmai.pacs.sr import derived_uid

PM_SERIES_NUMBER = 9902
SC_SERIES_NUMBER = 9903


def sample_on_series(map_path: Path, headers: Sequence[Any]) -> np.ndarray:
    """The map at each source pixel: (n_instances, Rows, Columns) float32, instances in ``headers`` order.

    Raises:
        PacsError: an instance without ImagePositionPatient / ImageOrientationPatient / PixelSpacing.
    """
    import nibabel as nib
    from scipy.ndimage import map_coordinates

    img: Any = nib.load(str(map_path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    inv = np.linalg.inv(np.asarray(img.affine, dtype=np.float64))
    frames = []
    for ds in headers:
        try:
            ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
            iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
            dr, dc = (float(v) for v in ds.PixelSpacing)
        except (AttributeError, ValueError, TypeError) as exc:
            raise PacsError(f"instance {ds.get('SOPInstanceUID', '?')} has no usable geometry for a parametric "
                            f"map ({exc})") from exc
        rows, cols = int(ds.Rows), int(ds.Columns)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = ipp[:, None, None] + iop[:3, None, None] * (c * dc) + iop[3:, None, None] * (r * dr)  # (3, R, C)
        ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
        vox = np.tensordot(inv[:3, :3], ras, axes=1) + inv[:3, 3][:, None, None]
        frames.append(map_coordinates(data, vox.reshape(3, -1), order=1, mode="constant", cval=0.0)
                      .reshape(rows, cols).astype(np.float32))
    return np.stack(frames)


def build_parametric_map(values: np.ndarray, headers: Sequence[Any], *, model_id: str, version: str) -> Any:
    """A Parametric Map of ``values`` (n_instances, Rows, Columns) over the source instances ``headers``."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    study = str(headers[0].StudyInstanceUID)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="saliency", lut_explanation="mmai |gradient x input|, normalised to [0, 1]",
        unit=Code("1", "UCUM", "no units"), value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=list(headers), pixel_array=values.astype(np.float32),
        series_instance_uid=derived_uid(study, model_id, "pm-series"), series_number=PM_SERIES_NUMBER,
        sop_instance_uid=derived_uid(study, model_id, "pm"), instance_number=1, manufacturer="mmai",
        manufacturer_model_name=model_id[:64], software_versions=f"mmai {version}", device_serial_number="0",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="SALIENCY",
        content_description="mmai saliency map"[:64])
    pm.SeriesDescription = f"mmai saliency {model_id}"[:64]
    return pm


def build_overlay(values: np.ndarray, files: Sequence[str], *, model_id: str, version: str) -> Any:
    """A Secondary Capture (RGB) of the source slice where ``values`` (n_instances, Rows, Columns) peaks,
    the map over it; ``files`` are the source instances in the order of ``values``' frames."""
    import highdicom as hd
    import pydicom
    from matplotlib import colormaps

    k = int(np.argmax(values.reshape(len(values), -1).max(axis=1)))
    ref = pydicom.dcmread(files[k])
    img = ref.pixel_array.astype(np.float32) * float(ref.get("RescaleSlope", 1)) + float(ref.get("RescaleIntercept", 0))
    if "WindowCenter" in ref and "WindowWidth" in ref:
        wc = float(np.atleast_1d(ref.WindowCenter)[0])
        ww = max(float(np.atleast_1d(ref.WindowWidth)[0]), 1e-6)
        lo, hi = wc - ww / 2, wc + ww / 2
    else:
        lo, hi = (float(v) for v in np.percentile(img, [1, 99]))
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    m = np.clip(values[k], 0, 1)
    alpha = np.where(m > 0.2, 0.6 * m, 0.0)[..., None]
    rgb = (1 - alpha) * grey[..., None] + alpha * colormaps["hot"](m)[..., :3]
    study = str(ref.StudyInstanceUID)
    spacing: Any = (float(ref.PixelSpacing[0]), float(ref.PixelSpacing[1])) if "PixelSpacing" in ref else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=(rgb * 255).round().astype(np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=derived_uid(study, model_id, "sc-series"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=derived_uid(study, model_id, "sc"), instance_number=1,
        manufacturer="mmai", pixel_spacing=spacing,
        patient_orientation=("L", "P"))
    sc.BurnedInAnnotation = "NO"
    sc.SeriesDescription = f"mmai saliency overlay {model_id}"[:64]
    sc.SoftwareVersions = f"mmai {version}"
    return sc
