"""Full-resolution prediction throughput: mmai's window encoding vs MONAI's sliding_window_inference.

One synthetic chest-CT-like study, 512 x 512 x 400 voxels at 0.7 x 0.7 x 1.25 mm (int16 HU), is
written as a NIfTI file in a temporary folder and read and preprocessed by the REAL pipeline:
``load_config("pipelines/ct_chest.yaml")`` -> :func:`mmai.transforms.pipelines.preprocess_transforms`
(mmai's reader, RAS, ``AntiAliasd``, 1.5 mm isotropic, body mask, lung [-1000, 400] and mediastinal
[-160, 240] HU windows as two channels, body crop, pad to a multiple of 32 with the FOV guard).
The model is built by ``create_model`` with the pipeline's channels and ``model.windows`` (the
pipeline's own, else ``--roi`` / ``--overlap`` / ``--window-batch``). The same encoder then turns the
volume into tokens two ways, in one process, each after one warm-up pass:

- ``mmai``: ``CrossAttentionFusion.image_tokens`` with ``model.windows``, i.e. what ``mmai predict``
  runs before the (cheap) fusion;
- ``monai_swi``: ``monai.inferers.sliding_window_inference`` with the encoder's
  ``forward_features`` as the predictor (same roi, overlap and batch, gaussian blending of the
  feature maps), then the same token projection: how a MONAI user would tile the scan. It gets a
  copy of the encoder as loaded (default memory layout); mmai's tokenizer puts the encoder's weights
  and the window batches in channels-last layout, its one implementation difference that matters here.

``mmai_s`` / ``monai_swi_s``: median seconds of ``--repeats`` runs of the encoding step;
``speedup`` = monai / mmai; ``preprocess_s``: reading the NIfTI + the pipeline (fastest of
``--repeats``), ``stage_s`` its seconds per transform; ``preprocess_reference_s`` /
``reference_stage_s``: the same for the reference chain (``preprocess_transforms(fast=False)``,
MONAI's transforms step by step, the chain before issue 18), run back to back with the fast one so
that machine load hits both alike, and ``preprocess_speedup`` = reference / fast;
``preprocess_over_encoding`` = preprocess_s / mmai_s; ``head_preprocess_s`` (+ ``_reference_s``,
``head_stage_s``): a synthetic 512 x 512 x 300 head CT at 0.45 x 0.45 x 0.6 mm through
``pipelines/ct_head.yaml``, timed the same way; ``studies_per_s`` = 1 / (preprocess_s + mmai's whole model forward);
``peak_rss_gb``: peak resident memory of the whole process (``resource.getrusage``), and
``peak_rss_preprocess_gb`` the peak reached before the model was built (synthesis, file writing
and preprocessing; the reference chain's), ``peak_rss_fast_chain_gb`` the peak after the first
fast-chain run (the fast chain runs first). Every ``*_s`` of the chains has a ``*_cpu_s`` twin:
CPU seconds of the process (``time.process_time``, least of ``--repeats``), per transform in
``stage_cpu_s``; on a shared machine the CPU seconds of a one-thread run (``--threads 1``) are the
figure other jobs inflate least. ``load_average``: the machine's at the start and the end. The last
line is JSON.

    python benchmarks/predict_throughput.py [--repeats 3] [--threads 1] [--preprocess-only] [--device cuda --amp bf16]

``--preprocess-only`` times the two chains on both studies and stops before the model (seconds
instead of minutes; the JSON keeps the preprocessing keys).

``--device cuda`` runs the preprocessing chain and the model on the GPU (``preprocess_transforms(...,
device=...)``); ``--amp bf16`` wraps the encoding in bfloat16 autocast. Both CUDA options are
written for, but have not been run on, a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.models.registry import create_model

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "ct_chest.yaml"


def synth_ct(shape=(512, 512, 400), spacing=(0.7, 0.7, 1.25), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A chest-like int16 HU volume: body ellipse, two lungs, a spine, a few nodules; RAS affine."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]) - shape[0] / 2, np.arange(shape[1]) - shape[1] / 2, indexing="ij")
    body = (x / 230) ** 2 + (y / 160) ** 2 < 1
    lungs = (((x - 95) / 75) ** 2 + (y / 110) ** 2 < 1) | (((x + 95) / 75) ** 2 + (y / 110) ** 2 < 1)
    spine = (x / 25) ** 2 + ((y + 120) / 25) ** 2 < 1
    sl = np.full(shape[:2], -1000, np.int16)
    sl[body] = 40
    sl[lungs] = -850
    sl[spine] = 700
    vol = np.repeat(sl[:, :, None], shape[2], axis=2)
    vol[:, :, : shape[2] // 10] = -1000  # above the shoulders / below the abdomen: air
    vol[:, :, -shape[2] // 10 :] = -1000
    for _ in range(6):  # nodules of 4-8 mm
        c = rng.integers([170, 200, 100], [330, 320, 300])
        r = rng.uniform(3, 6)
        sub = tuple(slice(int(ci - 12), int(ci + 12)) for ci in c)
        g = np.meshgrid(*[np.arange(s.start, s.stop) for s in sub], indexing="ij")
        d = sum(((gi - ci) * sp) ** 2 for gi, ci, sp in zip(g, c, spacing, strict=True))
        vol[sub][d < r * r] = 60
    vol += rng.normal(0, 15, size=shape[:2]).astype(np.int16)[:, :, None]
    return vol, np.diag([*spacing, 1.0])


def synth_head_ct(shape=(512, 512, 300), spacing=(0.45, 0.45, 0.6), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like int16 HU volume: skull shell (1000 HU), brain (35 HU), air around; RAS affine."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]) - shape[0] / 2, np.arange(shape[1]) - shape[1] / 2, indexing="ij")
    vol = np.full(shape, -1000, np.int16)
    for k in range(shape[2]):
        s = np.sqrt(max(0.0, 1 - ((k - shape[2] * 0.45) / (shape[2] * 0.5)) ** 2))  # the head narrows up and down
        r = (x / (190 * s + 1e-3)) ** 2 + (y / (160 * s + 1e-3)) ** 2
        vol[:, :, k][r < 1] = 1000
        vol[:, :, k][r < 0.85] = 35
    vol += rng.normal(0, 8, size=shape[:2]).astype(np.int16)[:, :, None]
    return vol, np.diag([*spacing, 1.0])


def rss_gb() -> float:
    """Peak resident memory of this process so far (GB; Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_nifti(folder: Path, head: bool = False) -> Path:
    """The synthetic study as an int16 NIfTI (what a converted CT series looks like on disk)."""
    import nibabel as nib

    vol, affine = synth_head_ct() if head else synth_ct()
    path = folder / ("head.nii" if head else "ct.nii")  # uncompressed: the timing is the pipeline, not gzip
    img = nib.Nifti1Image(vol, affine)
    img.set_data_dtype(np.int16)
    nib.save(img, str(path))
    return path


def run_stages(chain: Any, data: dict[str, Any], device: str
               ) -> tuple[dict[str, Any], dict[str, float], dict[str, float]]:
    """Run a Compose chain transform by transform -> (output, {transform name: wall seconds},
    {transform name: CPU seconds of this process, all threads}); on a shared machine the CPU
    seconds of a one-thread run (``--threads 1``) are the figure that other jobs do not inflate."""
    stages: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for t in chain.transforms:
        t0, c0 = time.perf_counter(), time.process_time()
        data = t(data)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        name = type(t).__name__.lstrip("_")
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
    return data, stages, cpu


def preprocess(path: Path, device: str, *, fast: bool = True,
               pipeline: Path = PIPELINE) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read + preprocess with pipelines/ct_chest.yaml -> ((1, C, D, H, W) float32, (1, 4, 4) affine, dict
    with ``fov_lost_fraction`` and ``stage_s``); ``fast=False``: the reference chain (MONAI step by step)."""
    from mmai.config import load_config
    from mmai.transforms.pipelines import KEY, preprocess_transforms

    cfg = load_config(str(pipeline))
    image_cfg = dataclasses.replace(cfg.image, cache="memory", cache_dir=None)  # time the chain, not a cache
    chain = preprocess_transforms(image_cfg, device=device, fast=fast)
    c0 = time.process_time()
    with torch.no_grad():
        out, stages, cpu = run_stages(chain, {KEY: str(path)}, device)
    x = out[KEY]
    info = {"fov_lost_fraction": float(out.get("fov_lost_fraction", 0.0)),
            "stage_s": {k: round(v, 3) for k, v in stages.items()},
            "stage_cpu_s": {k: round(v, 3) for k, v in cpu.items()}, "cpu_s": time.process_time() - c0}
    return x.as_tensor()[None].contiguous(), x.affine.float()[None], info


def time_preprocess(path: Path, device: str, repeats: int, *, reference: bool,
                    pipeline: Path = PIPELINE) -> dict[str, Any]:
    """Time the fast chain (and the reference chain, back to back with it) ``repeats`` times each ->
    ``{"fast": {...}, "reference": {...}, "rss_fast_gb"}``; per chain ``wall_s`` (fastest run) with
    that run's ``stage_s``, and ``cpu_s`` (least CPU) with that run's ``stage_cpu_s``; ``output``
    of the fast chain's last run. The fast chain runs first, so ``rss_fast_gb`` (peak RSS after its
    first run) is the peak of the synthesis, the file writing and the fast chain, before the reference
    chain ever runs."""
    runs: dict[str, list[tuple[float, dict[str, Any]]]] = {"fast": [], "reference": []}
    out: dict[str, Any] = {}
    kept = None
    for _ in range(max(1, repeats)):
        for name in ("fast", "reference") if reference else ("fast",):
            t0 = time.perf_counter()
            x, aff, info = preprocess(path, device, fast=name == "fast", pipeline=pipeline)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs[name].append((time.perf_counter() - t0, info))
            if name == "fast":
                kept = (x, aff, info)
                out.setdefault("rss_fast_gb", rss_gb())
            x = aff = None  # free this run's output before the next
    for name, rs in runs.items():
        if rs:
            wall, winfo = min(rs, key=lambda r: r[0])
            cinfo = min(rs, key=lambda r: r[1]["cpu_s"])[1]
            out[name] = {"wall_s": wall, "stage_s": winfo["stage_s"], "cpu_s": cinfo["cpu_s"],
                         "stage_cpu_s": cinfo["stage_cpu_s"]}
    out["fast"]["output"] = kept
    return out


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (what else ran on the cores)."""
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def timed(fns, repeats: int) -> list[float]:  # noqa: ANN001
    """Median wall seconds of each function; one warm-up each, then the runs interleaved (A B C A B C
    ...) so a change in the machine's load hits every contender alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _windows(roi: list[int] | None, overlap: float | None, batch: int | None) -> dict[str, Any]:
    """``model.windows`` of the pipeline (if it sets one) with the command line's overrides."""
    from mmai.config import WindowsConfig, load_config

    w = load_config(str(PIPELINE)).model.windows or WindowsConfig(roi_size=(96, 96, 96))
    w = dataclasses.replace(w, **{k: v for k, v in (("roi_size", tuple(roi) if roi else None),
                                                     ("overlap", overlap), ("batch", batch)) if v is not None})
    return dataclasses.asdict(w)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA path untested, see docs)")
    ap.add_argument("--amp", nargs="?", const="bf16", default="none", choices=["none", "bf16"],
                    help="bf16: bfloat16 autocast of the encoding (CUDA; untested)")
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="window voxels (default: pipeline's, else 96^3)")
    ap.add_argument("--overlap", type=float, default=None)
    ap.add_argument("--window-batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--preprocess-only", action="store_true",
                    help="time the preprocessing chains only (no model): the JSON keeps the preprocess_* keys")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference chain (MONAI step by step; timed back to back with the fast one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives the CPU-time figures of a one-thread run")
    a = ap.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    load_start = load_average()
    from monai.inferers import sliding_window_inference

    from mmai.transforms.pipelines import image_channels

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here; allowed: cpu")
    amp = a.amp == "bf16"
    with tempfile.TemporaryDirectory(prefix="mmai_throughput_") as tmp:
        path = write_nifti(Path(tmp))
        rss_written = rss_gb()
        chest = time_preprocess(path, a.device, a.repeats, reference=not a.no_reference)
        head = time_preprocess(write_nifti(Path(tmp), head=True), a.device, a.repeats,
                               reference=not a.no_reference, pipeline=PIPELINE.parent / "ct_head.yaml")
    x, aff, info = chest["fast"]["output"]
    prep_s = chest["fast"]["wall_s"]
    ref_s = chest["reference"]["wall_s"] if "reference" in chest else None
    head_s = head["fast"]["wall_s"]
    head_ref_s = head["reference"]["wall_s"] if "reference" in head else None
    rss_prep = rss_gb()
    prep = {"preprocess_s": round(prep_s, 3), "preprocess_cpu_s": round(chest["fast"]["cpu_s"], 3),
            "preprocess_reference_s": None if ref_s is None else round(ref_s, 3),
            "preprocess_reference_cpu_s": round(chest["reference"]["cpu_s"], 3) if ref_s else None,
            "preprocess_speedup": None if ref_s is None else round(ref_s / prep_s, 2),
            "stage_s": chest["fast"]["stage_s"], "stage_cpu_s": chest["fast"]["stage_cpu_s"],
            "reference_stage_s": chest["reference"]["stage_s"] if ref_s else None,
            "reference_stage_cpu_s": chest["reference"]["stage_cpu_s"] if ref_s else None,
            "head_preprocess_s": round(head_s, 3),
            "head_preprocess_reference_s": None if head_ref_s is None else round(head_ref_s, 3),
            "head_preprocess_cpu_s": round(head["fast"]["cpu_s"], 3),
            "head_preprocess_reference_cpu_s": round(head["reference"]["cpu_s"], 3) if head_ref_s else None,
            "head_stage_s": head["fast"]["stage_s"], "head_stage_cpu_s": head["fast"]["stage_cpu_s"],
            "head_reference_stage_s": head["reference"]["stage_s"] if head_ref_s else None,
            "head_input_shape": [512, 512, 300], "input_shape": [512, 512, 400], "model_grid": list(x.shape[2:]),
            "peak_rss_preprocess_gb": round(rss_prep, 3), "rss_after_write_gb": round(rss_written, 3),
            "peak_rss_fast_chain_gb": round(chest["rss_fast_gb"], 3), "torch_threads": torch.get_num_threads()}
    if a.preprocess_only:
        prep["load_average"] = [load_start, load_average()]
        print(json.dumps(prep))
        return prep
    x, aff = x.to(dev), aff.to(dev)
    win = _windows(a.roi, a.overlap, a.window_batch)
    roi, overlap, wbatch = list(win["roi_size"]), win["overlap"], win["batch"]
    specs = [FeatureSpec("age", "numeric"), FeatureSpec("sex", "categorical", 2)]
    torch.manual_seed(0)
    from mmai.config import load_config

    cfg = load_config(str(PIPELINE))
    model = create_model(cfg.model.fusion, n_outputs=1, feature_specs=specs, in_channels=image_channels(cfg.image),
                         encoder=cfg.model.encoder, widths=list(cfg.model.widths), dim=cfg.model.dim,
                         heads=cfg.model.heads, layers=cfg.model.layers, windows=win).to(dev).eval()
    monai_net = copy.deepcopy(model.encoder)  # the same weights, as loaded (MONAI's default layout)
    clinical, mask, present = torch.zeros(1, 2, device=dev), torch.ones(1, 2, device=dev), torch.ones(1, device=dev)
    ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def mmai_tokens() -> torch.Tensor:
        with torch.inference_mode(), ctx:
            tok, _ = model.image_tokens(x, aff)
        sync()
        return tok

    def monai_tokens() -> torch.Tensor:
        with torch.inference_mode(), ctx:
            fmap = sliding_window_inference(x, roi, wbatch, monai_net.forward_features,
                                            overlap=overlap, mode="gaussian")
            tok = model.img_proj(fmap.flatten(2).transpose(1, 2))
        sync()
        return tok

    def mmai_predict() -> torch.Tensor:
        with torch.inference_mode(), ctx:
            out = model(x, present, clinical, mask, affine=aff)
        sync()
        return out

    mmai_s, monai_s, predict_s = timed([mmai_tokens, monai_tokens, mmai_predict], a.repeats)
    n_tok = mmai_tokens().shape[1]
    result = {"mmai_s": round(mmai_s, 3), "monai_swi_s": round(monai_s, 3), "speedup": round(monai_s / mmai_s, 3),
              "peak_rss_gb": round(rss_gb(), 3), "studies_per_s": round(1.0 / (prep_s + predict_s), 4),
              "predict_s": round(predict_s, 3), **prep,
              "preprocess_over_encoding": round(prep_s / mmai_s, 2),
              "channels": int(x.shape[1]),
              "fov_lost_fraction": info["fov_lost_fraction"], "tokens": int(n_tok), "windows": win,
              "torch_threads": torch.get_num_threads(), "device": str(dev), "amp": a.amp,
              "pipeline": "pipelines/ct_chest.yaml", "load_average": [load_start, load_average()]}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
