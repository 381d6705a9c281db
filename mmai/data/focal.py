"""Mask-free image descriptors as model inputs: the focal-object inventory of each case's volume.

Where a pipeline has images but no lesion mask, ``image.descriptors: auto`` (the default) gives
every model with an image path the inventory of :mod:`mmai.transforms.focal` (object count,
counts by size band, largest / second diameter, volumes) as numeric columns named ``focal_*``,
declared and preprocessed exactly like the lesion descriptors (:mod:`mmai.data.descriptors`).

They are measured on the model-ready volume the run's :class:`~mmai.data.dataset.ImageLoader`
returns (the pipeline's spacing, after intensity windowing / normalisation; the detector's
thresholds are relative to each volume's own body and noise, so they need no scanner units), on
the channel with the narrowest intensity window (the soft-tissue window of a multi-window CT
pipeline) or channel 0. Raw and preprocessed inputs therefore give the same values, at train,
predict and explain alike. Values are memoised per (pipeline id, image path) in the process, so
several models trained on one cohort measure each volume once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from mmai.config import ImageConfig
from mmai.errors import MmaiError
from mmai.transforms.focal import FOCAL_NAMES, FOCAL_VERSION, focal_descriptors

log = logging.getLogger(__name__)

_MEMO: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_MEMO_SIZE = 20000


def focal_state(names: tuple[str, ...]) -> dict[str, Any]:
    """The state.json record (under ``descriptors``) of a run that takes the focal inventory."""
    return {"names": list(names), "version": FOCAL_VERSION, "kind": "focal",
            "computed_on": "the model-ready volume (pipeline spacing, after intensity windowing), narrowest window",
            "definitions": "multi-scale LoG blobs grown into regions; mmai.transforms.focal"}


def channel_for(cfg: ImageConfig) -> int:
    """The channel the inventory is measured on: the narrowest window of a ``windows`` pipeline, else 0."""
    inten = cfg.intensity
    if inten.kind == "windows" and inten.windows:
        return int(np.argmin([hi - lo for lo, hi in inten.windows]))
    return 0


def measure(arr: np.ndarray, affine: np.ndarray, channel: int) -> np.ndarray:
    """The inventory (len(FOCAL_NAMES),) of one model-ready volume ``arr`` (C, I, J, K) with its
    affine (4, 4): channel ``channel`` (or the last one), at the affine's spacing. The one function
    both :func:`attach_focal` and predict's preprocessing workers (:mod:`mmai.inference.pipelined`)
    measure with, so where it runs does not change a value."""
    spacing = nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64))
    return focal_descriptors(np.asarray(arr)[min(channel, arr.shape[0] - 1)], spacing.tolist())


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()) \
        or (isinstance(v, list) and not v)


def attach_focal(cfg: ImageConfig, df: pd.DataFrame, names: tuple[str, ...], *, device: str = "cpu",
                 run_state: dict[str, Any] | None = None, loader: Any = None) -> pd.DataFrame:
    """``df`` with one float column per focal descriptor of ``names`` (NaN = missing: no image, or
    an image that cannot be loaded, with a warning naming the case).

    Args:
        cfg: the pipeline's image section.
        df: validated case rows (image column: absolute paths, a DICOM file list, or blank).
        names: the descriptors to attach (subset of :data:`~mmai.transforms.focal.FOCAL_NAMES`).
        device: device of the preprocessing chain for raw images.
        run_state: a trained run's ``state["image"]`` (fitted intensity statistics), if any.
        loader: an image loader to use instead of a new one of ``cfg``; one with ``peek`` (predict's
            :class:`~mmai.inference.pipelined.PrefetchLoader`) keeps each volume for the model's load,
            and one with ``peek_measured`` also hands over the inventory its worker measured with
            :func:`measure` beside the volume (None: measured here).
    """
    from mmai.data.dataset import ImageLoader
    from mmai.data.descriptors import with_columns
    from mmai.transforms.pipelines import image_pipeline_id

    if loader is None:
        loader = ImageLoader(cfg, device=device, run_state=run_state)
    load = getattr(loader, "peek", loader.load)
    load_measured = getattr(loader, "peek_measured", None)
    pid, ch = image_pipeline_id(cfg), channel_for(cfg)
    rows = np.full((len(df), len(FOCAL_NAMES)), np.nan)
    missing: list[str] = []
    for i, (cid, image) in enumerate(zip(df["case_id"], df[cfg.column], strict=True)):
        if _blank(image):
            missing.append(str(cid))
            continue
        key = (pid, "|".join(map(str, image)) if isinstance(image, list) else str(image))
        if key in _MEMO:
            rows[i] = _MEMO[key]
            continue
        try:
            if load_measured is not None:
                arr, affine, values = load_measured(image)
            else:
                (arr, affine), values = load(image), None
            if values is None:
                values = measure(arr, affine, ch)
        except MmaiError:  # the reader's message may hold a patient folder: the case's own error row reports it
            log.warning("case %s: image descriptors missing (its image could not be read)", cid)
            missing.append(str(cid))
            continue
        except Exception as exc:  # noqa: BLE001 - any reader failure: missing descriptors, named
            log.warning("case %s: image descriptors missing (%s while reading its image)", cid, type(exc).__name__)
            missing.append(str(cid))
            continue
        rows[i] = values
        _MEMO[key] = values
        if len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return with_columns(df, rows, FOCAL_NAMES, names, missing, "image descriptors", logging.INFO)
