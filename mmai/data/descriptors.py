"""Lesion descriptors as model inputs: which ones a run uses, and their value for each case.

The descriptors themselves (first-order + shape statistics inside the lesion mask, IBSI
definitions) are computed by :mod:`mmai.transforms.descriptors` inside the preprocessing chain,
on the lesion box at the pipeline's spacing, before intensity windowing. This module moves them
to where the models read them: numeric columns of the case table named ``lesion_*``, declared as
extra numeric clinical columns (:func:`extend_schema`), so the clinical preprocessor (imputation
and scaling fitted on the training rows only, saved in state.json), the feature tokenizer (one
token per feature) and every consumer of the clinical feature matrix see them like any other.

Where a case's values come from (:func:`attach_descriptors`, the same at train and predict):

- a volume made by ``mmai preprocess``: its provenance (written when the box was cut; the
  preprocessed manifest also carries them as columns, for the user);
- a raw image + mask: the pipeline's chain up to the descriptors, run on the fly;
- no image, no or an empty mask, a volume preprocessed without descriptors, or a failure: all
  NaN (missing: the clinical mask is 0 and the learned "missing" token is used, never a zero),
  with a warning naming the case.

Which descriptors a run used is written to state.json (``descriptors``: names, version) and
read back by the predictor (:func:`names_from_state`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.config import ImageConfig, PipelineConfig
from mmai.errors import ConfigError, MmaiError
from mmai.transforms.descriptors import DESCRIPTOR_NAMES, DESCRIPTORS_KEY, DESCRIPTORS_VERSION

log = logging.getLogger(__name__)

#: key of the run's descriptor record in state.json
STATE_KEY = "descriptors"
#: fusions that never take descriptors: the clinical-only baseline stays clinical only, and
#: image_only has no clinical path (with a lesion mask it stays a pure CNN)
NO_DESCRIPTORS = ("clinical_only", "image_only")
#: fusions that never take the mask-free focal inventory (mmai.data.focal)
NO_FOCAL = ("clinical_only",)
#: intensity kinds the focal inventory is measured on: calibrated CT windows (HU), where a focal
#: enhancing object is brighter than the soft tissue around it; per-cohort / per-volume MR
#: normalisations are not (yet) validated for it
FOCAL_INTENSITY = ("window", "windows")
#: coarser grids do not resolve the objects the inventory counts (5-15 mm lymph nodes are 1-4
#: voxels at 4 mm); the demo's 9 mm grid keeps its CNN-only image path
FOCAL_MAX_SPACING_MM = 4.0


def descriptor_names(config: PipelineConfig) -> tuple[str, ...]:
    """The descriptors a model of ``config`` takes as inputs (empty when none).

    ``image.descriptors: auto`` (default) or ``true``: with ``image.roi.mask`` the lesion
    descriptors, when ``model.fusion`` has a clinical path other than clinical_only; without a
    mask or box the focal-object inventory (:mod:`mmai.data.focal`) of a windowed (CT) pipeline at
    a spacing of at most :data:`FOCAL_MAX_SPACING_MM`,
    for every fusion with an image path (``image_only`` too: they are measured on the image);
    ``false``: none.
    """
    img = config.image
    if img is None or img.descriptors is False:
        return ()
    if img.roi is None or img.roi.mask is None:
        from mmai.transforms.focal import FOCAL_INPUTS

        if img.roi is not None or config.model.fusion in NO_FOCAL or img.intensity.kind not in FOCAL_INTENSITY:
            return ()
        if img.spacing is not None and max(img.spacing) > FOCAL_MAX_SPACING_MM:
            return ()
        return FOCAL_INPUTS
    if config.model.fusion in NO_DESCRIPTORS:
        return ()
    return DESCRIPTOR_NAMES


def is_focal(names: tuple[str, ...]) -> bool:
    """Whether ``names`` are the mask-free focal inventory (not lesion descriptors)."""
    return bool(names) and all(n.startswith("focal_") for n in names)


def extend_schema(schema: Any, names: tuple[str, ...], source: str = "pipeline") -> Any:
    """The clinical schema plus one numeric column per descriptor (a schema of descriptors only
    when the pipeline has no clinical section), in the column order ``from_dict`` restores.

    Raises:
        ConfigError: a declared clinical column has a descriptor's name.
    """
    from mmai.clinical.schema import KINDS, ClinicalColumn, ClinicalSchema

    declared = list(schema.columns) if schema is not None else []
    clash = sorted({c.name for c in declared} & set(names))
    if clash:
        raise ConfigError(f"{source}: clinical column(s) {clash} have the names of lesion descriptors, which "
                          "image.descriptors adds by itself; rename them or set image.descriptors: false")
    # focal volumes span four decades (a 5 mm node to a 12 cm tumour): log1p, as a statistician would
    cols = declared + [ClinicalColumn(name=n, kind="numeric", log=n.startswith("focal_") and n.endswith("_mm3"))
                       for n in names]
    cols.sort(key=lambda c: KINDS.index(c.kind))  # stable: descriptors after the declared numerics
    return ClinicalSchema(columns=tuple(cols))


def descriptor_state(names: tuple[str, ...]) -> dict[str, Any]:
    """The state.json record of the descriptors a run used (empty dict when none)."""
    if not names:
        return {}
    if is_focal(names):
        from mmai.data.focal import focal_state

        return {STATE_KEY: focal_state(names)}
    return {STATE_KEY: {"names": list(names), "version": DESCRIPTORS_VERSION,
                        "computed_on": "lesion box at image.spacing, before intensity windowing",
                        "definitions": "IBSI (Zwanenburg et al. 2020) / pyradiomics; mmai.transforms.descriptors"}}


def run_descriptor_state(config: PipelineConfig) -> dict[str, Any]:
    """:func:`descriptor_state` of the descriptors a model of ``config`` takes."""
    return descriptor_state(descriptor_names(config))


def names_from_state(state: dict[str, Any]) -> tuple[str, ...]:
    """The descriptor names a run recorded in its state.json (empty for runs without).

    Raises:
        CheckpointError: the record names unknown descriptors or another definition version.
    """
    from mmai.errors import CheckpointError

    rec = state.get(STATE_KEY)
    if not rec:
        return ()
    names = tuple(rec.get("names") or ())
    if rec.get("kind") == "focal":
        from mmai.transforms.focal import FOCAL_NAMES, FOCAL_VERSION

        what, known, version = "image descriptors", FOCAL_NAMES, FOCAL_VERSION
    else:
        what, known, version = "lesion descriptors", DESCRIPTOR_NAMES, DESCRIPTORS_VERSION
    unknown = [n for n in names if n not in known]
    if unknown or rec.get("version") != version:
        raise CheckpointError(f"state.json: the run used {what} {unknown or names} of version "
                              f"{rec.get('version')!r}; this mmai computes version {version} "
                              f"({list(known)}); predict with the mmai that trained the run")
    return names


def provenance_entry(out: dict[Any, Any]) -> dict[str, Any] | None:
    """What a preprocessed volume records of its descriptors (None without): version and values
    (NaN as null, JSON has no NaN)."""
    values = out.get(DESCRIPTORS_KEY)
    if values is None:
        return None
    return {"version": DESCRIPTORS_VERSION,
            "values": {k: (float(v) if math.isfinite(v) else None) for k, v in values.items()}}


def _from_entry(entry: Any) -> tuple[np.ndarray | None, str]:
    if not isinstance(entry, dict) or entry.get("version") != DESCRIPTORS_VERSION:
        return None, (f"its lesion descriptors are of version {entry.get('version')!r}, this mmai computes "
                      f"version {DESCRIPTORS_VERSION}" if isinstance(entry, dict) else
                      "it was preprocessed without lesion descriptors") + "; re-run mmai preprocess"
    vals = entry.get("values") or {}
    row = np.array([np.nan if vals.get(n) is None else float(vals[n]) for n in DESCRIPTOR_NAMES])
    return row, "" if np.isfinite(row).any() else "its lesion mask is empty on the pipeline's grid"


def stale_descriptors(cfg: ImageConfig, path: Path) -> bool:
    """Whether a finished preprocessed volume of a lesion-mask pipeline lacks this mmai's
    descriptors (made before them, or another version): ``mmai preprocess`` then redoes it."""
    if cfg.roi is None or cfg.roi.mask is None:
        return False
    from mmai.data.provenance import read_provenance

    entry = (read_provenance(path) or {}).get("lesion_descriptors")
    return not isinstance(entry, dict) or entry.get("version") != DESCRIPTORS_VERSION


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def resolve_mask_paths(cfg: ImageConfig | None, df: pd.DataFrame, base_dir: Path | None) -> pd.DataFrame:
    """``df`` with the lesion-mask column's relative paths made absolute against ``base_dir``
    (the manifest's folder, as for images); unchanged without a mask column or ``base_dir``."""
    if cfg is None or cfg.roi is None or cfg.roi.mask is None or base_dir is None or cfg.roi.mask not in df:
        return df
    out = df.copy()
    out[cfg.roi.mask] = [v if _blank(v) or Path(str(v)).is_absolute() else str((Path(base_dir) / str(v)).resolve())
                         for v in df[cfg.roi.mask]]
    return out


class _Computer:
    """One case's descriptors from its image (preprocessed: provenance; raw: the chain)."""

    def __init__(self, cfg: ImageConfig, device: str) -> None:
        from mmai.data.provenance import expected_provenance

        self.cfg, self.device = cfg, device
        self.expected = expected_provenance(cfg)
        self._chain: Any = None

    def __call__(self, image: Any, mask: Any) -> tuple[np.ndarray | None, str]:
        from mmai.data.provenance import check_provenance, read_provenance

        no_image = not image if isinstance(image, list) else _blank(image)
        if no_image:
            return None, "the case has no image"
        info = read_provenance(image) if not isinstance(image, list) else None
        if info is not None:  # preprocessed by mmai: the values recorded when its box was cut
            check_provenance(info, self.expected, str(image))
            return _from_entry(info.get("lesion_descriptors"))
        if _blank(mask):
            return None, "the case has no lesion mask"
        from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms
        from mmai.transforms.roi import MASK_KEY

        if self._chain is None:
            self._chain = preprocess_transforms(self.cfg, device=self.device, raw=True)
        out = apply_chain(self._chain, {KEY: image, MASK_KEY: str(mask)})
        return _from_entry(provenance_entry(out))


def attach_descriptors(cfg: ImageConfig, df: pd.DataFrame, names: tuple[str, ...], *, device: str = "cpu",
                       base_dir: Path | None = None, loader: Any = None) -> pd.DataFrame:
    """``df`` with one float column per descriptor of ``names`` (NaN = missing), computed from each
    row's image (and lesion mask, for raw images); any columns of those names are replaced.

    Args:
        cfg: the pipeline's image section (with ``roi.mask``).
        df: validated case rows (image column: absolute paths, a DICOM file list, or blank).
        names: the descriptors to attach (:func:`descriptor_names`, or a run's state).
        device: device of the preprocessing chain for raw images.
        base_dir: folder that relative mask paths are relative to (the manifest's).
        loader: for the focal inventory, the caller's image loader (predict's: its volumes are then
            loaded once for the inventory and the model); None: a loader of ``cfg``.
    """
    if not names:
        return df
    if is_focal(names):
        from mmai.data.focal import attach_focal

        return attach_focal(cfg, df, names, device=device, loader=loader)
    compute = _Computer(cfg, device)
    mask_col = cfg.roi.mask if cfg.roi is not None else None
    masks = resolve_mask_paths(cfg, df, base_dir)[mask_col] if mask_col in df else [None] * len(df)
    rows = np.full((len(df), len(DESCRIPTOR_NAMES)), np.nan)
    missing: list[str] = []
    for i, (cid, image, mask) in enumerate(zip(df["case_id"], df[cfg.column], masks, strict=True)):
        try:
            values, why = compute(image, mask)
        except MmaiError as exc:
            values, why = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - any reader failure: missing descriptors, named
            values, why = None, f"{type(exc).__name__}: {exc}"
        if values is not None:
            rows[i] = values
        if why:
            missing.append(str(cid))
            log.warning("case %s: lesion descriptors missing: %s", cid, why)
    return with_columns(df, rows, DESCRIPTOR_NAMES, names, missing, "lesion descriptors", logging.WARNING)


def with_columns(df: pd.DataFrame, rows: np.ndarray, all_names: tuple[str, ...], names: tuple[str, ...],
                 missing: list[str], what: str, level: int) -> pd.DataFrame:
    """``df`` with the columns of ``names`` taken from ``rows`` (len(df), len(all_names)) (NaN =
    missing), after one ``level`` log line listing the cases in ``missing`` (the first 10)."""
    if missing:
        log.log(level, "%d of %d case(s) have no %s (missing values, not zeros): %s", len(missing), len(df), what,
                ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    out = df.copy()
    for j, name in enumerate(all_names):
        if name in names:
            out[name] = rows[:, j]
    return out


def attach_run_descriptors(config: PipelineConfig, df: pd.DataFrame, *, device: str = "cpu",
                           base_dir: Path | None = None) -> pd.DataFrame:
    """``df`` with the descriptor columns a model of ``config`` takes (unchanged without)."""
    names = descriptor_names(config)
    if not names or config.image is None:
        return df
    return attach_descriptors(config.image, df, names, device=device, base_dir=base_dir)


def descriptor_columns(cfg: ImageConfig, out: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """The preprocessed manifest ``out`` (image column relative to ``out_dir``) with every
    descriptor as a column, read back from the written volumes' provenance (cases without an
    image: empty cells)."""
    col = out[cfg.column]
    absolute = [None if _blank(v) else str(Path(out_dir) / str(v)) for v in col]
    return attach_descriptors(cfg, out.assign(**{cfg.column: absolute}), DESCRIPTOR_NAMES).assign(
        **{cfg.column: col})
