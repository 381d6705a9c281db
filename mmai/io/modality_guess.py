"""Tell CT from MR by intensities alone, for inputs that carry no modality (a raw NIfTI).

CT is calibrated: Hounsfield units put air at -1000, water at 0, soft tissue at 0-80, fat near
-100 and dense bone below ~3000. MR intensities are arbitrary non-negative units whose background
(air) is near 0. The rule (docs/pipelines.md, "Modality check"), on the finite voxels:

- **CT** when the volume holds air: at least :data:`AIR_MIN_FRACTION` of its voxels in
  [-1100, -700] HU (air and lung), and a median within the HU range of tissue (<= 1500).
- **MR** when it holds no air and its values cannot be Hounsfield units of a body:
  (a) the median is above 1500 (denser than bone everywhere), or
  (b) neither air nor water-like tissue: under :data:`SOFT_MIN_FRACTION` of voxels in
  [-150, 150] (every body CT, cropped or not, holds fat, water or soft tissue), or
  (c) a dark, non-negative background near 0 (at least :data:`BACKGROUND_MIN_FRACTION` of the
  voxels within 2 % of the 99.5th percentile) around tissue whose median is above 200 (in HU
  that would be water around bone: a CT has air around the body, not water).
- otherwise **undecided** (None): nothing is refused. A CT cropped inside the body (no air) or
  an MR crop without background can be either; so can an already-normalised volume.

MR volumes with a few negative values (bias-field correction, interpolation ringing) stay MR or
undecided: only values near -1000 count as air, and only when they are a fraction of the volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np

AIR_RANGE = (-1100.0, -700.0)
SOFT_RANGE = (-150.0, 150.0)
AIR_MIN_FRACTION = 0.005
SOFT_MIN_FRACTION = 0.05
BACKGROUND_MIN_FRACTION = 0.10
MAX_SAMPLE = 400_000


def _sample(x: Any) -> np.ndarray:
    """Finite values of ``x`` as float64, strided down to at most :data:`MAX_SAMPLE` voxels."""
    arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    step = max(1, arr.size // MAX_SAMPLE)
    if arr.ndim <= 1 or arr.flags.c_contiguous:
        vals = arr.ravel()[::step]
    else:  # the same voxels (every step-th in C order), gathered without a C-order copy of the volume
        vals = arr[np.unravel_index(np.arange(0, arr.size, step), arr.shape)]
    vals = vals.astype(np.float64)
    return vals[np.isfinite(vals)]


def modality_evidence(x: Any) -> tuple[str | None, str]:
    """(``"CT"``, ``"MR"`` or None, the evidence in words) for a raw volume.

    Args:
        x: raw intensities, any shape (e.g. (1, I, J, K) or (I, J, K)), numpy or torch.
    """
    v = _sample(x)
    if v.size == 0:
        return None, "no finite voxel"
    air = float(np.mean((v >= AIR_RANGE[0]) & (v <= AIR_RANGE[1])))
    p995 = float(np.percentile(v, 99.5))
    med = float(np.median(v))
    if air >= AIR_MIN_FRACTION and med <= 1500:
        return "CT", f"{air:.1%} of voxels at air/lung values ({AIR_RANGE[0]:g} to {AIR_RANGE[1]:g} HU)"
    if med > 1500:
        return "MR", f"median intensity {med:.0f}, above any tissue in Hounsfield units, and no air near -1000"
    soft = float(np.mean((v >= SOFT_RANGE[0]) & (v <= SOFT_RANGE[1])))
    if soft < SOFT_MIN_FRACTION:
        return "MR", (f"no air near -1000 and only {soft:.1%} of voxels in the water/soft-tissue range "
                      f"({SOFT_RANGE[0]:g} to {SOFT_RANGE[1]:g} HU)")
    p005 = float(np.percentile(v, 0.5))
    if p995 > 0 and p005 >= -0.02 * p995:
        dark = v <= 0.02 * p995
        bg = float(np.mean(dark))
        tissue = float(np.median(v[~dark])) if (~dark).any() else 0.0
        if bg >= BACKGROUND_MIN_FRACTION and tissue > 200:
            return "MR", (f"a dark non-negative background ({bg:.0%} of voxels near 0) around tissue of median "
                          f"{tissue:.0f}, and no air near -1000")
    return None, "undecided"


def guess_modality(x: Any) -> str | None:
    """``"CT"``, ``"MR"`` or None (undecided); see :func:`modality_evidence`."""
    return modality_evidence(x)[0]
