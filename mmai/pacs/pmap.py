"""The saliency map of ``--explain`` as a DICOM Parametric Map (highdicom) in the source series' geometry.

The map written by :mod:`mmai.inference.explain` (``<stem>_saliency.nii.gz``, RAS affine, on the
input's own grid) is sampled at the centre of every pixel of every source instance: pixel
(r, c) of an instance lies at ``IPP + c * dc * row_dir + r * dr * col_dir`` (LPS mm; ``dr, dc`` =
PixelSpacing, the directions from ImageOrientationPatient), which is turned into RAS and then into
map voxel indices with the inverse affine; trilinear, 0 outside the map. The result has one frame
per source instance, so a viewer lays it over the source series pixel for pixel. UIDs are derived
like the SR's (:func:`mmai.pacs.sr.derived_uid`, kinds ``pm`` and ``pm-series``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmai.pacs.retry import PacsError
from mmai.pacs.sr import derived_uid

PM_SERIES_NUMBER = 9902


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
