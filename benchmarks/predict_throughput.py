"""Full-resolution prediction throughput: mmai's window encoding vs MONAI's sliding_window_inference.

One synthetic chest-CT-like study, 512 x 512 x 400 voxels at 0.7 x 0.7 x 1.25 mm (int16 HU), is
preprocessed with a chain equivalent to ``pipelines/ct_chest.yaml`` (built here with MONAI, since
that YAML lives on another branch: RAS, body crop, Gaussian anti-aliasing then 1.5 mm isotropic resampling,
lung [-1000, 400] and mediastinal [-160, 240] HU windows as two channels (body: above -500 HU),
padded to a multiple of 32 voxels). The same encoder then turns the volume into tokens two ways,
in one process, each after one warm-up pass:

- ``mmai``: ``CrossAttentionFusion.image_tokens`` with ``model.windows`` (windows of ``--roi``
  voxels, ``--overlap``, ``--window-batch`` windows per encoder call), i.e. what ``mmai predict``
  runs before the (cheap) fusion;
- ``monai_swi``: ``monai.inferers.sliding_window_inference`` with the encoder's
  ``forward_features`` as the predictor (same roi, overlap and batch, gaussian blending of the
  feature maps), then the same token projection: how a MONAI user would tile the scan. It gets a
  copy of the encoder as loaded (default memory layout); mmai's tokenizer puts the encoder's weights
  and the window batches in channels-last layout, its one implementation difference that matters here.

``mmai_s`` / ``monai_swi_s``: median seconds of ``--repeats`` runs of the encoding step;
``speedup`` = monai / mmai; ``studies_per_s`` = 1 / (preprocessing + mmai's whole model forward);
``peak_rss_gb``: peak resident memory of the process (``resource.getrusage``). The last line is JSON.

    python benchmarks/predict_throughput.py [--device cuda --amp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.models.registry import create_model


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


class AntiAlias:
    """Separable Gaussian before downsampling, sigma = half the zoom factor (input voxels), replicated
    borders: ct_chest.yaml's ``antialias: true``. Done in place with SciPy, one axis at a time, so the
    peak memory is one float32 copy of the volume (MONAI's ``GaussianSmooth`` took 4.4 GB and 28 s here)."""

    def __init__(self, current, target) -> None:  # noqa: ANN001
        self.sigma = [0.5 * t / c if t > c else 0.0 for c, t in zip(current, target, strict=True)]

    def __call__(self, x):  # noqa: ANN001, ANN204
        from scipy.ndimage import gaussian_filter1d

        arr = x.as_tensor().numpy() if hasattr(x, "as_tensor") else x.numpy()
        for axis, s in enumerate(self.sigma):
            if s > 0:
                gaussian_filter1d(arr, s, axis=axis + 1, mode="nearest", truncate=4.0, output=arr)
        return x


def ct_chest_chain(spacing):  # noqa: ANN001, ANN201
    """MONAI chain equivalent to pipelines/ct_chest.yaml (see the module docstring)."""
    from monai.transforms import (
        Compose,
        CropForeground,
        DivisiblePad,
        EnsureType,
        Lambda,
        Orientation,
        ScaleIntensityRange,
        Spacing,
    )

    def two_windows(x):  # noqa: ANN001, ANN202
        return torch.cat([ScaleIntensityRange(-1000, 400, 0.0, 1.0, clip=True)(x),
                          ScaleIntensityRange(-160, 240, 0.0, 1.0, clip=True)(x)], dim=0)

    return Compose([Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                    CropForeground(select_fn=lambda x: x > -500, margin=2),  # on int16: crop before the copies
                    EnsureType(data_type="tensor", dtype=torch.float32), AntiAlias(spacing, (1.5, 1.5, 1.5)),
                    Spacing(pixdim=(1.5, 1.5, 1.5), mode="bilinear", padding_mode="border"),
                    Lambda(two_windows), DivisiblePad(k=32)])


def preprocess(vol: np.ndarray, affine: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
    from monai.data import MetaTensor

    t0 = time.perf_counter()
    img = MetaTensor(torch.from_numpy(vol)[None], affine=torch.as_tensor(affine))
    with torch.no_grad():
        out = ct_chest_chain(np.diag(affine)[:3])(img)
    x = out.as_tensor()[None].contiguous()  # (1, 2, D, H, W)
    return x, out.affine.float()[None], time.perf_counter() - t0


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    ap.add_argument("--roi", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--window-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args(argv)
    from monai.inferers import sliding_window_inference

    dev = torch.device(a.device)
    vol, affine = synth_ct()
    x, aff, prep_s = preprocess(vol, affine)
    del vol
    x, aff = x.to(dev), aff.to(dev)
    specs = [FeatureSpec("age", "numeric"), FeatureSpec("sex", "categorical", 2)]
    torch.manual_seed(0)
    model = create_model("cross_attention", n_outputs=1, feature_specs=specs, in_channels=2,
                         windows={"roi_size": a.roi, "overlap": a.overlap, "batch": a.window_batch}).to(dev).eval()
    monai_net = copy.deepcopy(model.encoder)  # the same weights, as loaded (MONAI's default layout)
    clinical, mask, present = torch.zeros(1, 2, device=dev), torch.ones(1, 2, device=dev), torch.ones(1, device=dev)
    ctx = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=a.amp)

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
            fmap = sliding_window_inference(x, a.roi, a.window_batch, monai_net.forward_features,
                                            overlap=a.overlap, mode="gaussian")
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
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"mmai_s": round(mmai_s, 3), "monai_swi_s": round(monai_s, 3), "speedup": round(monai_s / mmai_s, 3),
              "peak_rss_gb": round(rss_kb / 2**20, 3), "studies_per_s": round(1.0 / (prep_s + predict_s), 4),
              "preprocess_s": round(prep_s, 3), "predict_s": round(predict_s, 3),
              "model_grid": list(x.shape[2:]), "tokens": int(n_tok), "device": str(dev), "amp": a.amp}
    if dev.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(dev)
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
