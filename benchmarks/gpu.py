"""Benchmark the CUDA paths: preprocessing chain (CPU vs GPU) and training steps (fp32 vs bf16 AMP).

Needs a CUDA device. Two parts, in one process:

1. Preprocessing: one 512x512x240 CT volume (0.7x0.7x1.25 mm, HU) already in memory as a
   MetaTensor goes through :func:`mmai.transforms.pipelines.preprocess_transforms` (reorient,
   anti-alias, resample to 1.5 mm, window, crop to 224x224x160 with ``fov: {mode: crop}``, the
   lost body fraction logged) on the CPU (torch threads = all cores)
   and on the GPU; the outputs must agree (max |diff| printed) before any time is reported.
2. Training: forward + backward + AdamW step of the cross-attention fusion model (ResNet encoder)
   at the demo's input (32x32x24, batch 64) and at a CT-sized input (96x96x96, batch 8), in fp32
   and with bf16 autocast (``train.amp: true``), as volumes per second.

Prints a table, then as its LAST line one JSON object.

    python benchmarks/gpu.py [--repeats 10]
    python benchmarks/gpu.py --cpu-smoke     # no GPU: build + run the preprocessing chain on a small volume
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _time(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    if cuda:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def preprocess_setup(shape: tuple[int, int, int] = (512, 512, 240), size: tuple[int, int, int] = (224, 224, 160)
                     ) -> tuple[Any, np.ndarray, torch.Tensor]:
    """The chain's config, a (1, *shape) HU volume (0.7 x 0.7 x 1.25 mm, LPS-flipped affine) and its affine.

    The body fills the whole in-plane field (512 x 0.7 mm = 358 mm > 224 x 1.5 mm), so the 224 x 224
    box cuts body voxels: ``fov: {mode: crop}`` crops and logs the lost fraction (the default, ``error``,
    refuses the volume; the CT pipelines use ``size: null`` instead).
    """
    from mmai.config import FovConfig, ImageConfig, IntensityConfig

    rng = np.random.default_rng(0)
    vol = rng.normal(40, 20, (1, *shape)).astype(np.float32)
    vol[:, :, : shape[1] * 60 // 512] = -1000.0
    affine = torch.diag(torch.tensor([-0.7, -0.7, 1.25, 1.0], dtype=torch.float64))
    cfg = ImageConfig(spacing=(1.5, 1.5, 1.5), size=size, fov=FovConfig(mode="crop"),
                      intensity=IntensityConfig(kind="window", a_min=-1000, a_max=1000))
    return cfg, vol, affine


def run_preprocess(cfg: Any, vol: np.ndarray, affine: torch.Tensor, device: str) -> dict[str, Any]:
    """One pass of ``preprocess_transforms`` (no loading) on ``device``; returns the output dict."""
    from monai.data import MetaTensor

    from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms

    chain = preprocess_transforms(cfg, device=device, load=False)
    return apply_chain(chain, {KEY: MetaTensor(torch.from_numpy(vol), affine=affine)})


def bench_preprocess(repeats: int) -> dict[str, Any]:
    from mmai.transforms.pipelines import KEY

    cfg, vol, affine = preprocess_setup()

    def run(device: str) -> torch.Tensor:
        return run_preprocess(cfg, vol, affine, device)[KEY]

    cpu_out, gpu_out = run("cpu"), run("cuda")
    diff = float((gpu_out.cpu() - cpu_out).abs().max())
    if diff > 1e-3:
        raise SystemExit(f"CUDA preprocessing differs from CPU by {diff}")
    cpu_s = _time(lambda: run("cpu"), max(2, repeats // 3), cuda=False)
    gpu_s = _time(lambda: run("cuda"), repeats, cuda=True)
    return {"preprocess_cpu_s": round(cpu_s, 4), "preprocess_cuda_s": round(gpu_s, 4),
            "preprocess_speedup": round(cpu_s / gpu_s, 1), "preprocess_max_abs_diff": diff,
            "cpu_threads": torch.get_num_threads()}


def bench_train(size: tuple[int, int, int], batch: int, amp: bool, repeats: int) -> float:
    """Volumes per second of a full training step (forward, backward, optimizer)."""
    from mmai.clinical.preprocess import FeatureSpec
    from mmai.models.registry import create_model

    specs = [FeatureSpec(f"x{i}", "numeric") for i in range(6)]
    model = create_model("cross_attention", n_outputs=1, feature_specs=specs, widths=(16, 32, 64, 128),
                         dim=64, heads=4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, *size, device="cuda")
    present = torch.ones(batch, device="cuda")
    tab, mask = torch.randn(batch, 6, device="cuda"), torch.ones(batch, 6, device="cuda")
    y = torch.randint(0, 2, (batch,), device="cuda").float()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(x, present, tab, mask)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float().squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _time(step, repeats, cuda=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: build and run the preprocessing chain on the CPU on a small volume, then exit")
    args = ap.parse_args()
    if args.cpu_smoke:
        from mmai.transforms.pipelines import KEY

        cfg, vol, affine = preprocess_setup((96, 96, 48), (40, 40, 32))
        out = run_preprocess(cfg, vol, affine, "cpu")
        print(json.dumps({"cpu_smoke": True, "out_shape": list(out[KEY].shape),
                          "fov_lost_fraction": round(out["fov_lost_fraction"], 4)}))
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    res: dict[str, Any] = {"device": name, "torch": torch.__version__, "cpu_count": os.cpu_count()}
    res.update(bench_preprocess(args.repeats))
    for size, batch in (((32, 32, 24), 64), ((96, 96, 96), 8)):
        for amp in (False, True):
            key = f"train_{'x'.join(map(str, size))}_b{batch}_{'bf16' if amp else 'fp32'}_vol_per_s"
            res[key] = round(bench_train(size, batch, amp, args.repeats), 1)
    print(f"device: {name} (torch {torch.__version__}, {os.cpu_count()} CPU cores)")
    print(f"| preprocessing 512x512x240 -> 224x224x160 @1.5 mm | CPU {res['preprocess_cpu_s']:.3f} s | "
          f"CUDA {res['preprocess_cuda_s']:.4f} s | {res['preprocess_speedup']}x | max|diff| "
          f"{res['preprocess_max_abs_diff']:.2g} |")
    for k, v in res.items():
        if k.startswith("train_"):
            print(f"| {k} | {v} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
