"""Studies from a PACS vs the same studies from a folder: ``mmai predict`` wall time.

A synthetic DICOM cohort (``mmai synth``, one CT series of 40 slices per study) is sent to a local
Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, started on 127.0.0.1) by STOW-RS; a tiny
model is trained on it. Then, each timed in this process:

- folder: ``mmai predict --dicom-root IMAGES --clinical clinical.csv``
- pacs:   ``mmai predict --dicomweb URL --query ModalitiesInStudy=CT --clinical clinical.csv
  --store-results`` (QIDO-RS search, WADO-RS retrieve into the cache, predict, one SR per study
  stored by STOW-RS, cache cleaned per study)

The PACS run's probabilities are checked against the folder run (within 1e-4). Everything (cohort,
Orthanc's storage, the PACS cache) lives in ``--work DIR`` (default: a temporary folder on the RAM
disk /dev/shm where there is one, else in the system's temporary folder; ``--work /tmp`` measures a
disk cache). The line before the last gives the CPU seconds of each path (this process with its
preparing processes, and Orthanc), the load average and the work folder, because on a shared
machine wall time depends on the other jobs. The last line is JSON:
``{"pacs_s", "folder_s", "overhead", "studies"}`` with overhead = pacs_s / folder_s - 1.

    python benchmarks/pacs_throughput.py [--studies 100] [--repeats 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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

STAGES = {  # main-process functions timed with --stages: (module, qualified name)
    "retrieve (HTTP, split, write)": ("mmai.pacs.dicomweb", "DicomWebSource.retrieve"),
    "  of which writing parts": ("mmai.pacs.cache", "StudyCache.add_study_parts"),
    "SR build": ("mmai.pacs.sr", "build_sr"),
    "SR evidence list": ("mmai.pacs.predict", "_evidence"),
    "STOW-RS (encode, send)": ("mmai.pacs.dicomweb", "DicomWebSource.store"),
    "model batches (predict_batch)": ("mmai.inference.predictor", "Predictor.predict_batch"),
    "cache release": ("mmai.pacs.cache", "StudyCache.release"),
}


def _time_stages() -> dict[str, list[float]]:
    """Wrap the :data:`STAGES` functions to add their thread CPU seconds to the returned dict."""
    import functools
    import importlib

    spent: dict[str, list[float]] = {k: [0.0] for k in STAGES}
    for key, (module, qual) in STAGES.items():
        owner: object = importlib.import_module(module)
        *path, name = qual.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, name)

        def timed(*args: object, _fn=fn, _acc=spent[key], **kwargs: object) -> object:
            t0 = time.thread_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                _acc[0] += time.thread_time() - t0

        setattr(owner, name, functools.wraps(fn)(timed))
    return spent


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(args: list[str], server_pid: int, cpu: dict[str, list[float]], key: str) -> float:
    """Run ``mmai ARGS``; its wall seconds (and the CPU seconds of this process with its children and
    of Orthanc appended to ``cpu[key]``)."""
    t, o = os.times(), _cpu(server_pid)
    t0 = time.perf_counter()
    rc = main(args)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"mmai {' '.join(args[:1])} failed with exit status {rc}")
    t1 = os.times()
    own = (t1.user + t1.system + t1.children_user + t1.children_system) - \
        (t.user + t.system + t.children_user + t.children_system)
    cpu[key].append(own)
    cpu[key + "_orthanc"].append(_cpu(server_pid) - o)
    return wall


def run(n: int, repeats: int, tmp: Path, stages: bool = False) -> dict[str, float | int]:
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
        cpu: dict[str, list[float]] = {k: [] for k in ("folder", "folder_orthanc", "pacs", "pacs_orthanc")}
        load = [os.getloadavg()[0]]
        pid = server.process.pid
        spent = _time_stages() if stages else {}
        for r in range(repeats):
            folder_out, pacs_out = tmp / f"folder{r}.csv", tmp / f"pacs{r}.csv"
            folder_s.append(_timed(["predict", "--run", str(tmp / "run"), "--out", str(folder_out), "--dicom-root",
                                    str(tmp / "cohort" / "images"), "--clinical", clinical, "-q"], pid, cpu, "folder"))
            for acc in spent.values():
                acc[0] = 0.0
            pacs_s.append(_timed(["predict", "--run", str(tmp / "run"), "--out", str(pacs_out), "--dicomweb",
                                  server.dicomweb, "--query", "ModalitiesInStudy=CT", "--clinical", clinical,
                                  "--store-results", "-q"], pid, cpu, "pacs"))
            if spent:  # the PACS run's main-process stages, CPU ms per study
                print(json.dumps({"pacs_main_process_cpu_ms_per_study": {k: round(1e3 * v[0] / n, 2)
                                                                           for k, v in spent.items()}}))
            load.append(os.getloadavg()[0])
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
    med = {k: round(float(np.median(v)), 2) for k, v in cpu.items()}
    cpu_f, cpu_p = med["folder"] + med["folder_orthanc"], med["pacs"] + med["pacs_orthanc"]
    print(json.dumps({"cpu_s": med, "cpu_overhead": round(cpu_p / cpu_f - 1, 3), "load_avg_1min": load,
                      "work": str(tmp)}))
    return {"pacs_s": round(p, 2), "folder_s": round(f, 2), "overhead": round(p / f - 1, 3), "studies": n}


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--stages", action="store_true", help="also print the CPU ms per study of the PACS run's "
                    "main-process stages (retrieval, SR, STOW-RS, model)")
    ap.add_argument("--work", default=None, help="folder for the cohort, Orthanc's storage and the PACS cache "
                    "(default: /dev/shm when present, else the system's temporary folder)")
    a = ap.parse_args()
    reason = why_unavailable()
    if reason:
        raise SystemExit(f"pacs_throughput: {reason}")
    logging.disable(logging.WARNING)
    work = a.work or ("/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None)
    with tempfile.TemporaryDirectory(prefix="mmai-pacs-bench-", dir=work) as d:
        result = run(a.studies, a.repeats, Path(d), stages=a.stages)
    print(json.dumps(result))


if __name__ == "__main__":
    main_()
