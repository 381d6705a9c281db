"""Benchmark: load one 512x512x240 uncompressed CT series (126 MB) into a volume.

Compares, in one process with the page cache warm (best of ``--repeats`` runs each):
mmai ``load_series`` (float32 and native int16), SimpleITK ImageSeriesReader, MONAI
``LoadImage(reader="PydicomReader")``, pydicom one dcmread per file then stack, and the dcm2niix
wheel (a subprocess that also writes the .nii). The series is generated once with
``write_series`` into a cache folder. Prints a table, then as its LAST line one JSON object.

    .venv/bin/python benchmarks/dicom_load.py [--repeats 5] [--cache DIR] [--slices 240]

``bench_series_load`` is the single-series part; a tree-scanning benchmark (e.g. 20 series with
``--workers 2``) can be added beside it as its own function and merged into ``main``'s JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (512, 512, 240)
SPACING = (0.7, 0.7, 1.25)


def make_series(cache: Path, n_slices: int) -> list[Path]:
    """Write (once) a CT series of n_slices 512x512 slices into ``cache``; return its files."""
    from mmai.io.dicom_write import write_series

    folder = cache / f"ct_512x512x{n_slices}"
    files = sorted(folder.glob("*.dcm"))
    if len(files) == n_slices:
        return files
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(512), np.arange(512), indexing="ij")
    body = ((i - 256) ** 2 + (j - 256) ** 2 < 200**2).astype(np.float32)
    vol = np.empty((512, 512, n_slices), dtype=np.float32)
    for k in range(n_slices):
        vol[:, :, k] = -1000 + body * (1040 + rng.normal(0, 30, (512, 512)))
    return write_series(vol, folder, spacing=SPACING, origin=(-179.0, -179.0, -150.0),
                        series_description="bench")


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(best wall time in seconds, last result) over ``repeats`` runs after one warm-up run."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _mmai(files: list[Path], dtype: str) -> np.ndarray:
    from mmai.io.dicom_series import load_series

    return load_series(files, dtype=dtype).array


def _simpleitk(files: list[Path]) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return sitk.GetArrayFromImage(reader.Execute())


def _monai(folder: Path) -> np.ndarray:
    from monai.transforms import LoadImage

    return LoadImage(reader="PydicomReader", image_only=True)(str(folder))


def _pydicom(files: list[Path]) -> np.ndarray:
    import pydicom

    slices = [pydicom.dcmread(f) for f in files]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    arr = np.stack([ds.pixel_array for ds in slices], axis=-1).astype(np.float32)
    return arr * float(slices[0].RescaleSlope) + float(slices[0].RescaleIntercept)


def _dcm2niix(folder: Path) -> None:
    tool = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([tool, "-z", "n", "-b", "n", "-o", out, str(folder)], check=True, capture_output=True)


def bench_series_load(files: list[Path], repeats: int) -> dict[str, float]:
    """Seconds (best of ``repeats``) per tool for loading one series; mmai checked against SimpleITK."""
    folder = files[0].parent
    times: dict[str, float] = {}
    times["mmai_s"], ours = best_of(lambda: _mmai(files, "float32"), repeats)
    times["mmai_native_s"], _ = best_of(lambda: _mmai(files, "native"), repeats)
    times["simpleitk_s"], ref = best_of(lambda: _simpleitk(files), repeats)
    if not np.array_equal(ours, np.asarray(ref).transpose(2, 1, 0)):
        raise SystemExit("mmai and SimpleITK volumes differ: the benchmark is void")
    times["pydicom_s"], _ = best_of(lambda: _pydicom(files), max(1, repeats // 2))
    times["monai_s"], _ = best_of(lambda: _monai(folder), max(1, repeats // 2))
    times["dcm2niix_s"], _ = best_of(lambda: _dcm2niix(folder), repeats)
    return times


def bench_tree_scan(root: Path, n_series: int, repeats: int) -> dict[str, float]:
    """Seconds to scan a tree of ``n_series`` 256x256x60 series with ``mmai scan --workers 2``
    (the tree builder is shared with benchmarks/dicom_scan.py, which has the full comparison)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dicom_scan import build_tree

    from mmai.io.dicom_scan import scan_tree

    if not (root / "done").exists():
        build_tree(root, n_series, 256, 60)
        (root / "done").write_text("ok")
    seconds, df = best_of(lambda: scan_tree(root, workers=2), repeats)
    if len(df) != n_series:
        raise SystemExit(f"tree scan found {len(df)} series, expected {n_series}: the benchmark is void")
    return {"tree_scan_w2_s": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=SHAPE[2])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mmai_bench_cache")
    parser.add_argument("--tree-series", type=int, default=20, help="series in the scanned tree (0 = skip)")
    args = parser.parse_args(argv)
    files = make_series(args.cache, args.slices)
    t = bench_series_load(files, args.repeats)
    if args.tree_series:
        t.update(bench_tree_scan(args.cache / f"tree{args.tree_series}", args.tree_series, args.repeats))
    result: dict[str, Any] = {
        "series": f"512x512x{args.slices} CT, uncompressed",
        **{k: round(v, 4) for k, v in t.items()},
        "speedup_vs_simpleitk": round(t["simpleitk_s"] / t["mmai_s"], 2),
        "speedup_vs_monai": round(t["monai_s"] / t["mmai_s"], 2),
        "speedup_vs_pydicom": round(t["pydicom_s"] / t["mmai_s"], 2),
        "ratio_vs_dcm2niix": round(t["mmai_s"] / t["dcm2niix_s"], 2),
    }
    rows = [("mmai load_series (float32)", "mmai_s"), ("mmai load_series (native int16)", "mmai_native_s"),
            ("SimpleITK ImageSeriesReader", "simpleitk_s"), ("pydicom dcmread per file + stack", "pydicom_s"),
            ("MONAI LoadImage(PydicomReader)", "monai_s"), ("dcm2niix (subprocess, writes .nii)", "dcm2niix_s")]
    print(f"{'tool':40s} {'seconds':>8s} {'vs mmai':>8s}")
    for label, key in rows:
        print(f"{label:40s} {t[key]:8.3f} {t[key] / t['mmai_s']:7.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
