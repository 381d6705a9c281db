"""Explanations in the scan's own geometry: 3D saliency and attention maps (NIfTI with the input
file's shape and affine), an overlay PNG on the native slices, and clinical attributions.

One file set per case in ``OUT`` (``<stem>`` is the case id, or a safe form of it plus a short
hash when the id holds characters other than letters, digits, ``_`` and ``-``):

- ``<stem>_saliency.nii.gz``: |gradient x input| of the model's score (positive-class logit,
  log-risk or regression value) with respect to the image, normalised to [0, 1];
- ``<stem>_attention.nii.gz`` (cross-attention models): the [CLS] query's attention over the
  image tokens, normalised to [0, 1];
- ``<stem>_overview.png``: three planes through the saliency peak in radiological convention, the
  map (and the attention map) over the image, with letters, mm positions and a colour bar
  (:mod:`mmai.figures.overlay`);
- ``<stem>_viewer.html``: the scan with its maps in three planes (NiiVue), one self-contained page
  that opens offline (:mod:`mmai.viewer`);
- ``<stem>_explain.json``, written LAST: case id, model id, the files of the set, the clinical
  attributions (score(all values) - score(this feature set to missing); the model's learned
  missing token is the reference) and the geometry. A case is done when this file exists, names
  this model, and every file it lists exists.

``clinical_attributions.csv`` (case_id, feature, observed, attribution) is assembled from every
``*_explain.json`` in the folder after each run, under an exclusive lock on the folder, so a
rerun makes exactly the missing file sets and shards writing into one folder do not clobber
each other (the last shard to finish writes the complete table). Every file is written
atomically; temporary files a killed run left for a case are removed when that case is redone.

Geometry: the maps are computed on the model's grid (after reorientation, resampling and
crop/pad), sliding-window models stitch them from the windows with MONAI's gaussian importance
map (:func:`mmai.models.windows.stitch`), and they are resampled onto the input file's own grid
with MONAI's ``SpatialResample`` (model-grid affine -> input affine, trilinear, zero outside the
model's field of view): the equivalent of inverting the preprocessing chain, which also works
for volumes that were preprocessed earlier by ``mmai preprocess``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from mmai.engine.runspec import model_inputs
from mmai.errors import MmaiError
from mmai.figures.overlay import MapLayer, pipeline_window, prediction_title, write_overlay_png
from mmai.inference.explain_geometry import native_image, to_native
from mmai.models.windows import stitch, upsample_cells
from mmai.transforms.pipelines import placeholder_shape
from mmai.utils import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

TABLE = "clinical_attributions.csv"
COLUMNS = ["case_id", "feature", "observed", "attribution"]
_KINDS = {"saliency": ".nii.gz", "attention": ".nii.gz", "overview": ".png", "viewer": ".html", "explain": ".json"}


def _score(out: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, n_outputs) -> (B,) the scalar that is explained."""
    if kind == "multiclass":
        return out.max(dim=1).values
    return out[:, 0]


def case_stem(case_id: str) -> str:
    """File-name stem of a case: the id itself when it is file-safe, else a safe form + hash."""
    if re.fullmatch(r"[A-Za-z0-9_-]{1,100}", case_id):
        return case_id
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", case_id)[:60]
    return f"{safe}-{hashlib.sha1(case_id.encode()).hexdigest()[:10]}"


def case_files(out_dir: Path, case_id: str) -> dict[str, Path]:
    """The file set of one case: kind -> path."""
    stem = case_stem(case_id)
    return {k: Path(out_dir) / f"{stem}_{k}{suffix}" for k, suffix in _KINDS.items()}


def _save_map(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(tmp))


def _normalise(arr: np.ndarray) -> np.ndarray:
    return arr / max(float(arr.max()), 1e-12)


def clinical_attributions(model: torch.nn.Module, kind: str, image: torch.Tensor | None, present: torch.Tensor,
                          values: torch.Tensor, mask: torch.Tensor, **model_kw: Any) -> torch.Tensor:
    """(B, F) score(all) - score(feature f missing), for observed features (0 where missing).

    A sliding-window model encodes the image once for all F + 1 passes (its tokens do not depend
    on the clinical values)."""
    tokenizer = getattr(model, "windows", None)
    if tokenizer is not None:
        tokenizer.reuse = {}
    try:
        return _attributions(model, kind, image, present, values, mask, **model_kw)
    finally:
        if tokenizer is not None:
            tokenizer.reuse = None


def _attributions(model: torch.nn.Module, kind: str, image: torch.Tensor | None, present: torch.Tensor,
                  values: torch.Tensor, mask: torch.Tensor, **model_kw: Any) -> torch.Tensor:
    with torch.no_grad():
        base = _score(model(image, present, values, mask, **model_kw), kind)  # (B,)
        out = torch.zeros_like(values)
        for f in range(values.shape[1]):
            m = mask.clone()
            m[:, f] = 0
            out[:, f] = (base - _score(model(image, present, values, m, **model_kw), kind)) * mask[:, f]
    return out


def saliency(model: torch.nn.Module, kind: str, image: torch.Tensor, present: torch.Tensor, values: torch.Tensor,
             mask: torch.Tensor, **model_kw: Any) -> torch.Tensor:
    """|d score / d image * image| per case, normalised to [0, 1]: (B, D, H, W).

    A sliding-window model (``model.windows``) is differentiated window batch by window batch
    (activation checkpointing bounds the memory) and the per-window maps are stitched with
    MONAI's gaussian blending; its attention from the same pass is kept for :func:`attention_map`.
    """
    tokenizer = getattr(model, "windows", None)
    if tokenizer is not None:
        return _window_saliency(model, tokenizer, kind, image, present, values, mask, **model_kw)
    x = image.clone().requires_grad_(True)
    score = _score(model(x, present, values, mask, **model_kw), kind).sum()
    (grad,) = torch.autograd.grad(score, x)
    sal = (grad * x).abs().sum(dim=1).detach()  # (B, D, H, W)
    peak = sal.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return sal / peak[:, None, None, None]


def _window_saliency(model: Any, tokenizer: Any, kind: str, image: torch.Tensor, present: torch.Tensor,
                     values: torch.Tensor, mask: torch.Tensor, **model_kw: Any) -> torch.Tensor:
    tokenizer.capture = []
    try:
        score = _score(model(image, present, values, mask, **model_kw), kind).sum()
        crops = [x for x, _ in tokenizer.capture]
        grads = torch.autograd.grad(score, crops)
        layout = model.last_grid
        b, n_win = image.shape[0], len(layout.slices)
        maps = torch.zeros((b, n_win, *layout.roi_size), device=image.device)  # (B, W, r0, r1, r2)
        for (x, pairs), g in zip(tokenizer.capture, grads, strict=True):
            per = (g * x).abs().sum(dim=1).detach()  # (n, r0, r1, r2)
            for k, (w, i) in enumerate(pairs):
                maps[i, w] = per[k]
    finally:
        tokenizer.capture = None
    sal = stitch(maps, layout)  # (B, D, H, W)
    peak = sal.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return sal / peak[:, None, None, None]


def attention_map(model: Any, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The [CLS] attention over image tokens from the last forward pass on the model grid: (B, *shape).

    One pass: the token grid upsampled (trilinear). Sliding windows: each window's cells upsampled
    to the window, then stitched with MONAI's gaussian blending.
    """
    att = getattr(model, "last_attention", None)
    grid = getattr(model, "last_grid", None)
    if att is None or grid is None:
        return None
    cls_to_img = att[:, 0, 1:].float()  # (B, N) - key 0 is the missing-image token
    if not isinstance(grid, tuple):  # a WindowLayout
        return stitch(upsample_cells(cls_to_img, grid), grid)
    vol = cls_to_img.reshape(-1, 1, *grid)
    return F.interpolate(vol, size=shape, mode="trilinear", align_corners=False)[:, 0]


# ----------------------------------------------------------------------------- the file sets


def is_done(out_dir: Path, case_id: str, model_id: str) -> bool:
    """True when the case's ``_explain.json`` names ``model_id`` and every file it lists exists."""
    marker = case_files(out_dir, case_id)["explain"]
    try:
        info = json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if info.get("case_id") != case_id or info.get("model_id") != model_id:
        return False
    return all((Path(out_dir) / name).exists() for name in info.get("files", []))


def _remove_stale_temps(out_dir: Path, case_id: str) -> None:
    """Temporary files ``atomic_path`` left for this case's files when a run was killed."""
    for path in case_files(out_dir, case_id).values():
        stem, suffix = path.name.split(".")[0], "".join(path.suffixes)
        for tmp in Path(out_dir).glob(f".{stem}.*.tmp{suffix}"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive advisory lock on the folder itself (no lock file is left behind)."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def assemble_attributions(out_dir: Path) -> Path:
    """Rebuild ``clinical_attributions.csv`` from every case's ``_explain.json`` (locked, atomic)."""
    out_dir = Path(out_dir)
    with _folder_lock(out_dir):
        rows: list[dict[str, Any]] = []
        for marker in sorted(out_dir.glob("*_explain.json")):
            try:
                info = json.loads(marker.read_text())
            except json.JSONDecodeError as exc:
                raise MmaiError(f"{marker}: not valid JSON ({exc}); delete it and rerun to remake that case") from exc
            rows += [{"case_id": info["case_id"], **r} for r in info.get("attributions", [])]
        table = pd.DataFrame(rows, columns=COLUMNS).sort_values(["case_id"], kind="stable")
        with atomic_path(out_dir / TABLE) as tmp:
            table.to_csv(tmp, index=False)
    return out_dir / TABLE


def explain_cases(predictor: Any, df: pd.DataFrame, out_dir: Path, *, progress: bool = True) -> Path:
    """Write the file set of every case of ``df`` that is not done yet; returns the table's path.

    Cases whose clinical values or image cannot be read are logged and skipped (no file set, so a
    rerun tries them again).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = skipped = failed = 0
    for i in tqdm(range(len(df)), desc="explain", unit="case", disable=not progress):
        case = df.iloc[i : i + 1]
        cid = str(case["case_id"].iloc[0])
        if is_done(out_dir, cid, predictor.model_id):
            skipped += 1
            continue
        _remove_stale_temps(out_dir, cid)
        try:
            explain_case(predictor, case, out_dir)
            made += 1
        except MmaiError as exc:
            log.warning("explain: case %s skipped: %s", cid, exc)
            failed += 1
    csv_path = assemble_attributions(out_dir)
    log.info("explain: %d made, %d already done, %d failed -> %s", made, skipped, failed, out_dir)
    return csv_path


def _case_inputs(predictor: Any, case: pd.DataFrame) -> dict[str, Any]:
    """Tensors of one case: per model of the run its clinical values/mask, the image (model
    grid), its affine, the input path."""
    dev = predictor.device
    errors: list[dict[str, str]] = []
    ok = [True]
    clinical = []
    case = predictor.with_descriptors(case)  # a lesion-mask run's descriptors, as predict computes them
    for spec, _ in predictor.members:
        values, mask, ok = predictor._clinical(case, errors, spec.clinical, ok)
        clinical.append((torch.from_numpy(values).to(dev), torch.from_numpy(mask).to(dev), mask[0]))
    if not ok[0]:
        raise MmaiError(errors[0]["error"] if errors else "invalid clinical values")
    out: dict[str, Any] = {"clinical": clinical, "image": None, "present": torch.zeros(1, device=dev),
                           "affine": None, "path": None}
    if not predictor.uses_image:
        return out
    row = case.iloc[0].to_dict()
    path = row[predictor.config.image.column]
    if isinstance(path, str | list):
        roi = predictor.spec.roi_sources(case, predictor.base_dir)[0]
        arr, affine = predictor.load_image(row, roi)  # (C, D, H, W), (4, 4)
        out.update(image=torch.from_numpy(arr[None]).to(dev), present=torch.ones(1, device=dev), affine=affine,
                   path=path, roi=roi)
    else:  # a missing image: masked out by the model; the pipeline's channels and shape
        out["image"] = torch.zeros((1, *placeholder_shape(predictor.config.image)), device=dev)
    return out


def _one_token(model: Any) -> bool:
    """The model saw the image as one token (e.g. a lesion box): its attention map would be constant."""
    grid = getattr(model, "last_grid", None)
    return isinstance(grid, tuple) and int(np.prod(grid)) <= 1


def explain_case(predictor: Any, case: pd.DataFrame, out_dir: Path) -> dict[str, Any]:
    """Maps, overview and attributions of one case (a one-row frame); returns its ``_explain.json``.

    An ensemble (a K-fold run) is explained by the mean of its models' maps and attributions.
    Maps are written on the input scan's grid: for a lesion-box model read from the raw scan, the
    box's map placed back into the patient's volume (zero outside the box). A model that sees the
    image as one token has no attention map (a constant): it is skipped, with the reason in the
    JSON's ``notes``."""
    kind = predictor.encoding.kind
    cid = str(case["case_id"].iloc[0])
    paths = case_files(out_dir, cid)
    x = _case_inputs(predictor, case)
    dev = predictor.device
    files: list[str] = []
    notes: list[str] = []
    geometry: dict[str, Any] = {}
    sals: list[np.ndarray] = []
    atts: list[np.ndarray] = []
    attrs: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    for (spec, model), (values, mask, _) in zip(predictor.members, x["clinical"], strict=True):
        batch = {"image": x["image"], "image_present": x["present"], "clinical": values, "clinical_mask": mask,
                 "affine": None if x["affine"] is None else
                 torch.tensor(np.asarray(x["affine"])[None], dtype=torch.float32, device=dev)}
        _, kw = model_inputs(model, batch)
        if x["affine"] is not None:
            with torch.no_grad():  # the prediction the overview's title states
                preds.append(spec.predictions(model(x["image"], x["present"], values, mask, **kw).float().cpu())[0])
            sals.append(saliency(model, kind, x["image"], x["present"], values, mask, **kw)[0].cpu().numpy())
            att = attention_map(model, tuple(x["image"].shape[2:]))
            if att is not None and not _one_token(model):
                atts.append(att[0].cpu().numpy())
            elif att is not None and "one image token" not in " ".join(notes):
                notes.append("attention map skipped: the model sees the image as one image token, so its "
                             "attention over the image is constant")
        if spec.clinical is not None and list(spec.clinical.feature_names) == list(predictor.pre.feature_names):
            attrs.append(clinical_attributions(model, kind, x["image"], x["present"], values, mask, **kw)[0]
                         .cpu().numpy())
    if sals:
        native, native_affine = native_image(x["path"], predictor.config.image)  # (X, Y, Z), (4, 4)
        if predictor.config.image.roi is not None and not x.get("roi"):
            notes.append("maps on the lesion box (the input is a preprocessed box); give the raw scan with its "
                         "mask/centre columns for maps on the patient's full scan")
        sal_n = _normalise(to_native(_normalise(np.mean(sals, axis=0)), x["affine"], native_affine, native.shape))
        _save_map(sal_n, native_affine, paths["saliency"])
        files.append(paths["saliency"].name)
        if atts:
            att_n = _normalise(to_native(np.mean(atts, axis=0), x["affine"], native_affine, native.shape))
            _save_map(att_n, native_affine, paths["attention"])
            files.append(paths["attention"].name)
        title = prediction_title(cid, predictor.model_id, kind, getattr(predictor.encoding, "classes", []),
                                 np.mean(preds, axis=0), case.iloc[0].get(predictor.config.task.target))
        overview_png(native, sal_n, native_affine, paths["overview"], title, attention=att_n if atts else None,
                     window=pipeline_window(native, getattr(predictor.config.image, "intensity", None)))
        files.append(paths["overview"].name)
        from mmai.viewer import prediction_facts, write_case_page

        write_case_page(paths["viewer"], native, {"saliency": sal_n, **({"attention": att_n} if atts else {})},
                        native_affine, case_id=cid,
                        facts=prediction_facts(predictor, case, _prediction_row(predictor, case, x, preds)))
        files.append(paths["viewer"].name)
        geometry = {"shape": list(native.shape), "affine": np.asarray(native_affine).tolist(),
                    "model_grid_shape": list(x["image"].shape[2:]),
                    "model_grid_affine": np.asarray(x["affine"]).tolist()}
    attributions = []
    names = predictor.pre.feature_names if predictor.pre is not None else []
    if names and attrs:
        attr_np = np.mean(attrs, axis=0)
        observed = x["clinical"][0][2]
        attributions = [{"feature": n, "observed": int(observed[f]), "attribution": float(attr_np[f])}
                        for f, n in enumerate(names)]
    info = {"case_id": cid, "model_id": predictor.model_id, "files": files, "attributions": attributions,
            "geometry": geometry, "notes": notes}
    atomic_write_json(paths["explain"], info)  # last: marks the case done
    return info


def _prediction_row(predictor: Any, case: pd.DataFrame, x: dict[str, Any], preds: list[np.ndarray]
                    ) -> dict[str, Any] | None:
    """The case's predictions.csv row from the forward passes explain already made (the members'
    mean, as ``predict`` averages them); None for a predictor without a run contract (a test stub)."""
    spec: Any = getattr(predictor, "spec", None)
    if not hasattr(spec, "rows") or not hasattr(predictor, "_passthrough") or not preds:
        return None
    observed = np.asarray(x["clinical"][0][2])  # (F,) the first member's clinical mask, as predict reads it
    present = np.asarray([int(observed.any()) if observed.size else 0])
    return spec.rows([str(case["case_id"].iloc[0])], np.mean(preds, axis=0)[None], present,
                     predictor._passthrough(case, [0]))[0]


def overview_png(image: np.ndarray, sal: np.ndarray, affine: np.ndarray, path: Path, title: str,
                 attention: np.ndarray | None = None, window: tuple[tuple[float, float], str] | None = None) -> None:
    """Three planes through the saliency peak in radiological convention, the map (and the attention
    map of a cross-attention model, a second row) over the image: :mod:`mmai.figures.overlay`.

    Args:
        image, sal, attention: (X, Y, Z) on the input file's grid; maps normalised to [0, 1].
        affine: (4, 4) of the input file.
        window: ((low, high), how it was chosen) greyscale window; None: the volume's percentiles.
    """
    layers = [MapLayer("saliency", sal, "saliency |grad x input|\nscaled to its maximum (1 = peak), not drawn < 0.1")]
    if attention is not None:
        layers.append(MapLayer("attention", attention, "[CLS] attention over the image\nscaled to its maximum, "
                               "not drawn < 0.1", cmap="viridis", alpha=0.45))
    grey = {"window": window[0], "window_label": window[1]} if window is not None else {}
    write_overlay_png(path, image, affine, layers, title=title, **grey)
