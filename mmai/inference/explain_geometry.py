"""The input's own grid for explanations: read a case's native voxels and affine, and resample a
map from the model's grid onto it (MONAI ``SpatialResample``, the equivalent of inverting the
preprocessing chain: reorientation, resampling and crop/pad are all carried by the two affines).
"""

from __future__ import annotations

import warnings
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, SpatialResample

from mmai.data.provenance import is_nifti
from mmai.errors import PreprocessError


def native_image(path: str | list[str], image_cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """The input file's voxels (X, Y, Z) float32 and affine (4, 4), as the user's file has them.

    A NIfTI file is read with nibabel (its own affine, its own axis order; a 4-D file gives its
    first volume); a DICOM folder or file list goes through mmai's reader (RAS affine, like the
    model grid's), with the pipeline's series selection.
    """
    try:
        if isinstance(path, str) and is_nifti(path):
            img: Any = nib.load(str(path))
            arr = np.asarray(img.dataobj, dtype=np.float32)
            if arr.ndim == 4:
                arr = arr[..., 0]
            if arr.ndim != 3:
                raise PreprocessError(f"{path}: explanations need a 3-D image, got shape {arr.shape}")
            return arr, np.asarray(img.affine, dtype=np.float64)
        from mmai.io.reader import mmai_load_imaged
        from mmai.transforms.pipelines import KEY

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            chain = Compose([mmai_load_imaged(KEY, select=image_cfg.select, dicom=image_cfg.dicom,
                                              load_dtype=np.float32, image_only=True),
                             EnsureChannelFirstd(KEY)])
        out = chain({KEY: path})[KEY]
        return np.asarray(out[0], dtype=np.float32), np.asarray(out.affine, dtype=np.float64)
    except PreprocessError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a named, per-case error
        raise PreprocessError(f"{path}: cannot read the input image for explanations: {type(exc).__name__}: {exc}") from exc


def to_native(arr: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
              dst_shape: tuple[int, ...]) -> np.ndarray:
    """Resample a map (D, H, W) on the model grid (``src_affine``) onto the input grid: (X, Y, Z).

    Trilinear; voxels of the input outside the model's field of view are 0.
    """
    src = MetaTensor(torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32)[None],
                     affine=torch.as_tensor(np.asarray(src_affine), dtype=torch.float64))
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=np.float64)(
        src, dst_affine=torch.as_tensor(np.asarray(dst_affine), dtype=torch.float64),
        spatial_size=tuple(int(s) for s in dst_shape))
    res = np.asarray(out[0].detach().cpu(), dtype=np.float32)
    if res.shape != tuple(dst_shape):
        raise PreprocessError(f"explain: resampled map has shape {res.shape}, the input has {tuple(dst_shape)}")
    return res
