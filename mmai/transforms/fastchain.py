"""The fast preprocessing chain (the default of :func:`mmai.transforms.pipelines.preprocess_transforms`).

Same steps, same guards and same output (to float32 rounding) as the reference chain that MONAI
transforms spell out one by one (``preprocess_transforms(..., fast=False)``, kept for the equality
tests and the benchmarks), rebuilt where the time went (docs/pipelines.md, docs/benchmarks.md):

- :class:`FastLoadd` reads with mmai's reader but keeps the array in its memory order (a NIfTI
  volume is column-major; MONAI's ``LoadImage`` made it row-major, a full transposing copy) and an
  unscaled integer NIfTI in its stored dtype (uncompressed: memory-mapped);
- :class:`mmai.transforms.resample.FastResampled` replaces ``Orientationd`` + ``AntiAliasd`` +
  ``Spacingd`` by one separable pass over the body region only;
- the tail (:func:`windows_last`): body mask, body crop (:class:`FastCropForegroundd`, MONAI's box
  from one numpy maximum per axis), then the fit to the grid and the intensity windows in one step
  (:class:`FitWindowsd`): each voxel is windowed once, on the final grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import CropForeground, CropForegroundd, MapTransform
from monai.transforms.io.array import switch_endianness
from monai.utils import ensure_tuple

from mmai.config import ImageConfig

# stored dtypes the chain takes as they are (native byte order; torch has them): integers that a
# float32 represents exactly, and float32 itself
NATIVE_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.int16, np.uint8, np.int8))


class FastLoadd(MapTransform):
    """mmai's ``LoadImaged`` (same reader, same metadata, channel first) without the row-major copy.

    Args:
        keys: the image key.
        loader: the ``mmai.io.reader.mmai_load_imaged`` transform whose reader (series selection,
            geometry policy) is used.
    """

    def __init__(self, keys: Any, loader: Any) -> None:
        super().__init__(keys)
        self.reader = loader.mmai_reader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.load(d[k])
        return d

    def load(self, source: Any) -> MetaTensor:
        """A path / folder / file list -> (1, I, J, K) MetaTensor with the reader's metadata: float32, or
        for an unscaled integer NIfTI its stored integers (the resampling step converts the body
        region it reads; an uncompressed file is not even read whole)."""
        names = tuple(f"{Path(s).expanduser()}" for s in ensure_tuple(source))
        nifti = len(names) == 1 and names[0].lower().endswith((".nii", ".nii.gz"))
        arr, meta = self.reader.get_data(self.reader.read(names, dtype="native") if nifti else self.reader.read(names))
        if np.dtype(arr.dtype) not in NATIVE_DTYPES:
            arr = np.asarray(arr, dtype=np.float32)  # a no-op or one pass in the array's own memory order
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous) or any(s < 0 for s in arr.strides):
            arr = np.ascontiguousarray(arr)
        meta = switch_endianness(meta, "<")
        meta["filename_or_obj"] = f"{names[0]}"
        out = MetaTensor(torch.from_numpy(arr)[None], meta=meta)
        out.affine = torch.as_tensor(np.asarray(meta["affine"]), dtype=torch.float64)
        return out


def body_threshold(cfg: ImageConfig) -> float | None:
    """The raw intensity of the foreground mask when it is known before resampling (a fixed
    ``image.foreground``, or a windowed CT's automatic one); None when it depends on the resampled
    volume (MR without ``foreground``)."""
    from mmai.transforms.pipelines import _windows
    from mmai.transforms.spatial import auto_threshold

    if cfg.foreground is not None:
        return float(cfg.foreground)
    if cfg.intensity.kind in ("window", "windows"):
        return auto_threshold(cfg.intensity.kind, _windows(cfg), torch.zeros(1))
    return None


def fast_spatial(cfg: ImageConfig, loader: Any, *, device: str, load: bool, raw: bool) -> list[Any]:
    """Load (optional) + reorient + anti-alias + resample (+ pre-crop to the body) transforms."""
    from mmai.transforms.pipelines import KEY
    from mmai.transforms.resample import FastResampled

    if cfg.spacing is None:
        raise ValueError("fast_spatial needs image.spacing")
    chain: list[Any] = [FastLoadd(KEY, loader)] if load else []
    precrop = cfg.crop_foreground and cfg.roi is None and not raw
    windows_tail = cfg.intensity.kind in ("window", "windows") and not raw  # :func:`windows_last` copies to C order
    chain.append(FastResampled(KEY, cfg.spacing, axcodes=cfg.orientation, antialias=cfg.antialias,
                               body_threshold=body_threshold(cfg) if precrop else None, margin=2, device=device,
                               contiguous=not windows_tail))
    return chain


def window_into(dst: torch.Tensor, src: torch.Tensor, lo: float, hi: float, b_min: float, b_max: float) -> None:
    """``dst`` (any strides, ``src``'s shape) = :func:`mmai.transforms.intensity.window_channels`'s
    channel of window ``(lo, hi)``, by the same float32 operations in place (``* 1`` and ``+ 0``,
    which change no float, skipped)."""
    torch.clamp(src, lo, hi, out=dst)
    dst.sub_(lo).div_(hi - lo)
    if b_max - b_min != 1.0:
        dst.mul_(b_max - b_min)
    if b_min != 0.0:
        dst.add_(b_min)


class FitWindowsd(MapTransform):
    """:class:`~mmai.transforms.spatial.FitToGridd` (the FOV guard, centre pad/crop to the grid) and
    :class:`WindowChannelsd` in one step: each window is written once, straight into its channel of
    the output grid, from the raw voxels that the grid keeps; the rest of the grid is ``b_min`` (the
    reference pads the windowed channels with it). The grid (shape, affine) is MONAI's own pad/crop
    of the input, run lazily. ``fg_key`` is read for the guard and left as it is (the chain drops it).

    Args:
        keys: the image key ((1, I, J, K) raw intensities, any memory order).
        fit: the pipeline's :class:`~mmai.transforms.spatial.FitToGridd` (size, multiple, FOV guard).
        windows: W pairs ``(a_min, a_max)``; b_min, b_max: output range of every window.
    """

    def __init__(self, keys: Any, fit: Any, windows: Any, b_min: float = 0.0, b_max: float = 1.0) -> None:
        super().__init__(keys)
        self.fitter = fit
        self.windows = [(float(lo), float(hi)) for lo, hi in windows]
        self.b_min, self.b_max = float(b_min), float(b_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from mmai.errors import PreprocessError

        d: dict[Hashable, Any] = dict(data)
        lost = self.fitter.check(d)
        for k in self.key_iterator(d):
            x = d[k]
            if x.shape[0] != 1:
                raise PreprocessError(f"intensity windows need a single-channel volume, got {x.shape[0]} channels")
            src = torch.as_tensor(x)[0]
            lazy: Any = self.fitter.fit(self.b_min, lazy=True)(MetaTensor(src[None], meta=dict(x.meta)))
            aff = torch.as_tensor(lazy.peek_pending_affine(), dtype=torch.float64)
            shape = [int(n) for n in lazy.peek_pending_shape()]
            step = np.linalg.solve(np.asarray(x.affine, np.float64), aff.numpy())  # output voxel -> input voxel
            shift = np.rint(step[:3, 3]).astype(int)
            if not np.allclose(step[:3, :3], np.eye(3)) or not np.allclose(step[:3, 3], shift, atol=1e-4):
                raise PreprocessError(f"{x.meta.get('filename_or_obj', 'image')}: the fit to the grid is not a voxel "
                                      f"shift ({step.round(4).tolist()}); internal error of FitWindowsd")
            keep_out = tuple(slice(max(0, -t), min(n_out, n_in - t)) for t, n_out, n_in in
                             zip(shift, shape, src.shape, strict=True))
            keep_in = tuple(slice(o.start + t, o.stop + t) for o, t in zip(keep_out, shift, strict=True))
            out = torch.full((len(self.windows), *shape), self.b_min, dtype=torch.float32, device=src.device)
            if all(o.stop > o.start for o in keep_out):
                for c, (lo, hi) in zip(out, self.windows, strict=True):
                    window_into(c[keep_out], src[keep_in], lo, hi, self.b_min, self.b_max)
            y = MetaTensor(out, meta=dict(x.meta))
            y.affine = aff
            d[k] = y
        d["fov_lost_fraction"] = float(lost)
        return d


def mask_box(fg: torch.Tensor, margin: int) -> tuple[list[int], list[int]] | None:
    """MONAI's ``generate_spatial_bounding_box(fg, lambda v: v > 0.5, margin=margin, allow_smaller=True)``
    of a (1, I, J, K) 0/1 mask (uint8 or bool, CPU), as ([start] * 3, [stop] * 3), or None when the
    mask is empty; one maximum per axis pair with numpy, which reduces a mask in any memory order
    in place (torch's reductions of a permuted mask cost ~50x more)."""
    a = np.asarray(torch.as_tensor(fg).detach()[0])
    start, stop = [], []
    for axis in range(3):
        hits = np.flatnonzero(a.max(axis=tuple(b for b in range(3) if b != axis)))
        if hits.size == 0:
            return None
        start.append(max(int(hits[0]) - margin, 0))
        stop.append(min(int(hits[-1]) + 1 + margin, a.shape[axis]))
    return start, stop


class _MaskBoxCropForeground(CropForeground):
    """``CropForeground`` whose bounding box of a CPU 0/1 mask with ``select_fn = v > t`` (0 <= t < 1)
    comes from :func:`mask_box` (the same box); any other input: MONAI's own computation."""

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        from mmai.transforms.pipelines import _AboveThreshold

        sel = self.select_fn
        if (isinstance(sel, _AboveThreshold) and 0 <= sel.threshold < 1 and self.channel_indices is None
                and self.allow_smaller and img.shape[0] == 1 and img.device.type == "cpu"
                and img.dtype in (torch.uint8, torch.bool) and all(k == 1 for k in ensure_tuple(self.k_divisible))):
            margin = ensure_tuple(self.margin)
            if len(set(margin)) == 1:
                box = mask_box(img, int(margin[0]))
                if box is not None:  # (an empty mask: MONAI's own handling)
                    return np.asarray(box[0], np.int16), np.asarray(box[1], np.int16)
        return super().compute_bounding_box(img)


class FastCropForegroundd(CropForegroundd):
    """``CropForegroundd`` (same arguments, same crop and recorded box) with :class:`_MaskBoxCropForeground`."""

    def __init__(self, keys: Any, source_key: str, select_fn: Any, margin: int = 0, allow_smaller: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(keys, source_key=source_key, select_fn=select_fn, margin=margin, allow_smaller=allow_smaller,
                         **kwargs)
        self.cropper = _MaskBoxCropForeground(select_fn=select_fn, margin=margin, allow_smaller=allow_smaller)


def windows_last(cfg: ImageConfig) -> list[Any]:
    """Body crop, fit to the grid, then the intensity window(s): the reference chain's tail (windows,
    crop, fit) in the order that windows each voxel once, on the final grid.

    Windowing is voxel-wise and the crop and the fit read only the body mask, so the order does not
    change a voxel; the fit pads the raw volume with the lowest window's ``a_min``, which every
    window maps to ``b_min``, the reference's padding value. Windowed CT only (``intensity.kind``
    ``window`` / ``windows``; ``crop_foreground`` and ``fov`` as configured).
    """
    from mmai.transforms.pipelines import FG, KEY, _AboveThreshold, _intensity, _windows
    from mmai.transforms.spatial import FitToGridd

    it = cfg.intensity
    if it.kind not in ("window", "windows"):
        raise ValueError(f"windows_last: intensity.kind {it.kind!r}; allowed: window, windows")
    chain: list[Any] = []
    if cfg.crop_foreground:
        chain.append(FastCropForegroundd([KEY, FG], source_key=FG, select_fn=_AboveThreshold(0.5), margin=2,
                                     allow_smaller=True))
    raw_background = min(lo for lo, _ in _windows(cfg))
    fit = FitToGridd([KEY, FG], size=cfg.size, size_multiple=cfg.size_multiple, mode=cfg.fov.mode,
                     tolerance=cfg.fov.tolerance, background=raw_background, fg_key=FG)
    if it.kind == "windows":
        chain.append(FitWindowsd(KEY, fit, it.windows, b_min=it.b_min, b_max=it.b_max))
    else:
        chain += [fit, *_intensity(cfg, None)]
    return chain
