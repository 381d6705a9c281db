"""Size and build time of the offline 3D viewer pages (mmai.viewer) for a full-size CT.

A synthetic 512x512x300 chest-CT-like volume (air, a body ellipse of soft tissue with noise,
lungs, bone) at 0.7 x 0.7 x 1.25 mm with a saliency and an attention map: one case page
(``predict --explain``'s ``<case>_viewer.html``, at most 128 voxels per axis) and a report
viewer with 4 such cases (at most 96 voxels per axis). The last line is JSON.

    python benchmarks/viewer_page.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mmai.viewer import report_cases, write_case_page
from mmai.viewer.page import niivue_bundle, write_page

SHAPE = (512, 512, 300)
AFFINE = np.diag([-0.7, -0.7, 1.25, 1.0])  # LPS-like voxel axes, as a DICOM series gives them


def volumes(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    body = ((x - 256) / 220.0) ** 2 + ((y - 256) / 160.0) ** 2 < 1
    lung = (((x - 170) / 70.0) ** 2 + ((y - 240) / 90.0) ** 2 < 1) | (((x - 342) / 70.0) ** 2 + ((y - 240) / 90.0) ** 2 < 1)
    spine = ((x - 256) / 25.0) ** 2 + ((y - 380) / 25.0) ** 2 < 1
    img = np.full(SHAPE, -1000.0, np.float32)
    img[np.broadcast_to(body, SHAPE)] = 40.0
    img[np.broadcast_to(lung, SHAPE)] = -850.0
    img[np.broadcast_to(spine, SHAPE)] = 700.0
    img += rng.normal(0, 25, SHAPE).astype(np.float32)
    c = (170 + rng.integers(-20, 20), 240, 150 + rng.integers(-40, 40))
    sal = np.exp(-(((x - c[0]) ** 2 + (y - c[1]) ** 2) / 400.0 + (z - c[2]) ** 2 / 100.0)).astype(np.float32)
    att = np.exp(-(((x - c[0]) ** 2 + (y - c[1]) ** 2) / 4000.0 + (z - c[2]) ** 2 / 1000.0)).astype(np.float32)
    return img, sal, att


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for the pages (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mmai_viewer_"))
    out.mkdir(parents=True, exist_ok=True)
    niivue_bundle()  # read + compress the vendored bundle once (cached), timed apart
    pages, build_s = {}, []
    for k in range(4):
        img, sal, att = volumes(k)
        t0 = time.perf_counter()
        pages[f"case{k}"] = write_case_page(out / f"case{k}_viewer.html", img, {"saliency": sal, "attention": att},
                                            AFFINE, case_id=f"case{k}", facts=[("model", "bench"), ("prob_1", "0.5")])
        build_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    cases = report_cases(pages, {}, {})
    report = write_page(out / "report_viewer.html", cases, title="report viewer (4 cases)")
    report_s = time.perf_counter() - t0
    _, _, packed = niivue_bundle()
    page_b = pages["case0"].stat().st_size
    print(f"pages in {out}")
    print(json.dumps({"shape": list(SHAPE), "case_page_mb": round(page_b / 1e6, 2),
                      "case_volumes_mb": round((page_b - len(packed)) / 1e6, 2),
                      "niivue_inlined_mb": round(len(packed) / 1e6, 2),
                      "case_page_s": round(float(np.median(build_s)), 2),
                      "report_4_cases_mb": round(report.stat().st_size / 1e6, 2),
                      "report_4_cases_s": round(report_s, 2),
                      "case_grid": read_grid(pages["case0"]), "report_grid": cases[0]["shape"]}))


def read_grid(page: Path) -> list[int]:
    from mmai.viewer import read_cases

    return read_cases(page)[0]["shape"]


if __name__ == "__main__":
    main()
