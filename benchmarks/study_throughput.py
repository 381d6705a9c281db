"""Studies per second from a DICOM root to a predictions CSV: ``mmai predict --dicom-root`` against the
pipeline a MONAI user would write from MONAI's tutorials, on the same studies and cores.

Setup (not timed): ``--n`` full-size synthetic chest CT studies (512 x 512 x 400 at 0.7 x 0.7 x
1.25 mm, the generator of benchmarks/predict_throughput.py with a seed per study) written as DICOM
series under a temporary root (one study per folder, int16 with rescale intercept -1024), and a run
trained for one epoch on a small ``mmai synth`` cohort with ``pipelines/ct_chest.yaml``'s image
section (1.5 mm, lung + mediastinal windows, body crop) and a windowed cross-attention model
(``model.windows``: 96^3 windows, overlap 0.25, batch 2; the demo's ResNet 8-16-32-64).

- ``mmai``: ``python -m mmai predict --run RUN --dicom-root ROOT --out preds.csv`` in a subprocess
  (default ``--workers``: the usable cores; the model then runs on the cores the workers leave, at
  least one thread, one study per model call), wall time from start to the CSV; each study: scan,
  series selection, read, preprocessing (the fast chain) and the run's mask-free focal inventory
  (both in a worker), window encoding, fusion.
- ``mmai`` same work (skipped with ``--skip-same-work``): the same command on the same studies with
  a second run trained like the first but with ``image.descriptors: false``, so each study is read,
  preprocessed, window-encoded and fused, the work the MONAI pipeline does, without the focal
  inventory (~1 CPU-s per study in the workers) that the default run adds as model features.
- ``monai``: the tutorial pipeline in one process: ``LoadImaged`` with MONAI's ``PydicomReader``,
  ``EnsureChannelFirstd``, ``Orientationd(RAS)``, ``Spacingd(1.5 mm, bilinear)``, one
  ``ScaleIntensityRanged`` per window + ``ConcatItemsd``, ``CropForegroundd`` (body = above -500 HU),
  through ``monai.data.DataLoader`` (``num_workers`` = the same cores), then
  ``sliding_window_inference`` of the same trained encoder (same roi, overlap and batch, gaussian
  blending of the feature maps) + the same token projection and fusion (cross-attention, head); the
  outputs are written to a CSV.

``stage_s``: mmai's seconds per stage of one study, measured in this process on the first study
after both pipelines ran, with the torch threads ``mmai predict`` gives each stage (a worker reads
and preprocesses with 1 thread; the model gets the cores the workers leave): start-up (a fresh
process importing predict's modules and loading the run), scan of the root, read + preprocess,
focal inventory, model; ``cpu_s`` the same in CPU seconds; plus both wall times and both CPU times (``mmai_cpu_s``:
the predict process and its workers; ``monai_cpu_s``: this process and its DataLoader workers
during the timed loop). MONAI's wall time starts after its imports and model load; mmai's
includes them (``start_s``). ``speedup_end_to_end``: both from process start, MONAI's wall time
plus ``monai_start_s`` (a fresh process importing what the tutorial pipeline imports and loading
the same network, measured after both pipelines ran) over mmai's; ``speedup`` (the acceptance
figure) is unchanged. Same work (the second mmai run, timed right after the first and before
MONAI's): ``mmai_same_work_wall_s`` and ``mmai_same_work_cpu_s`` (as ``mmai_wall_s`` and
``mmai_cpu_s``), ``mmai_same_work_studies_per_s``, ``speedup_same_work`` (its studies/s over
MONAI's: ``speedup`` for the same work), ``speedup_same_work_end_to_end`` (MONAI's wall time plus
``monai_start_s`` over its wall time), ``speedup_same_work_cpu`` (``monai_cpu_s`` over its CPU
seconds), ``peak_rss_same_work_gb`` and ``rows_same_work``; all None with ``--skip-same-work``.
``load_average_1min``: the machine's load before and after each pipeline (the machine may be
shared). ``peak_rss_gb``: the peak
resident memory of the ``mmai predict`` process (VmHWM) or of its largest worker (measured inside it);
``peak_rss_monai_gb``: this process's peak (the MONAI pipeline, its DataLoader in-process part,
and writing the studies; training runs in a subprocess). The last line is JSON:
``{"mmai_studies_per_s", "monai_studies_per_s", "speedup", "speedup_end_to_end", "monai_start_s",
"speedup_same_work", "mmai_same_work_wall_s", "mmai_same_work_cpu_s", "stage_s", "peak_rss_gb", ...}``.

    python benchmarks/study_throughput.py [--n 6] [--workers N] [--skip-monai] [--skip-same-work]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
WINDOWS = {"roi_size": [96, 96, 96], "overlap": 0.25, "batch": 2}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_studies(root: Path, n: int) -> list[Path]:
    """``n`` synthetic chest CT DICOM series (one study per folder)."""
    from predict_throughput import synth_ct

    from mmai.io.dicom_write import write_series

    folders = []
    for i in range(n):
        vol, _ = synth_ct(seed=i)
        folder = root / f"study{i:03d}"
        write_series(vol.astype(np.float32), folder, spacing=(0.7, 0.7, 1.25), modality="CT",
                     patient_id=f"P{i:03d}", rescale_slope=1.0, rescale_intercept=-1024.0,
                     series_description="CHEST CT")
        folders.append(folder)
    return folders


def windowed_pipeline(tmp: Path, batch_size: int, *, same_work: bool = False) -> Path:
    """TMP/pipe.yaml: the demo pipeline with ct_chest's image section (no series rule, volumes cached in
    memory) and a windowed model (:data:`WINDOWS`), trained one epoch at ``batch_size`` (setup only:
    the timed runs need a trained run's weights, not good ones). ``same_work``: TMP/pipe_same_work.yaml,
    the same pipeline with ``image.descriptors: false`` (no focal inventory: the work the MONAI
    pipeline does); otherwise ``descriptors`` keeps its default (``auto``: the inventory is on)."""
    demo = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    chest = yaml.safe_load((ROOT / "pipelines" / "ct_chest.yaml").read_text())
    cfg = {**demo, "image": {**chest["image"], "cache": "memory", "cache_dir": None, "modality": "CT"}}
    cfg["image"].pop("select", None)
    if same_work:
        cfg["image"]["descriptors"] = False
    cfg["model"] = {**demo["model"], "windows": WINDOWS}
    cfg["train"] = {**demo["train"], "epochs": 1, "batch_size": batch_size, "val_fraction": 0.25}
    pipe = tmp / ("pipe_same_work.yaml" if same_work else "pipe.yaml")
    pipe.write_text(yaml.safe_dump(cfg))
    return pipe


def train_run(tmp: Path, *, same_work: bool = False) -> tuple[Path, Path]:
    """A one-epoch run with ct_chest's image section and a windowed model -> (run dir, pipeline yaml):
    TMP/run, or with ``same_work`` TMP/run_same_work (``image.descriptors: false``,
    :func:`windowed_pipeline`); both on the same synthetic cohort (TMP/cohort, written once)."""
    from mmai.cli import main

    pipe = windowed_pipeline(tmp, batch_size=4, same_work=same_work)
    if not (tmp / "cohort" / "manifest.csv").exists() \
            and main(["synth", "--out", str(tmp / "cohort"), "--n", "12", "--seed", "0", "-q"]) != 0:
        raise SystemExit("synth failed")
    out = tmp / ("run_same_work" if same_work else "run")
    r = subprocess.run([sys.executable, "-m", "mmai", "train", "--config", str(pipe), "--manifest",
                        str(tmp / "cohort" / "manifest.csv"), "--out", str(out), "--threads", str(cores()),
                        "-q"], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if r.returncode != 0:  # a subprocess: its memory is not counted as the MONAI pipeline's (this process)
        raise SystemExit(f"train failed: {r.stderr[-3000:]}")
    return out, pipe


# peak RSS inside the predict process: its own VmHWM (ru_maxrss would start from this benchmark's RSS
# at fork time) and its workers' (forked from it, so their ru_maxrss counts its pages at that moment)
_MEASURED = ("import re, resource, sys\n"
             "from mmai.cli import main\n"
             "rc = main(sys.argv[1:])\n"
             "own = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
             "kb = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
             "sys.stderr.write(f'\\nMMAI_PEAK_RSS_KB {kb}\\n')\n"
             "sys.exit(rc)\n")


def run_mmai(run: Path, root: Path, out: Path, workers: int | None) -> tuple[float, float, float]:
    """``mmai predict`` in a subprocess -> (wall seconds, peak RSS GB of it and its workers, CPU seconds
    of it and its workers)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _MEASURED, "predict", "--run", str(run), "--dicom-root", str(root),
           "--out", str(out), "-q", *(["--workers", str(workers)] if workers else [])]
    c0 = cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"mmai predict failed: {r.stderr[-3000:]}")
    kb = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("MMAI_PEAK_RSS_KB")]
    return wall, (kb[-1] / 2**20 if kb else float("nan")), cpu_s(resource.RUSAGE_CHILDREN) - c0


def cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or of its waited-for children)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _timed(fn: Any) -> tuple[Any, float, float]:
    t0, c0 = time.perf_counter(), cpu_s()
    out = fn()
    return out, time.perf_counter() - t0, cpu_s() - c0


def _fresh_process(code: str, run: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh Python process running ``code`` with the run dir as argv[1]."""
    c0 = cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(run)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                   check=True, capture_output=True)
    return time.perf_counter() - t0, cpu_s(resource.RUSAGE_CHILDREN) - c0


_MMAI_START = ("import sys\nfrom pathlib import Path\n"
               "from mmai.inference.startup import prefer_small_pages, quiet_imports\n"
               "prefer_small_pages()\n"
               "with quiet_imports():\n    from mmai.inference.predictor import Predictor\n"
               "Predictor(Path(sys.argv[1]))\n")  # as mmai.commands.predict starts
_MONAI_START = ("import sys\nfrom pathlib import Path\nimport torch\n"
                "from monai.data import DataLoader, Dataset\nfrom monai.inferers import sliding_window_inference\n"
                "from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd\n"
                "from mmai.inference.predictor import Predictor\nPredictor(Path(sys.argv[1]))\n")


def start_up(run: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh process importing what ``mmai predict`` imports and loading the run."""
    return _fresh_process(_MMAI_START, run)


def monai_start_up(run: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh process importing what the MONAI-tutorial pipeline imports
    (torch, MONAI's data, inferers and transforms) and loading the same trained network (through
    mmai's run loader: the network is mmai's model). Not part of :func:`run_monai`'s timed loop,
    which starts after them; ``speedup_end_to_end`` adds it to MONAI's wall time."""
    return _fresh_process(_MONAI_START, run)


def mmai_stages(run: Path, root: Path, study: Path, workers: int | None) -> dict[str, Any]:
    """Seconds (wall and CPU) of one study's stages in this process, with the torch threads ``mmai
    predict`` gives them: scan of the root, read + preprocess and the focal inventory (a worker: 1
    thread), model (the threads the workers leave, :func:`mmai.inference.pipelined.model_threads`)."""
    from mmai.config import load_config
    from mmai.inference.dicom_cases import predict_cases
    from mmai.inference.pipelined import default_workers, model_threads
    from mmai.inference.predictor import Predictor

    n_workers = default_workers() if workers is None else workers
    threads = model_threads(n_workers) if n_workers >= 2 else torch.get_num_threads()
    before = torch.get_num_threads()
    _, scan, scan_cpu = _timed(lambda: predict_cases(root, None, load_config(run / "config.yaml"), progress=False))
    pred = Predictor(run)
    torch.set_num_threads(1)
    pred.loader.load(str(study))  # warm-up (imports)
    (arr, aff), prep, prep_cpu = _timed(lambda: pred.loader.load(str(study)))
    from mmai.inference.pipelined import worker_measure

    measure = worker_measure(pred)  # the focal inventory of a run that takes it (measured in the worker)
    _, focal, focal_cpu = _timed(lambda: measure(arr, aff)) if measure is not None else (None, 0.0, 0.0)
    x = torch.from_numpy(arr)[None]
    n_feat = pred.pre.num_features if pred.pre is not None else 0
    args = (x, torch.ones(1), torch.zeros(1, n_feat), torch.zeros(1, n_feat))
    affine = torch.as_tensor(aff, dtype=torch.float32)[None]
    torch.set_num_threads(threads)
    with torch.inference_mode():
        pred.model(*args, affine=affine)
        _, model, model_cpu = _timed(lambda: pred.model(*args, affine=affine))
    torch.set_num_threads(before)
    start, start_cpu = start_up(run)
    return {"start_s": round(start, 3), "scan_root_s": round(scan, 3), "read_preprocess_s": round(prep, 3),
            "focal_inventory_s": round(focal, 3), "model_s": round(model, 3),
            "cpu_s": {"start": round(start_cpu, 3), "scan_root": round(scan_cpu, 3),
                      "read_preprocess": round(prep_cpu, 3), "focal_inventory": round(focal_cpu, 3),
                      "model": round(model_cpu, 3)},
            "model_threads": threads, "workers": n_workers, "model_grid": list(arr.shape)}


def run_monai(run: Path, pipe: Path, folders: list[Path], out: Path) -> tuple[float, float]:
    """The MONAI-tutorial pipeline (module docstring) over the studies -> (wall seconds, CPU seconds of
    this process and its DataLoader workers)."""
    from monai.data import DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        ConcatItemsd,
        CropForegroundd,
        DeleteItemsd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    from mmai.inference.predictor import Predictor

    cfg = yaml.safe_load(pipe.read_text())["image"]
    (lung_lo, lung_hi), (med_lo, med_hi) = cfg["intensity"]["windows"]
    body = (cfg["foreground"] - lung_lo) / (lung_hi - lung_lo)  # -500 HU on the lung window's 0..1 scale
    tf = Compose([
        LoadImaged("image", reader="PydicomReader", image_only=True),
        EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd("image", pixdim=cfg["spacing"], mode="bilinear"),
        ScaleIntensityRanged("image", a_min=lung_lo, a_max=lung_hi, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd("image", source_key="image", select_fn=lambda x: x > body, margin=2),
    ])

    class TwoWindows:
        """The mediastinal window from the lung window's values (both clip-and-scale of the same HU)."""

        def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
            lung = d["image"]
            hu = lung * (lung_hi - lung_lo) + lung_lo
            d["med"] = ((hu.clamp(med_lo, med_hi) - med_lo) / (med_hi - med_lo))
            return d

    tf = Compose([*tf.transforms, TwoWindows(), ConcatItemsd(["image", "med"], "image"), DeleteItemsd("med")])
    pred = Predictor(run)
    model = pred.model
    net = model.encoder
    n_feat = pred.pre.num_features if pred.pre is not None else 0
    data = [{"image": str(f), "case_id": f.name} for f in folders]
    loader = DataLoader(Dataset(data, tf), batch_size=1, num_workers=cores())
    rows = []
    c0 = cpu_s() + cpu_s(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            x = batch["image"].as_tensor()
            fmap = sliding_window_inference(x, WINDOWS["roi_size"], WINDOWS["batch"], net.forward_features,
                                            overlap=WINDOWS["overlap"], mode="gaussian")
            tok = model.img_proj(fmap.flatten(2).transpose(1, 2))  # (1, N, D)
            model.image_tokens = lambda image, affine=None, tok=tok: (tok, None)  # the fusion on these tokens
            logit = model(x, torch.ones(1), torch.zeros(1, n_feat), torch.zeros(1, n_feat))
            del model.image_tokens
            rows.append({"case_id": batch["case_id"][0], "logit": float(logit.flatten()[0])})
    wall = time.perf_counter() - t0
    cpu = cpu_s() + cpu_s(resource.RUSAGE_CHILDREN) - c0  # the DataLoader's workers are joined by now
    import pandas as pd

    pd.DataFrame(rows).to_csv(out, index=False)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="studies (default 6)")
    ap.add_argument("--workers", type=int, default=None, help="mmai predict --workers (default: its own)")
    ap.add_argument("--skip-monai", action="store_true", help="time mmai only")
    ap.add_argument("--skip-same-work", action="store_true",
                    help="skip the second mmai run (image.descriptors: false, the MONAI pipeline's work)")
    a = ap.parse_args(argv)
    torch.set_num_threads(cores())
    with tempfile.TemporaryDirectory(prefix="mmai_studies_") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        folders = write_studies(tmp / "root", a.n)
        run, pipe = train_run(tmp)
        run_same = None if a.skip_same_work else train_run(tmp, same_work=True)[0]
        setup = time.perf_counter() - t0
        load_before = os.getloadavg()
        mmai_wall, rss_mmai, mmai_cpu = run_mmai(run, tmp / "root", tmp / "preds.csv", a.workers)
        load_mid = os.getloadavg()
        # the same studies without the focal inventory (read, chain, window encoding, fusion)
        same = None if run_same is None else run_mmai(run_same, tmp / "root", tmp / "preds_same.csv", a.workers)
        load_same = os.getloadavg()
        import pandas as pd

        n_rows = len(pd.read_csv(tmp / "preds.csv"))
        n_rows_same = None if same is None else len(pd.read_csv(tmp / "preds_same.csv"))
        monai_wall, monai_cpu = (None, None) if a.skip_monai else run_monai(run, pipe, folders, tmp / "monai.csv")
        load_after = os.getloadavg()
        stages = mmai_stages(run, tmp / "root", folders[0], a.workers)
        monai_start = None if a.skip_monai else monai_start_up(run)
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mmai_sps = n_rows / mmai_wall
    monai_sps = None if monai_wall is None else a.n / monai_wall
    same_sps = None if same is None or n_rows_same is None else n_rows_same / same[0]
    result = {"mmai_studies_per_s": round(mmai_sps, 4),
              "monai_studies_per_s": None if monai_sps is None else round(monai_sps, 4),
              "speedup": None if monai_sps is None else round(mmai_sps / monai_sps, 2),
              # both from process start: MONAI's imports and model load (a fresh process) + its timed loop
              "speedup_end_to_end": None if monai_start is None or monai_wall is None
              else round((monai_wall + monai_start[0]) / mmai_wall, 2),
              "monai_start_s": None if monai_start is None
              else {"wall": round(monai_start[0], 3), "cpu": round(monai_start[1], 3)},
              # the same work as the MONAI pipeline: a run with image.descriptors: false on the same studies
              "mmai_same_work_studies_per_s": None if same_sps is None else round(same_sps, 4),
              "speedup_same_work": None if same_sps is None or monai_sps is None else round(same_sps / monai_sps, 2),
              "speedup_same_work_end_to_end": None if same is None or monai_start is None or monai_wall is None
              else round((monai_wall + monai_start[0]) / same[0], 2),
              "speedup_same_work_cpu": None if same is None or monai_cpu is None else round(monai_cpu / same[2], 2),
              "mmai_same_work_wall_s": None if same is None else round(same[0], 2),
              "mmai_same_work_cpu_s": None if same is None else round(same[2], 2),
              "stage_s": {**stages, "mmai_wall_s": round(mmai_wall, 2),
                          "monai_wall_s": None if monai_wall is None else round(monai_wall, 2),
                          "mmai_cpu_s": round(mmai_cpu, 2),
                          "monai_cpu_s": None if monai_cpu is None else round(monai_cpu, 2)},
              "load_average_1min": {"before": round(load_before[0], 2), "after_mmai": round(load_mid[0], 2),
                                    "after_mmai_same_work": None if same is None else round(load_same[0], 2),
                                    "after_monai": round(load_after[0], 2)},
              "peak_rss_gb": round(rss_mmai, 3), "peak_rss_monai_gb": round(rss_self, 3),
              "peak_rss_same_work_gb": None if same is None else round(same[1], 3),
              "n_studies": a.n, "rows": n_rows, "rows_same_work": n_rows_same, "cores": cores(),
              "setup_s": round(setup, 1),
              "study": {"shape": [512, 512, 400], "spacing_mm": [0.7, 0.7, 1.25], "format": "DICOM, int16"},
              "windows": WINDOWS, "pipeline": "pipelines/ct_chest.yaml (image section)"}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
