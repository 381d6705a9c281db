"""Check any volume (loader output, converted NIfTI) against the header positions of its DICOM files.

For sampled pixels (row r, column c) of each file, the patient position is computed from that
file's own header, as DICOM defines it (PS3.3 C.7.6.2.1.1):

    P_lps = ImagePositionPatient + c * row_cosine * PixelSpacing[1] + r * col_cosine * PixelSpacing[0]

then LPS -> RAS (x and y negated), through the inverse of the volume's affine to continuous voxel
indices, and the volume is read there by trilinear interpolation. The value must equal the
file's stored pixel (x RescaleSlope + RescaleIntercept). Nothing of mmai's geometry code is used,
so the check is independent of the loader it tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom


@dataclass(frozen=True)
class GeometryReport:
    """Errors at the sampled pixels.

    Attributes:
        n: pixels sampled.
        inside: fraction whose position lies inside the volume.
        max_err, mean_err: |volume value - pixel value| over the inside pixels (HU / stored units).
        worst: (file name, row, column) of the largest error.
    """

    n: int
    inside: float
    max_err: float
    mean_err: float
    worst: tuple[str, int, int]


def header_samples(files: Sequence[Path], *, per_file: int = 48, seed: int = 0, margin: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, int]]]:
    """RAS positions (N, 3), values (N,) and (file, row, col) of sampled pixels of single-frame files.

    The four corners of every slice are always sampled, plus ``per_file`` random pixels, all at
    least ``margin`` pixels from the slice edge.
    """
    rng = np.random.default_rng(seed)
    points, values, where = [], [], []
    for path in files:
        ds = pydicom.dcmread(path)
        pix = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) \
            + float(ds.get("RescaleIntercept", 0) or 0)
        n_rows, n_cols = pix.shape
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        r0, r1, c0, c1 = margin, n_rows - 1 - margin, margin, n_cols - 1 - margin
        rows = np.concatenate([[r0, r0, r1, r1], rng.integers(r0, r1 + 1, per_file)])
        cols = np.concatenate([[c0, c1, c0, c1], rng.integers(c0, c1 + 1, per_file)])
        lps = ipp + np.outer(cols * col_spacing, iop[:3]) + np.outer(rows * row_spacing, iop[3:])
        points.append(lps * np.array([-1.0, -1.0, 1.0]))
        values.append(pix[rows, cols])
        where += [(Path(path).name, int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
    return np.concatenate(points), np.concatenate(values), where


def trilinear(volume: np.ndarray, ijk: np.ndarray, eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(values (N,), inside (N,) bool) of ``volume`` (I, J, K) at continuous voxel indices (N, 3).

    A point is inside when every index lies in [0, n - 1] (within ``eps``); outside points get NaN.
    """
    shape = np.array(volume.shape[:3])
    inside = np.all((ijk >= -eps) & (ijk <= shape - 1 + eps), axis=1)
    p = np.clip(ijk[inside], 0, shape - 1)
    lo = np.minimum(np.floor(p).astype(int), np.maximum(shape - 2, 0))
    w = p - lo
    vol = np.asarray(volume, dtype=np.float64)
    out = np.zeros(len(p))
    for corner in range(8):
        bits = np.array([(corner >> a) & 1 for a in range(3)])
        idx = np.minimum(lo + bits, shape - 1)
        weight = np.prod(np.where(bits, w, 1 - w), axis=1)
        out += weight * vol[idx[:, 0], idx[:, 1], idx[:, 2]]
    values = np.full(len(ijk), np.nan)
    values[inside] = out
    return values, inside


def check_geometry(array: np.ndarray, affine: np.ndarray, files: Sequence[Path], *, per_file: int = 48,
                   seed: int = 0, margin: int = 0) -> GeometryReport:
    """Compare ``array`` (I, J, K) with voxel -> RAS ``affine`` against the pixels of ``files``."""
    ras, truth, where = header_samples(files, per_file=per_file, seed=seed, margin=margin)
    ijk = (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.c_[ras, np.ones(len(ras))].T).T[:, :3]
    got, inside = trilinear(array, ijk)
    err = np.abs(got - truth)[inside]
    worst = int(np.flatnonzero(inside)[np.argmax(err)]) if err.size else 0
    return GeometryReport(n=len(truth), inside=float(inside.mean()), max_err=float(err.max(initial=0.0)),
                          mean_err=float(err.mean()) if err.size else float("nan"), worst=where[worst])


def assert_geometry(array: np.ndarray, affine: np.ndarray, files: Sequence[Path], *, atol: float,
                    min_inside: float = 0.95, margin: int = 0) -> GeometryReport:
    """:func:`check_geometry`, then fail unless >= ``min_inside`` of the pixels are inside and every
    inside pixel is within ``atol`` of its stored value.

    ``margin``: skip pixels this close to the slice edge. An in-plane resampling (tilt corrected)
    cannot interpolate at the edge pixels of the acquired slices: their neighbours outside the
    field of view hold the fill value.
    """
    rep = check_geometry(array, affine, files, margin=margin)
    assert rep.inside >= min_inside, f"only {rep.inside:.1%} of {rep.n} header pixels inside the volume: {rep}"
    assert rep.max_err <= atol, f"a pixel is {rep.max_err:.2f} off its header value (allowed {atol}): {rep}"
    return rep
