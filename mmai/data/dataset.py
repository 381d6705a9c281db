"""MultimodalDataset: one case -> dict(image, image_present, clinical, clinical_mask, targets, case_id).

Images are loaded once and cached in memory for small grids (``image.cache: memory``), or read
through a disk cache keyed by file content + pipeline id (``image.cache: disk``, full
resolution). A preprocessed NIfTI (stamped by ``mmai preprocess``, see mmai/data/provenance.py)
is checked against the pipeline id and modality and read as is; one made by another pipeline is
refused. Any other image (DICOM folder, raw NIfTI) goes through the pipeline's preprocessing
chain first, so training and inference accept raw and preprocessed inputs alike and agree.
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
from mmai.data.cache import DiskCache, cache_key
from mmai.data.provenance import (
    ProvenanceError,
    check_provenance,
    expected_provenance,
    is_nifti,
    provenance_of,
    stamp,
)
from mmai.errors import MmaiError, PreprocessError
from mmai.transforms.intensity import stats_digest
from mmai.transforms.pipelines import (
    KEY,
    apply_chain,
    image_channels,
    image_pipeline_id,
    output_shape,
    preprocess_transforms,
)

log = logging.getLogger(__name__)


def save_preprocessed(volume: Any, path: Path, cfg: ImageConfig, *, modality: str = "unknown",
                      stats: dict[str, float] | None = None, fov_lost_fraction: float = 0.0,
                      input_flags: str = "", descriptors: dict[str, Any] | None = None) -> None:
    """Write a (C, I, J, K) MetaTensor/array with its affine as NIfTI ((I, J, K) for C = 1, else
    (I, J, K, C)), stamped with its provenance (pipeline id, modality, intensity statistics, the
    input flags of :mod:`mmai.io.input_flags`, and the lesion descriptors of a lesion-mask pipeline:
    :func:`mmai.data.descriptors.provenance_entry`)."""
    from mmai.utils import atomic_path

    arr = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, dtype=np.float32)
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    affine = np.asarray(volume.affine.cpu() if hasattr(volume, "affine") else np.eye(4), dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)
    stamp(img, {"pipeline_id": image_pipeline_id(cfg), "modality": modality, "intensity_stats": stats,
                "fov_lost_fraction": round(float(fov_lost_fraction), 6), "input_flags": input_flags,
                **({"lesion_descriptors": descriptors} if descriptors is not None else {})})
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
    """Path -> model-ready array (C, I, J, K) float32 + affine, with the raw-input fallback.

    A preprocessed NIfTI is checked against the pipeline id and modality (:mod:`mmai.data.provenance`)
    and read as is; a raw input runs the pipeline's chain. With ``cfg.cache: disk`` results are
    read from / written to a :class:`~mmai.data.cache.DiskCache` keyed by content + pipeline.

    Args:
        cfg: the pipeline's image section.
        device: device of the preprocessing chain for raw inputs.
        stats: fitted intensity statistics (``intensity.kind: percentile``), e.g. from state.json.
        run_state: a run's ``state["image"]`` (expected pipeline id, modality, statistics).
    """

    def __init__(self, cfg: ImageConfig, device: str = "cpu", *, stats: dict[str, float] | None = None,
                 run_state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.expected = expected_provenance(cfg)
        if run_state and run_state.get("modality"):
            self.expected["modality"] = run_state["modality"]
        self.stats = stats if stats is not None else (run_state or {}).get("intensity_stats")
        self.device = device
        self.modalities_seen: set[str] = set()
        self.last_flags = ""
        self.disk = DiskCache(cfg.cache_dir) if cfg.cache == "disk" and cfg.cache_dir else None
        self._chain: Compose | None = None

    def __call__(self, path: str | list[str]) -> np.ndarray:
        """Load one case: a NIfTI file, a DICOM folder, or a DICOM stack's file list."""
        return self.load(path)[0]

    def load(self, path: str | list[str], roi: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(array (C, I, J, K) float32, affine (4, 4) voxel -> RAS mm) of one case.

        Args:
            path: the image.
            roi: ``{"roi_mask": path}`` or ``{"roi_center": [x, y, z] RAS mm}`` for a raw input of a
                ``image.roi`` pipeline.
        """
        key = None
        if self.disk is not None:
            key = cache_key(path, self.expected["pipeline_id"], {"roi": roi, "stats": self.stats})
            hit = self.disk.get(key)
            if hit is not None:  # what the first read noted (modality, fitted statistics) still counts
                self._note(hit[2])
                return hit[0], hit[1]
        try:
            arr, affine, note = self._load(path, roi)
        except MmaiError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes a named, per-case error
            raise PreprocessError(f"{path}: cannot load image: {type(exc).__name__}: {exc}") from exc
        self._check_shape(path, arr)
        if self.disk is not None and key is not None:
            self.disk.put(key, arr, affine, note)
        return arr, affine

    def _load(self, path: str | list[str], roi: dict[str, Any] | None
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(array, affine, note): the note is what :meth:`_note` recorded from this case."""
        img: Any = nib.load(path) if isinstance(path, str) and is_nifti(path) else None
        info = provenance_of(img) if img is not None else None
        if info is not None:  # preprocessed: one header read, no chain
            check_provenance(info, self.expected, str(path))
            note = {"modality": info.get("modality", "unknown"), "intensity_stats": info.get("intensity_stats"),
                    "input_flags": str(info.get("input_flags") or "")}
            self._note(note)
            arr = np.asarray(img.dataobj, dtype=np.float32)
            arr = arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0)
            return np.ascontiguousarray(arr), np.asarray(img.affine), note
        if self.cfg.roi is not None and roi is None:
            cols = [self.cfg.roi.mask] if self.cfg.roi.mask is not None else list(self.cfg.roi.center or ())
            raise PreprocessError(f"{path}: a raw scan of an image.roi pipeline needs the lesion column(s) {cols} "
                                  "(in the manifest, or the --clinical table for --dicom-root), or the box made "
                                  "by `mmai preprocess`")
        if self._chain is None:
            self._chain = preprocess_transforms(self.cfg, device=self.device, stats=self.stats)
        out = apply_chain(self._chain, {KEY: path, **(roi or {})})
        note = {"modality": str(out.get("modality", "unknown")), "input_flags": str(out.get("input_flags") or "")}
        self._note(note)
        vol = out[KEY]
        return (np.asarray(vol.detach().cpu(), dtype=np.float32), np.asarray(vol.affine.cpu(), dtype=np.float64),
                note)

    def _note(self, info: dict[str, Any]) -> None:
        self.modalities_seen.add(str(info.get("modality", "unknown")))
        self.last_flags = str(info.get("input_flags") or "")  # what was repaired in the case just loaded
        stats = info.get("intensity_stats")
        if stats is not None and self.stats is None:
            self.stats = stats  # recorded into the run's state.json, reused for raw inputs at inference
        elif stats is not None and stats_digest(stats) != stats_digest(self.stats):
            raise ProvenanceError("preprocessed volumes carry different intensity statistics (fitted on "
                                  "different training sets); preprocess all cases in one `mmai preprocess` run")

    def _check_shape(self, path: Any, arr: np.ndarray) -> None:
        shape, want_c = output_shape(self.cfg), image_channels(self.cfg)
        if arr.shape[0] != want_c or (shape is not None and tuple(arr.shape[1:]) != tuple(shape)):
            want = f"({want_c}, {', '.join(map(str, shape))})" if shape else f"{want_c} channel(s)"
            raise PreprocessError(f"{path}: image has shape {tuple(arr.shape)}, the pipeline expects {want}; "
                                  "re-run mmai preprocess with this pipeline")


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
        loader: a shared :class:`ImageLoader` (default: a new one for ``image_cfg``).
        roi_sources: (N,) per-case ``{"roi_mask": path}`` / ``{"roi_center": [x, y, z]}`` for raw
            inputs of an ``image.roi`` pipeline (preprocessed inputs need none).

    Items: ``case_id``, ``clinical`` (F,), ``clinical_mask`` (F,), targets, and with an image section
    ``image`` (C, I, J, K) float32, ``image_present`` () and ``affine`` (4, 4) float32: voxel index ->
    RAS millimetres of ``image`` as preprocessed (training augmentation is not reflected in it).
    Images are held in RAM with ``image.cache: memory`` (small grids), else read per item (from the
    disk cache with ``image.cache: disk``).
    """

    def __init__(self, case_ids: Sequence[str], *, image_paths: Sequence[str | None] | None = None,
                 clinical: np.ndarray | None = None, clinical_mask: np.ndarray | None = None,
                 targets: dict[str, np.ndarray] | None = None, image_cfg: ImageConfig | None = None,
                 augment: Compose | None = None, image_dropout: float = 0.0, seed: int = 0,
                 loader: ImageLoader | None = None, roi_sources: Sequence[dict[str, Any] | None] | None = None
                 ) -> None:
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
        self.roi_sources = list(roi_sources) if roi_sources is not None else None
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._keep = image_cfg is not None and image_cfg.cache == "memory"
        self._shape = output_shape(image_cfg) if image_cfg is not None else None

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

    def _image(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.image_paths is None or self.image_paths[i] is None:
            return None
        if i in self._cache:
            return self._cache[i]
        if self.loader is None:
            raise ValueError("image_cfg is required when image_paths are given")
        roi = self.roi_sources[i] if self.roi_sources is not None else None
        out = self.loader.load(str(self.image_paths[i]), roi=roi)
        if self._shape is None:
            self._shape = tuple(out[0].shape[1:])  # placeholder shape for missing images
        if self._keep:
            self._cache[i] = out
        return out

    def _placeholder(self) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.image_cfg
        if cfg is None:
            raise ValueError("no image section")
        shape = self._shape or (cfg.size_multiple,) * 3
        affine = np.diag([*(cfg.spacing or (1.0, 1.0, 1.0)), 1.0])
        return np.zeros((image_channels(cfg), *shape), np.float32), affine

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "case_id": self.case_ids[i],
            "clinical": torch.as_tensor(self.clinical[i], dtype=torch.float32),
            "clinical_mask": torch.as_tensor(self.clinical_mask[i], dtype=torch.float32),
        }
        for name, values in self.targets.items():
            item[name] = torch.as_tensor(values[i])
        if self.image_cfg is not None:
            loaded = self._image(i)
            present = loaded is not None and not (self.image_dropout > 0 and self.rng.random() < self.image_dropout)
            if loaded is None:
                loaded = self._placeholder()
            img, affine = loaded
            if not present:
                item["image"] = torch.zeros(img.shape, dtype=torch.float32)
            else:
                t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
                if self.augment is not None:
                    t = _augment(self.augment, t)
                item["image"] = t
            item["affine"] = torch.as_tensor(np.asarray(affine), dtype=torch.float32)
            item["image_present"] = torch.tensor(1.0 if present else 0.0)
        else:
            item["image_present"] = torch.tensor(0.0)
        return item
