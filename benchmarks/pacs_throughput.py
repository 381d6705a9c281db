"""Studies from a PACS vs the same studies from a folder: ``mmai predict`` wall time.

A synthetic DICOM cohort (``mmai synth``, one CT series of 40 slices per study) is sent to a local
Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, started on 127.0.0.1) by STOW-RS; a tiny
model is trained on it. Then, each timed in this process:

- folder: ``mmai predict --dicom-root IMAGES --clinical clinical.csv``
- pacs:   ``mmai predict --dicomweb URL --query ModalitiesInStudy=CT --clinical clinical.csv
  --store-results`` (QIDO-RS search, WADO-RS retrieve into the cache, predict, one SR per study
  stored by STOW-RS, cache cleaned per study)

The PACS run's probabilities are checked against the folder run (within 1e-4). The last line is
JSON: ``{"pacs_s", "folder_s", "overhead", "studies"}`` with overhead = pacs_s / folder_s - 1.

    python benchmarks/pacs_throughput.py [--studies 100] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmai.cli import main  # noqa: E402
from tests.pacs.helpers import case_dirs, upload  # noqa: E402
from tests.pacs.orthanc import start_orthanc, why_unavailable  # noqa: E402
from tests.test_end_to_end import tiny_pipeline  # noqa: E402


def _timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"mmai {' '.join(args[:1])} failed with exit status {rc}")
    return time.perf_counter() - t0


def run(n: int, repeats: int, tmp: Path) -> dict[str, float | int]:
    assert main(["synth", "--out", str(tmp / "cohort"), "--n", str(n), "--seed", "3", "-q", "--workers", "2"]) == 0
    pipe = tiny_pipeline(tmp)
    train = tmp / "cohort" / "train.csv"  # image paths are relative to the manifest
    pd.read_csv(tmp / "cohort" / "manifest.csv").head(min(n, 32)).to_csv(train, index=False)
    assert main(["preprocess", "--config", str(pipe), "--input", str(train), "--out", str(tmp / "pre"), "-q"]) == 0
    assert main(["train", "--config", str(pipe), "--manifest", str(tmp / "pre" / "manifest.csv"), "--out",
                 str(tmp / "run"), "--epochs", "1", "--threads", "1", "-q"]) == 0
    server = start_orthanc(tmp / "orthanc")
    try:
        upload(server, case_dirs(tmp / "cohort"), "stow")
        clinical = str(tmp / "cohort" / "clinical.csv")
        folder_s, pacs_s = [], []
        for r in range(repeats):
            folder_out, pacs_out = tmp / f"folder{r}.csv", tmp / f"pacs{r}.csv"
            folder_s.append(_timed(["predict", "--run", str(tmp / "run"), "--out", str(folder_out), "--dicom-root",
                                    str(tmp / "cohort" / "images"), "--clinical", clinical, "-q"]))
            pacs_s.append(_timed(["predict", "--run", str(tmp / "run"), "--out", str(pacs_out), "--dicomweb",
                                  server.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical", clinical,
                                  "--store-results", "-q"]))
            a = pd.read_csv(folder_out).set_index("case_id").sort_index()
            b = pd.read_csv(pacs_out).set_index("case_id").sort_index()
            if list(a.index) != list(b.index) or not np.allclose(a["prob_1"], b["prob_1"], atol=1e-4):
                raise SystemExit("PACS and folder predictions differ")
        n_sr = len(server.instances()) - sum(len(list(d.glob("*.dcm"))) for d in case_dirs(tmp / "cohort"))
        if n_sr != n:
            raise SystemExit(f"expected {n} result SRs on the server, found {n_sr}")
    finally:
        server.stop()
    f, p = float(np.median(folder_s)), float(np.median(pacs_s))
    return {"pacs_s": round(p, 2), "folder_s": round(f, 2), "overhead": round(p / f - 1, 3), "studies": n}


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    reason = why_unavailable()
    if reason:
        raise SystemExit(f"pacs_throughput: {reason}")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        result = run(a.studies, a.repeats, Path(d))
    print(json.dumps(result))


if __name__ == "__main__":
    main_()
