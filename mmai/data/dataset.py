"""MultimodalDataset: one case -> dict(image, image_present, clinical, clinical_mask, targets, case_id).

Images are loaded once and cached in memory (preprocessed volumes are small). A preprocessed
NIfTI (header tagged ``mmai:<pipeline id>`` by ``mmai preprocess``) is read as is; any other
image (DICOM folder, raw NIfTI) goes through the pipeline's preprocessing chain first, so
training and inference accept raw and preprocessed inputs alike and always agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset

from mmai.config import ImageConfig
from mmai.errors import MmaiError, PreprocessError
from mmai.transforms.pipelines import (
    KEY,
    PREPROCESSED_TAG,
    apply_chain,
    image_pipeline_id,
    preprocess_transforms,
)

log = logging.getLogger(__name__)


def _is_nifti(path: str | Path) -> bool:
    p = str(path)
    return p.endswith(".nii") or p.endswith(".nii.gz")


def _descrip(img: Any) -> str:
    return bytes(img.header["descrip"].tobytes()).split(b"\x00")[0].decode("ascii", "replace")


def read_descrip(path: str | Path) -> str:
    """The NIfTI header's description field ('' for anything that isn't a NIfTI file)."""
    return _descrip(nib.load(str(path))) if _is_nifti(path) else ""


def save_preprocessed(volume: Any, path: Path, cfg: ImageConfig) -> None:
    """Write a (1, I, J, K) MetaTensor/array with its affine as NIfTI tagged with the pipeline id."""
    from mmai.utils import atomic_path

    arr = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, dtype=np.float32)[0]
    affine = np.asarray(volume.affine.cpu() if hasattr(volume, "affine") else np.eye(4), dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    img.header["descrip"] = f"{PREPROCESSED_TAG}{image_pipeline_id(cfg)}".encode()
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _augment(chain: Compose, t: torch.Tensor) -> torch.Tensor:
    """Run the random transforms on a plain tensor: without MONAI's metadata tracking (no affine
    is needed for a cached, already-resampled volume) they cost a third as much per sample."""
    from monai.data import get_track_meta, set_track_meta

    prev = get_track_meta()
    set_track_meta(False)
    try:
        return torch.as_tensor(chain({KEY: t})[KEY], dtype=torch.float32)
    finally:
        set_track_meta(prev)


class ImageLoader:
    """Path -> model-ready array (1, *cfg.size) float32, with the raw-input fallback."""

    def __init__(self, cfg: ImageConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        self.tag = f"{PREPROCESSED_TAG}{image_pipeline_id(cfg)}"
        self.device = device
        self._chain: Compose | None = None

    def __call__(self, path: str | list[str]) -> np.ndarray:
        """Load one case: a NIfTI file, a DICOM folder, or a DICOM stack's file list."""
        return self.load(path)[0]

    def load(self, path: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(array (1, *cfg.size) float32, affine (4, 4) voxel -> RAS mm) of one case."""
        try:
            img: Any = nib.load(path) if isinstance(path, str) and _is_nifti(path) else None
            if img is not None and _descrip(img) == self.tag:  # preprocessed: one header read, no chain
                arr, affine = np.asarray(img.dataobj, dtype=np.float32)[None], np.asarray(img.affine)
            else:
                if self._chain is None:
                    self._chain = preprocess_transforms(self.cfg, device=self.device)
                out = apply_chain(self._chain, {KEY: path})[KEY]
                arr = np.asarray(out.detach().cpu(), dtype=np.float32)
                affine = np.asarray(out.affine.cpu(), dtype=np.float64)
        except MmaiError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes a named, per-case error
            raise PreprocessError(f"{path}: cannot load image: {type(exc).__name__}: {exc}") from exc
        if tuple(arr.shape[1:]) != tuple(self.cfg.size):
            raise PreprocessError(f"{path}: image has shape {tuple(arr.shape[1:])}, the pipeline expects "
                                  f"{tuple(self.cfg.size)}; re-run mmai preprocess with this pipeline")
        return arr, affine


class MultimodalDataset(Dataset):
    """Cases of a validated manifest as model-ready dicts.

    Args:
        case_ids: (N,) case identifiers.
        image_paths: (N,) image path or None (missing image); None for a clinical-only model.
        clinical: (N, F) preprocessed values, or None.
        clinical_mask: (N, F) 1 = observed, or None.
        targets: name -> (N,) arrays (``target``; ``time`` and ``event`` for survival).
        image_cfg: the pipeline's image section (needed when image_paths is given).
        augment: random MONAI transforms applied to cached images (training only).
        image_dropout: probability of hiding a present image in training (missing-modality robustness).
        seed: seed for image dropout.
    """

    def __init__(self, case_ids: Sequence[str], *, image_paths: Sequence[str | None] | None = None,
                 clinical: np.ndarray | None = None, clinical_mask: np.ndarray | None = None,
                 targets: dict[str, np.ndarray] | None = None, image_cfg: ImageConfig | None = None,
                 augment: Compose | None = None, image_dropout: float = 0.0, seed: int = 0,
                 loader: ImageLoader | None = None) -> None:
        self.case_ids = [str(c) for c in case_ids]
        n = len(self.case_ids)
        self.image_paths = list(image_paths) if image_paths is not None else None
        if self.image_paths is not None and image_cfg is None:
            raise ValueError("image_cfg is required when image_paths are given")
        self.image_cfg = image_cfg
        self.clinical = clinical if clinical is not None else np.zeros((n, 0), np.float32)
        self.clinical_mask = clinical_mask if clinical_mask is not None else np.zeros((n, 0), np.float32)
        self.targets = targets or {}
        self.augment = augment
        self.image_dropout = image_dropout
        self.rng = np.random.default_rng(seed)
        self.loader = loader or (ImageLoader(image_cfg) if image_cfg is not None else None)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.case_ids)

    def preload(self, progress: bool = False) -> None:
        """Load every image into the cache.

        Raises:
            PreprocessError: listing every case whose image failed (case_id and reason).
        """
        from tqdm.auto import tqdm

        if self.image_paths is None:
            return
        failed: list[str] = []
        for i in tqdm(range(len(self)), desc="loading images", disable=not progress, unit="case", leave=False):
            try:
                self._image(i)
            except MmaiError as exc:
                failed.append(f"case {self.case_ids[i]}: {exc}")
        if failed:
            more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
            raise PreprocessError(f"{len(failed)} training image(s) cannot be loaded (fix or blank their image "
                                  "cell to train with the image missing):\n  " + "\n  ".join(failed[:10]) + more)

    def _image(self, i: int) -> np.ndarray | None:
        if self.image_paths is None or self.image_paths[i] is None:
            return None
        if i not in self._cache:
            assert self.loader is not None  # set whenever image_paths is (checked in __init__)
            self._cache[i] = self.loader(str(self.image_paths[i]))
        return self._cache[i]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "case_id": self.case_ids[i],
            "clinical": torch.as_tensor(self.clinical[i], dtype=torch.float32),
            "clinical_mask": torch.as_tensor(self.clinical_mask[i], dtype=torch.float32),
        }
        for name, values in self.targets.items():
            item[name] = torch.as_tensor(values[i])
        if self.image_cfg is not None:
            img = self._image(i)
            present = img is not None and not (self.image_dropout > 0 and self.rng.random() < self.image_dropout)
            if img is None or not present:
                item["image"] = torch.zeros((1, *self.image_cfg.size), dtype=torch.float32)
            else:
                t = torch.from_numpy(img)
                if self.augment is not None:
                    t = _augment(self.augment, t)
                item["image"] = t
            item["image_present"] = torch.tensor(1.0 if present else 0.0)
        else:
            item["image_present"] = torch.tensor(0.0)
        return item
