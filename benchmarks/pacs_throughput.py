"""Studies from a PACS vs the same studies from a folder: ``mmai predict`` wall time.

Two profiles (``--profile``):

- ``ct`` (default; what the issue is about): ``--studies`` chest CT studies of 512 x 512 x ``--slices``
  (96: 0.7 x 0.7 x 2.5 mm, 240 mm, int16, one 512 kB file per slice, 50 MB per study), predicted at
  full resolution through pipelines/ct_chest.yaml's image section (1.5 mm, two windows, body crop,
  ``size: null``) by benchmarks/study_throughput.py's windowed model (96^3 windows; trained one epoch
  on 8 ``mmai synth`` patients as setup, or reused with ``--ct-run DIR``). The studies are POSTed to
  Orthanc's REST API as files. No clinical table (the studies' patients are in none).
- ``tiny``: a ``mmai synth`` cohort (one CT series of 40 slices of 80 x 80 per study, 0.55 MB) sent
  by STOW-RS, the tiny test model (1 ms per study) trained 1 epoch, the cohort's clinical table: it
  measures only the PACS path's fixed per-study costs (search, HTTP, SR, STOW-RS, Orthanc).

The studies go to a local Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, started on
127.0.0.1). Then, each timed in this process:

- folder: ``mmai predict --dicom-root IMAGES [--clinical clinical.csv]``
- pacs:   ``mmai predict --dicomweb URL --query ModalitiesInStudy=CT [--clinical clinical.csv]
  --store-results`` (QIDO-RS search, WADO-RS retrieve into the cache, predict, one SR per study
  stored by STOW-RS, cache cleaned per study)

The PACS run's probabilities are checked against the folder run (within 1e-4), and the server must
hold exactly one SR per study. Everything (cohort, Orthanc's storage, the PACS cache) lives in
``--work DIR`` (default: tiny: a temporary folder on the RAM disk /dev/shm where there is one; ct:
the system's temporary folder, as 2 x 5 GB do not belong in RAM). The line before the last gives the
CPU seconds of each path (this process with its preparing processes, and Orthanc), the load average
before and after each timed run and the work folder, because on a shared machine wall time depends
on the other jobs; ``--stages`` adds the main-process CPU ms per study of each stage. The last line
is JSON: ``{"pacs_s", "folder_s", "overhead", "studies", "profile"}`` with overhead = pacs_s /
folder_s - 1.

    python benchmarks/pacs_throughput.py [--profile ct|tiny] [--studies 100] [--slices 96] [--repeats 1]
        [--work DIR] [--ct-run DIR] [--stages]
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
sys.path.insert(0, str(ROOT / "benchmarks"))  # the CT generator and run of study_throughput.py

from mmai.cli import main  # noqa: E402
from tests.pacs.helpers import case_dirs, upload  # noqa: E402
from tests.pacs.orthanc import start_orthanc, why_unavailable  # noqa: E402
from tests.test_end_to_end import tiny_pipeline  # noqa: E402

CT_SPACING = (0.7, 0.7, 2.5)  # mm: a chest CT's 512 x 512 matrix, 2.5 mm reconstructions
STAGES = {  # main-process functions timed with --stages: (module, qualified name)
    "retrieve (HTTP, split, write)": ("mmai.pacs.dicomweb", "DicomWebSource.retrieve"),
    "  of which writing parts": ("mmai.pacs.cache", "StudyCache.add_study_parts"),
    "SR build": ("mmai.pacs.sr", "build_sr"),
    "SR evidence list": ("mmai.pacs.predict", "_evidence"),
    "STOW-RS (encode, send)": ("mmai.pacs.dicomweb", "DicomWebSource.store"),
    "model batches (predict_batch)": ("mmai.inference.predictor", "Predictor.predict_batch"),
    "cache release": ("mmai.pacs.cache", "StudyCache.release"),
    "  of which volumes loaded in place": ("mmai.inference.pipelined", "PrefetchLoader._in_place"),
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


def setup_tiny(tmp: Path, n: int) -> tuple[Path, Path, list[Path], list[str]]:
    """``--profile tiny``: a ``mmai synth`` cohort (40 slices of 80 x 80 per study) and the tiny test model
    trained 1 epoch -> (run dir, DICOM root, study folders, predict's clinical options)."""
    assert main(["synth", "--out", str(tmp / "cohort"), "--n", str(n), "--seed", "3", "-q", "--workers", "2"]) == 0
    pipe = tiny_pipeline(tmp)
    train = tmp / "cohort" / "train.csv"  # image paths are relative to the manifest
    pd.read_csv(tmp / "cohort" / "manifest.csv").head(min(n, 32)).to_csv(train, index=False)
    assert main(["preprocess", "--config", str(pipe), "--input", str(train), "--out", str(tmp / "pre"), "-q"]) == 0
    assert main(["train", "--config", str(pipe), "--manifest", str(tmp / "pre" / "manifest.csv"), "--out",
                 str(tmp / "run"), "--epochs", "1", "--threads", "1", "-q"]) == 0
    return tmp / "run", tmp / "cohort" / "images", case_dirs(tmp / "cohort"), \
        ["--clinical", str(tmp / "cohort" / "clinical.csv")]


def synth_chest(slices: int, seed: int) -> np.ndarray:
    """A chest-like int16 HU volume of 512 x 512 x ``slices`` (benchmarks/predict_throughput.py's
    ``synth_ct`` layout: body ellipse, two lungs, a spine, air above and below; 6 nodules of 4-8 mm
    anywhere in the lungs' slab)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(512) - 256, np.arange(512) - 256, indexing="ij")
    sl = np.full((512, 512), -1000, np.int16)
    sl[(x / 230) ** 2 + (y / 160) ** 2 < 1] = 40
    sl[(((x - 95) / 75) ** 2 + (y / 110) ** 2 < 1) | (((x + 95) / 75) ** 2 + (y / 110) ** 2 < 1)] = -850
    sl[(x / 25) ** 2 + ((y + 120) / 25) ** 2 < 1] = 700
    vol = np.repeat(sl[:, :, None], slices, axis=2)
    edge = max(1, slices // 10)
    vol[:, :, :edge] = -1000
    vol[:, :, -edge:] = -1000
    zz = np.arange(slices)
    for _ in range(6):
        c = rng.integers([170, 200, edge + 4], [330, 320, slices - edge - 4])
        r = rng.uniform(2, 4)
        g = np.meshgrid(np.arange(c[0] - 8, c[0] + 8), np.arange(c[1] - 8, c[1] + 8), zz, indexing="ij")
        d = sum(((gi - ci) * sp) ** 2 for gi, ci, sp in zip(g, c, CT_SPACING, strict=True))
        sub = vol[c[0] - 8:c[0] + 8, c[1] - 8:c[1] + 8]
        sub[d < r * r] = 60
    vol += rng.normal(0, 15, size=(512, 512)).astype(np.int16)[:, :, None]
    return vol


def _write_ct(args: tuple[Path, int, int]) -> Path:
    """One synthetic chest CT study as a DICOM series (int16, rescale intercept -1024)."""
    from mmai.io.dicom_write import write_series

    folder, seed, slices = args
    write_series(synth_chest(slices, seed).astype(np.float32), folder, spacing=CT_SPACING, modality="CT",
                 patient_id=f"P{seed:03d}", rescale_slope=1.0, rescale_intercept=-1024.0,
                 series_description="CHEST CT")
    return folder


def setup_ct(tmp: Path, n: int, slices: int, run_dir: Path | None = None) -> tuple[Path, Path, list[Path], list[str]]:
    """``--profile ct``: ``n`` chest CT studies of 512 x 512 x ``slices`` (0.7 x 0.7 x 2.5 mm, int16, one
    file of 512 kB per slice) and benchmarks/study_throughput.py's run (pipelines/ct_chest.yaml's image
    section at 1.5 mm, full resolution, windowed encoder) -> as :func:`setup_tiny` (no clinical table:
    the studies' patients are not in one; clinical_present = 0 on both paths)."""
    from concurrent.futures import ProcessPoolExecutor

    from study_throughput import windowed_pipeline

    root = tmp / "images"
    with ProcessPoolExecutor(2) as pool:
        dirs = list(pool.map(_write_ct, [(root / f"study{i:03d}", i, slices) for i in range(n)]))
    pipe = windowed_pipeline(tmp, batch_size=2)
    run_dir = Path(run_dir) if run_dir is not None else tmp / "run"
    if not (run_dir / "config.yaml").exists():
        # the weights only need to be a trained run's: 8 small synth patients, one epoch (setup, not timed)
        assert main(["synth", "--out", str(tmp / "cohort"), "--n", "8", "--seed", "0", "-q"]) == 0
        assert main(["train", "--config", str(pipe), "--manifest", str(tmp / "cohort" / "manifest.csv"), "--out",
                     str(run_dir), "--threads", "2", "-q"]) == 0
    return run_dir, root, dirs, []


def _upload_files(server: object, dirs: list[Path]) -> None:
    """POST every file to Orthanc's REST API as it is (no decoding: the CT profile's 10^4 files)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [f for d in dirs for f in sorted(d.glob("*.dcm"))]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda f: server.post("/instances", f.read_bytes()), files))  # type: ignore[attr-defined]


def run(n: int, repeats: int, tmp: Path, stages: bool = False, profile: str = "tiny",
        slices: int = 96, ct_run: Path | None = None) -> dict[str, float | int | str]:
    t_setup = time.perf_counter()
    if profile == "ct":
        run_dir, image_root, dirs, clinical = setup_ct(tmp, n, slices, ct_run)
    else:
        run_dir, image_root, dirs, clinical = setup_tiny(tmp, n)
    server = start_orthanc(tmp / "orthanc")
    try:
        if profile == "ct":
            _upload_files(server, dirs)
        else:
            upload(server, dirs, "stow")
        n_source = len(server.instances())
        setup_s = time.perf_counter() - t_setup
        folder_s, pacs_s = [], []
        cpu: dict[str, list[float]] = {k: [] for k in ("folder", "folder_orthanc", "pacs", "pacs_orthanc")}
        load = [os.getloadavg()[0]]
        pid = server.process.pid
        spent = _time_stages() if stages else {}
        for r in range(repeats):
            folder_out, pacs_out = tmp / f"folder{r}.csv", tmp / f"pacs{r}.csv"
            for acc in spent.values():
                acc[0] = 0.0
            folder_s.append(_timed(["predict", "--run", str(run_dir), "--out", str(folder_out), "--dicom-root",
                                    str(image_root), *clinical, "-q"], pid, cpu, "folder"))
            load.append(os.getloadavg()[0])
            if spent:
                print(json.dumps({"folder_main_process_cpu_ms_per_study": {
                    k: round(1e3 * spent[k][0] / n, 2) for k in ("model batches (predict_batch)",
                                                               "  of which volumes loaded in place")}}))
            for acc in spent.values():
                acc[0] = 0.0
            pacs_s.append(_timed(["predict", "--run", str(run_dir), "--out", str(pacs_out), "--dicomweb",
                                  server.dicomweb, "--query", "ModalitiesInStudy=CT", *clinical,
                                  "--store-results", "-q"], pid, cpu, "pacs"))
            if spent:  # the PACS run's main-process stages, CPU ms per study
                print(json.dumps({"pacs_main_process_cpu_ms_per_study": {k: round(1e3 * v[0] / n, 2)
                                                                           for k, v in spent.items()}}))
            load.append(os.getloadavg()[0])
            a = pd.read_csv(folder_out).set_index("case_id").sort_index()
            b = pd.read_csv(pacs_out).set_index("case_id").sort_index()
            if len(a) != n or list(a.index) != list(b.index) or not np.allclose(a["prob_1"], b["prob_1"], atol=1e-4):
                raise SystemExit("PACS and folder predictions differ")
        n_sr = len(server.instances()) - n_source
        if n_sr != n:
            raise SystemExit(f"expected {n} result SRs on the server, found {n_sr}")
    finally:
        server.stop()
    f, p = float(np.median(folder_s)), float(np.median(pacs_s))
    med = {k: round(float(np.median(v)), 2) for k, v in cpu.items()}
    cpu_f, cpu_p = med["folder"] + med["folder_orthanc"], med["pacs"] + med["pacs_orthanc"]
    mb = sum(f.stat().st_size for d in dirs for f in d.glob("*.dcm")) / 1e6 / n
    print(json.dumps({"profile": profile, "cpu_s": med, "cpu_overhead": round(cpu_p / cpu_f - 1, 3),
                      "load_avg_1min": load, "walls_s": {"folder": folder_s, "pacs": pacs_s},
                      "mb_per_study": round(mb, 2), "setup_s": round(setup_s, 1), "work": str(tmp)}))
    return {"pacs_s": round(p, 2), "folder_s": round(f, 2), "overhead": round(p / f - 1, 3), "studies": n,
            "profile": profile}


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=("ct", "tiny"), default="ct",
                    help="ct: 512 x 512 x --slices CT studies, full-resolution windowed model (default); tiny: "
                    "40 x 80 x 80 studies, a 1 ms model (the PACS path's fixed costs)")
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--slices", type=int, default=96, help="slices per CT study (--profile ct; 512 kB each)")
    ap.add_argument("--ct-run", default=None, help="--profile ct: the trained run's folder; trained there when "
                    "it holds none, reused when it does (the 2-minute training is setup, not timed)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--stages", action="store_true", help="also print the CPU ms per study of the PACS run's "
                    "main-process stages (retrieval, SR, STOW-RS, model)")
    ap.add_argument("--work", default=None, help="folder for the cohort, Orthanc's storage and the PACS cache "
                    "(default: --profile tiny: /dev/shm when present; ct: the system's temporary folder)")
    a = ap.parse_args()
    reason = why_unavailable()
    if reason:
        raise SystemExit(f"pacs_throughput: {reason}")
    logging.disable(logging.WARNING)
    shm = Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK)
    work = a.work or ("/dev/shm" if shm and a.profile == "tiny" else None)
    with tempfile.TemporaryDirectory(prefix="mmai-pacs-bench-", dir=work) as d:
        result = run(a.studies, a.repeats, Path(d), stages=a.stages, profile=a.profile, slices=a.slices,
                     ct_run=Path(a.ct_run) if a.ct_run else None)
    print(json.dumps(result))


if __name__ == "__main__":
    main_()
