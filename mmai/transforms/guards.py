"""Input guards: refuse an input that cannot be a volume of the pipeline, before any work on it.

- :class:`ModalityGuardd`: the DICOM Modality must be the pipeline's ``image.modality``; an input
  without one (a raw NIfTI) is checked by its intensities (:mod:`mmai.io.modality_guess`).
- :class:`InputGuardd` (array function :func:`check_volume`): one 3D volume (one channel), at
  least :data:`MIN_VOXELS` voxels and ``MIN_VOXELS`` target voxels of extent along every axis,
  finite voxels (``image.nonfinite: fill`` fills them instead, with the ``nonfinite_voxels``
  flag). It also carries the loader's input flags into ``data["input_flags"]``
  (:mod:`mmai.io.input_flags`).

Every refusal is a :class:`mmai.errors.PreprocessError` of one line naming the file, the
reason and the way out; the caller turns it into the case's error row.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from mmai.errors import PreprocessError
from mmai.io.input_flags import META_KEY, merge_flags
from mmai.io.modality_guess import modality_evidence

MODALITY_KEY = "modality"
FLAGS_KEY = META_KEY
MIN_VOXELS = 3


def _name(x: Any) -> str:
    meta = getattr(x, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "image"))


class ModalityGuardd(MapTransform):
    """Check the loaded series' modality against the pipeline's ``image.modality``.

    A DICOM series carries its Modality; a NIfTI input carries none (''), so with ``check`` its
    raw intensities decide (:func:`mmai.io.modality_guess.modality_evidence`): a volume that is
    clearly of the other modality is refused; an undecided one is taken to be the pipeline's.
    Writes the modality (the series', the recognised one, else the pipeline's, else ``unknown``)
    to ``data["modality"]``.
    """

    def __init__(self, keys: Any, expected: str = "any", check: bool = True) -> None:
        super().__init__(keys)
        self.expected = expected
        self.check = check

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            meta = getattr(d[k], "meta", {}) or {}
            found = str(meta.get("modality", "") or "").upper()
            if self.expected != "any" and found and found != self.expected:
                raise PreprocessError(f"{_name(d[k])}: series modality is {found}, this pipeline is for "
                                      f"{self.expected} (image.modality); allowed: {self.expected}")
            if not found and self.expected != "any" and self.check:
                guess, why = modality_evidence(d[k])
                if guess is not None and guess != self.expected:
                    hint = (" (a CT stored without its rescale intercept, air at 0 instead of -1000 HU, must "
                            "be converted to HU first)" if self.expected == "CT" else "")
                    raise PreprocessError(
                        f"{_name(d[k])}: looks like {guess}, not {self.expected} ({why}); this pipeline is for "
                        f"{self.expected} (image.modality). If the volume really is {self.expected}{hint}, set "
                        "image.modality_check: false (or image.modality: any)")
            d[MODALITY_KEY] = found or (self.expected if self.expected != "any" else "unknown")
        return d


def all_finite(x: torch.Tensor) -> bool:
    """True when no voxel of ``x`` is NaN or inf.

    An integer volume always is; a float one is when its minimum and maximum are finite (NaN
    propagates through both). On the CPU this reads the array in its memory order with numpy (two
    vectorised passes; ``torch.isfinite`` on a column-major NIfTI volume costs about 20x more).
    """
    if not (x.is_floating_point() or x.is_complex()):
        return True
    if x.numel() == 0:
        return True
    t = torch.as_tensor(x).detach()
    if t.device.type == "cpu" and not t.is_complex() and t.dtype != torch.bfloat16:
        a = t.numpy()
        return bool(np.isfinite(a.min()) and np.isfinite(a.max()))
    return bool(torch.isfinite(t).all())


def check_volume(x: torch.Tensor, *, name: str = "image", nonfinite: str = "error", min_voxels: int = MIN_VOXELS,
                 min_extent_mm: float = 0.0, spacing: Sequence[float] | None = None
                 ) -> tuple[torch.Tensor, dict[str, int]]:
    """Refuse what cannot be a 3D volume of the pipeline; fill non-finite voxels when asked.

    Args:
        x: (C, I, J, K) raw intensities as loaded (channel first).
        name: the input's file name, for the messages.
        nonfinite: ``error`` (refuse a volume with NaN / inf voxels) or ``fill`` (set them to the
            volume's finite minimum, its background).
        min_voxels: voxels needed along every spatial axis.
        min_extent_mm: physical extent needed along every axis (mm); 0 skips the check.
        spacing: (3,) voxel size of ``x`` in mm (for the extent check).

    Returns:
        (the volume, unchanged or filled; the flags of what was repaired, e.g.
        ``{"nonfinite_voxels": 72000}``).

    Raises:
        PreprocessError: not one 3D volume, too few voxels or too small an extent along an axis,
            non-finite voxels with ``nonfinite="error"``.
    """
    shape = tuple(int(s) for s in x.shape)
    if len(shape) != 4 or shape[0] != 1:
        what = f"{shape[0]} channels/volumes" if len(shape) == 4 else f"{len(shape) - 1} spatial dimensions"
        raise PreprocessError(f"{name}: not one 3D volume (shape {shape[1:] if len(shape) == 4 else shape}, {what}); "
                              "this pipeline reads one 3D volume per case: give one volume (e.g. one phase "
                              "of a 4D series, `mmai convert --split-phases`)")
    small = [i for i, n in enumerate(shape[1:]) if n < min_voxels]
    if small:
        raise PreprocessError(f"{name}: {shape[1:]} voxels, fewer than {min_voxels} along axis {small[0]}: a 2D image "
                              f"or a slab, not a 3D volume (every axis needs >= {min_voxels} voxels)")
    if min_extent_mm > 0 and spacing is not None:
        extent = [n * float(s) for n, s in zip(shape[1:], spacing, strict=True)]
        short = [i for i, e in enumerate(extent) if e < min_extent_mm - 1e-6]
        if short:
            i = short[0]
            raise PreprocessError(f"{name}: {extent[i]:.2f} mm along axis {i} ({shape[1 + i]} voxels), under the "
                                  f"{min_extent_mm:g} mm ({min_voxels} voxels at the pipeline's finest "
                                  "image.spacing) a 3D volume needs along every axis")
    flags: dict[str, int] = {}
    if all_finite(x):
        return x, flags
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad:
        if nonfinite != "fill":
            raise PreprocessError(f"{name}: {n_bad} non-finite voxel(s) (NaN or inf) of {x.numel()}; refused "
                                  "(image.nonfinite: error); set image.nonfinite: fill to fill them with the "
                                  "volume's minimum (flagged nonfinite_voxels)")
        finite = x[~bad]
        if finite.numel() == 0:
            raise PreprocessError(f"{name}: every voxel is NaN or inf; nothing to fill from")
        x = torch.where(bad, finite.min(), x)
        flags["nonfinite_voxels"] = n_bad
    return x, flags


class InputGuardd(MapTransform):
    """Dictionary wrapper of :func:`check_volume`; ``data["input_flags"]`` = the loader's flags
    (the image's ``meta["input_flags"]``) plus this guard's."""

    def __init__(self, keys: Any, *, nonfinite: str = "error", min_voxels: int = MIN_VOXELS,
                 target_spacing: Sequence[float] | None = None) -> None:
        super().__init__(keys)
        self.nonfinite, self.min_voxels = nonfinite, min_voxels
        self.min_extent_mm = min_voxels * min(target_spacing) if target_spacing else 0.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            x = d[k]
            meta = getattr(x, "meta", {}) or {}
            affine = getattr(x, "affine", None)
            spacing = (np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).tolist()
                       if affine is not None and np.asarray(affine).shape == (4, 4) else None)
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.asarray(x))
            y, flags = check_volume(x, name=_name(x), nonfinite=self.nonfinite, min_voxels=self.min_voxels,
                                    min_extent_mm=self.min_extent_mm, spacing=spacing)
            if y is not x:
                d[k] = y
            d[FLAGS_KEY] = merge_flags(d.get(FLAGS_KEY, ""), meta.get(META_KEY, ""), flags)
        return d
