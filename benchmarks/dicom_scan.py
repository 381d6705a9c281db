"""Benchmark: index a DICOM tree (header-only) with mmai vs the tools a user would otherwise use.

Tree: ``--series`` series (default 20) of ``--size``x``--size``x``--slices`` (default 256x256x60,
int16, uncompressed explicit-VR little endian, written by mmai.io.dicom_write.write_series), one
folder per series, 1,200 files / 157 MB by default. Page cache warm (one untimed pass first);
each figure is the best of ``--repeat`` runs.

Contenders:
- ``scan_w1`` / ``scan_w2``: ``mmai.io.dicom_scan.scan_tree(root, workers=1|2)`` (thread pool),
  plus ``read_headers`` alone in-process, with 2 threads and with 2 processes (why threads are
  the default);
- ``pydicom_loop``: os.walk + ``pydicom.dcmread(f, stop_before_pixels=True)`` per file, grouped by
  SeriesInstanceUID (no splitting, no checks: the minimum a script does);
- ``sitk_gdcm``: ``SimpleITK.ImageSeriesReader.GetGDCMSeriesIDs`` + ``GetGDCMSeriesFileNames``
  per folder (what SimpleITK users call to find series).

Usage:
    .venv/bin/python benchmarks/dicom_scan.py [--series 20] [--slices 60] [--size 256] [--repeat 3]

The last line printed is one JSON object with the figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def build_tree(root: Path, n_series: int, size: int, slices: int) -> int:
    from pydicom.uid import generate_uid

    from mmai.io.dicom_write import write_series

    rng = np.random.default_rng(0)
    study = generate_uid()
    n = 0
    for s in range(n_series):
        vol = rng.integers(-1000, 1500, size=(size, size, slices)).astype(np.float32)
        n += len(write_series(vol, root / f"series_{s:03d}", spacing=(0.7, 0.7, 2.5), study_uid=study,
                              series_number=s + 1, series_description=f"bench {s}",
                              origin=(0.0, 0.0, 10.0 * s)))
    return n


def pydicom_loop(root: Path) -> int:
    import pydicom

    groups: dict[str, list[str]] = defaultdict(list)
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            groups[str(ds.SeriesInstanceUID)].append(p)
    return len(groups)


def sitk_gdcm(root: Path) -> int:
    import SimpleITK as sitk

    n = 0
    reader = sitk.ImageSeriesReader()
    for dirpath, _, files in os.walk(root):
        if not files:
            continue
        for sid in reader.GetGDCMSeriesIDs(dirpath):
            reader.GetGDCMSeriesFileNames(dirpath, sid)
            n += 1
    return n


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-sitk", action="store_true")
    a = ap.parse_args()

    from mmai.io.dicom_scan import scan_tree
    from mmai.io.dicom_scan_read import read_headers

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        t0 = time.perf_counter()
        n_files = build_tree(root, a.series, a.size, a.slices)
        build_s = time.perf_counter() - t0
        # warm the page cache and the imports
        pydicom_loop(root)
        scan_tree(root)
        res: dict[str, float] = {}
        res["scan_w1_s"], df1 = best_of(lambda: scan_tree(root, workers=1), a.repeat)
        res["scan_w2_s"], df2 = best_of(lambda: scan_tree(root, workers=2), a.repeat)
        paths = [str(p) for p in sorted(root.rglob("*.dcm"))]
        res["read_headers_w1_s"], _ = best_of(lambda: read_headers(paths), a.repeat)
        res["read_headers_w2_threads_s"], _ = best_of(
            lambda: read_headers(paths, workers=2, pool="thread"), a.repeat)
        res["read_headers_w2_processes_s"], _ = best_of(
            lambda: read_headers(paths, workers=2, pool="process"), a.repeat)
        res["pydicom_loop_s"], n_pd = best_of(lambda: pydicom_loop(root), a.repeat)
        if not a.no_sitk:
            res["sitk_gdcm_s"], n_sitk = best_of(lambda: sitk_gdcm(root), a.repeat)
            assert n_sitk == a.series, n_sitk
        assert len(df1) == len(df2) == n_pd == a.series, (len(df1), len(df2), n_pd)
    out = {k: round(v, 4) for k, v in res.items()}
    out.update(n_files=n_files, n_series=a.series, build_s=round(build_s, 2), cpus=os.cpu_count())
    out["speedup_vs_pydicom"] = round(res["pydicom_loop_s"] / res["scan_w1_s"], 2)
    out["speedup_w2_vs_pydicom"] = round(res["pydicom_loop_s"] / res["scan_w2_s"], 2)
    out["speedup_w2_vs_w1"] = round(res["scan_w1_s"] / res["scan_w2_s"], 2)
    if "sitk_gdcm_s" in res:
        out["speedup_vs_sitk"] = round(res["sitk_gdcm_s"] / res["scan_w1_s"], 2)
    rows = [("mmai scan_tree workers=1", "scan_w1_s"), ("mmai scan_tree workers=2 (threads)", "scan_w2_s"),
            ("read_headers only, in-process", "read_headers_w1_s"),
            ("read_headers workers=2, thread pool", "read_headers_w2_threads_s"),
            ("read_headers workers=2, process pool", "read_headers_w2_processes_s"),
            ("pydicom dcmread loop (stop_before_pixels)", "pydicom_loop_s"),
            ("SimpleITK GetGDCMSeriesIDs per folder", "sitk_gdcm_s")]
    sys.stdout.write(f"{n_files} files, {a.series} series of {a.size}x{a.size}x{a.slices}, "
                     f"{os.cpu_count()} CPUs, best of {a.repeat}\n")
    sys.stdout.write(f"{'tool':45s} {'seconds':>8s} {'files/s':>9s}\n")
    for label, key in rows:
        if key in res:
            sys.stdout.write(f"{label:45s} {res[key]:8.3f} {n_files / res[key]:9.0f}\n")
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
