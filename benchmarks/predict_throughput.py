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
and preprocessing). The last line is JSON.

    python benchmarks/predict_throughput.py [--repeats 3] [--device cuda --amp bf16]

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


def run_stages(chain: Any, data: dict[str, Any], device: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Run a Compose chain transform by transform -> (output, {transform name: seconds})."""
    stages: dict[str, float] = {}
    for t in chain.transforms:
        t0 = time.perf_counter()
        data = t(data)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        name = type(t).__name__.lstrip("_")
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0
    return data, stages


def preprocess(path: Path, device: str, *, fast: bool = True,
               pipeline: Path = PIPELINE) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read + preprocess with pipelines/ct_chest.yaml -> ((1, C, D, H, W) float32, (1, 4, 4) affine, dict
    with ``fov_lost_fraction`` and ``stage_s``); ``fast=False``: the reference chain (MONAI step by step)."""
    from mmai.config import load_config
    from mmai.transforms.pipelines import KEY, preprocess_transforms

    cfg = load_config(str(pipeline))
    image_cfg = dataclasses.replace(cfg.image, cache="memory", cache_dir=None)  # time the chain, not a cache
    chain = preprocess_transforms(image_cfg, device=device, fast=fast)
    with torch.no_grad():
        out, stages = run_stages(chain, {KEY: str(path)}, device)
    x = out[KEY]
    info = {"fov_lost_fraction": float(out.get("fov_lost_fraction", 0.0)),
            "stage_s": {k: round(v, 3) for k, v in stages.items()}}
    return x.as_tensor()[None].contiguous(), x.affine.float()[None], info


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
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference chain (MONAI step by step; timed back to back with the fast one)")
    a = ap.parse_args(argv)
    from monai.inferers import sliding_window_inference

    from mmai.transforms.pipelines import image_channels

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here; allowed: cpu")
    amp = a.amp == "bf16"
    with tempfile.TemporaryDirectory(prefix="mmai_throughput_") as tmp:
        path = write_nifti(Path(tmp))
        rss_written = rss_gb()
        prep_times: dict[bool, list[float]] = {True: [], False: []}
        ref_stages: dict[str, float] = {}
        for _ in range(max(1, a.repeats)):  # the reference chain and the fast one back to back
            for fast in ((True,) if a.no_reference else (False, True)):
                x = aff = None  # free the previous run's output before the next
                t0 = time.perf_counter()
                x, aff, info = preprocess(path, a.device, fast=fast)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                prep_times[fast].append(time.perf_counter() - t0)
                if not fast:
                    ref_stages = info["stage_s"]
        head = write_nifti(Path(tmp), head=True)
        head_times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(max(1, a.repeats)):
            for fast in ((True,) if a.no_reference else (False, True)):
                t0 = time.perf_counter()
                _, _, head_info = preprocess(head, a.device, fast=fast, pipeline=PIPELINE.parent / "ct_head.yaml")
                head_times[fast].append(time.perf_counter() - t0)
    prep_s = min(prep_times[True])
    ref_s = min(prep_times[False]) if prep_times[False] else None
    head_s, head_ref_s = min(head_times[True]), (min(head_times[False]) if head_times[False] else None)
    rss_prep = rss_gb()
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
              "preprocess_s": round(prep_s, 3), "predict_s": round(predict_s, 3),
              "preprocess_reference_s": None if ref_s is None else round(ref_s, 3),
              "preprocess_speedup": None if ref_s is None else round(ref_s / prep_s, 2),
              "preprocess_over_encoding": round(prep_s / mmai_s, 2),
              "stage_s": info["stage_s"], "reference_stage_s": ref_stages or None,
              "head_preprocess_s": round(head_s, 3),
              "head_preprocess_reference_s": None if head_ref_s is None else round(head_ref_s, 3),
              "head_stage_s": head_info["stage_s"], "head_input_shape": [512, 512, 300],
              "peak_rss_preprocess_gb": round(rss_prep, 3), "rss_after_write_gb": round(rss_written, 3),
              "input_shape": [512, 512, 400], "model_grid": list(x.shape[2:]), "channels": int(x.shape[1]),
              "fov_lost_fraction": info["fov_lost_fraction"], "tokens": int(n_tok), "windows": win,
              "torch_threads": torch.get_num_threads(), "device": str(dev), "amp": a.amp,
              "pipeline": "pipelines/ct_chest.yaml"}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
