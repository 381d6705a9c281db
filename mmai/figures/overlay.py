"""Maps drawn over anatomy, the way nilearn's ``plot_stat_map`` draws them, in radiological convention.

Every overlay is drawn the same way whatever the file's voxel order (LPS DICOM, RAS NIfTI, flipped
axes): the volume and its maps are first reoriented from the affine to the closest canonical (RAS+)
voxel order (:func:`canonical`), then three orthogonal planes through one point are drawn with

- radiological convention: the patient's left on the image's right in the axial and coronal
  panels (as if facing the patient / looking up from the feet); anterior on the left in the
  sagittal panel; superior up;
- the axes in millimetres, so the aspect comes from the voxel spacing (a 0.7 x 0.7 x 5 mm sphere is
  drawn round);
- orientation letters (R/L, A/P, S/I) on the four sides of each panel;
- the cut positions in patient millimetres (RAS+, nibabel's world coordinates) under each panel;
- ONE greyscale window shared by all panels, stated in the footer;
- one labelled colour bar per map row saying how the map was scaled and where it is transparent;
- a title (model, probability, label) given by the caller.

An oblique scan is drawn along its nearest patient axes without resampling (as most viewers'
"native" mode does); the mm positions are those of the cut voxel's centre.

Each map (:class:`MapLayer`, e.g. saliency, attention) gets its own row of three panels.
matplotlib is driven through a ``Figure`` with the Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mmai.errors import MmaiError
from mmai.utils import atomic_path

log = logging.getLogger(__name__)

#: (panel name, axis cut through, (horizontal axis, vertical axis), letters left, right, top, bottom,
#: world coordinate name). Horizontal axes are drawn decreasing (xlim reversed): patient right
#: (+x) on the image's left for axial/coronal, anterior (+y) on the image's left for sagittal.
PANELS = (
    ("axial", 2, (0, 1), ("R", "L", "A", "P"), "z"),
    ("coronal", 1, (0, 2), ("R", "L", "S", "I"), "y"),
    ("sagittal", 0, (1, 2), ("A", "P", "S", "I"), "x"),
)


@dataclass(frozen=True)
class MapLayer:
    """One map drawn over the image: its own row of panels and its own colour bar.

    Attributes:
        name: short name ("saliency", "attention"); panels and colour bar axes are labelled with it.
        data: (X, Y, Z) map on the image's grid (same shape and affine as the image).
        label: colour bar label saying what the map is and how it was scaled.
        cmap: matplotlib colour map.
        vmin, vmax: colour range; values below ``threshold`` are transparent.
        threshold: values below it are not drawn (the anatomy shows through).
        alpha: opacity of the map where it is drawn.
    """

    name: str
    data: np.ndarray
    label: str
    cmap: str = "inferno"
    vmin: float = 0.0
    vmax: float = 1.0
    threshold: float = 0.1
    alpha: float = 0.7


def canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip the voxel axes of ``arr`` (X, Y, Z) to the closest RAS+ order; returns (arr, affine).

    The world positions of every voxel are unchanged (nibabel's ``as_closest_canonical`` on arrays).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if arr.ndim != 3 or affine.shape != (4, 4):
        raise MmaiError(f"overlay: expected a 3-D volume and a 4x4 affine, got shapes {arr.shape} and {affine.shape}")
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(arr, ornt)  # a view (flips / transposes), no copy
    new_aff = affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)
    return out, new_aff


def grey_window(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """One greyscale window for the whole volume: the given percentiles of its finite voxels
    (of every voxel up to about 2 million, else of a regular subsample of them)."""
    step = max(1, int(np.ceil((image.size / 2e6) ** (1 / 3))))
    sample = image[::step, ::step, ::step] if image.ndim == 3 else image
    vals = sample[np.isfinite(sample)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, percentiles))
    if hi <= lo:
        lo, hi = float(vals.min()), float(vals.max())
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


def pipeline_window(image: np.ndarray, intensity: Any) -> tuple[tuple[float, float], str] | None:
    """The pipeline's CT window (``image.intensity`` kind ``window``) when ``image`` is in raw units
    (values beyond the window's output range ``[b_min, b_max]``), with the footer's words; else None."""
    if intensity is None or getattr(intensity, "kind", None) != "window":
        return None
    vals = image[np.isfinite(image)]
    if vals.size == 0 or float(np.percentile(vals, 99.5)) <= float(intensity.b_max) + 1.0:
        return None  # a preprocessed volume: already scaled to [b_min, b_max]
    return (float(intensity.a_min), float(intensity.a_max)), "the pipeline's intensity window, what the model saw"


def _peak(maps: Sequence[np.ndarray], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The first non-empty map's maximum (voxel index), else the volume's centre."""
    for m in maps:
        d = m if np.isfinite(m.max()) else np.nan_to_num(m)
        if d.max() > 0:
            return tuple(int(i) for i in np.unravel_index(int(np.argmax(d)), d.shape))  # type: ignore[return-value]
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def _edges(aff: np.ndarray, shape: tuple[int, ...]) -> list[tuple[float, float]]:
    """Per canonical axis, the world (mm) extent of the voxel edges along it (low, high)."""
    sp = nib.affines.voxel_sizes(aff)
    out = []
    for a in range(3):
        start = float(aff[a, 3])  # world coordinate of voxel 0's centre along axis a
        out.append((start - sp[a] / 2, start + (shape[a] - 0.5) * sp[a]))
    return out


def overlay_figure(image: np.ndarray, affine: np.ndarray, layers: Sequence[MapLayer], *, title: str = "",
                   cut: tuple[int, int, int] | None = None, window: tuple[float, float] | None = None,
                   window_label: str | None = None, row_height: float = 2.8, dpi: int = 90) -> Any:
    """Three orthogonal planes of ``image`` with each layer over it, in radiological convention.

    Args:
        image: (X, Y, Z) volume in the file's own voxel order.
        affine: (4, 4) voxel -> world (RAS+ mm) of ``image`` and of every layer.
        layers: maps to draw, one row each (at least one; with none the anatomy alone is drawn).
        title: figure title (model, probability, label).
        cut: the point the planes go through, as an index of the CANONICAL (RAS+) grid; default the
            first layer's peak (the volume's centre when every layer is empty).
        window: greyscale (low, high); default the 0.5-99.5th percentiles of the volume.
        window_label: how ``window`` was chosen (written in the footer).
        row_height: inches per row of panels.
        dpi: resolution of the figure.

    Returns:
        A matplotlib ``Figure`` (Agg canvas attached). Panel axes are labelled ``"<plane>:<layer>"``
        and colour bar axes ``"colorbar:<layer>"`` (``Axes.get_label()``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img, aff = canonical(np.asarray(image, dtype=np.float32), affine)
    maps = []
    for lay in layers:
        if lay.data.shape != image.shape:
            raise MmaiError(f"overlay: map {lay.name!r} has shape {lay.data.shape}, the image {image.shape}")
        maps.append((lay, canonical(np.asarray(lay.data, dtype=np.float32), affine)[0]))
    if cut is None:
        cut = _peak([d for _, d in maps], img.shape)
    cut = tuple(int(np.clip(c, 0, s - 1)) for c, s in zip(cut, img.shape, strict=True))  # type: ignore[assignment]
    if window is None:
        window = grey_window(img)
        window_label = window_label or "0.5-99.5th percentile of the volume"
    world = aff @ np.array([*cut, 1.0])
    edges = _edges(aff, img.shape)
    spacing = nib.affines.voxel_sizes(aff)

    widths = [edges[h][1] - edges[h][0] for _, _, (h, _), _, _ in PANELS]
    heights = [edges[v][1] - edges[v][0] for _, _, (_, v), _, _ in PANELS]
    scale = row_height / max(heights)
    panel_w = [max(w * scale, 0.8) for w in widths]
    rows: list[tuple[MapLayer | None, Any]] = [(lyr, d) for lyr, d in maps] or [(None, None)]
    fig = Figure(figsize=(min(sum(panel_w) + 1.3, 16.0), row_height * len(rows) + 1.0), dpi=dpi,
                 facecolor="black", layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), 4, width_ratios=[*panel_w, 0.12])
    for r, (layer, data) in enumerate(rows):
        name = layer.name if layer is not None else "image"
        for p, panel in enumerate(PANELS):
            ax = fig.add_subplot(grid[r, p], label=f"{panel[0]}:{name}")
            _draw_panel(ax, panel, img, cut, world, edges, window, layer, data, show_empty=p == 1)
        if layer is not None:
            _colorbar(fig, fig.add_subplot(grid[r, 3], label=f"colorbar:{name}"), layer)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    sp = " x ".join(f"{s:.3g}" for s in spacing)
    fig.supxlabel(f"grey: one window for all panels, [{window[0]:.4g}, {window[1]:.4g}] ({window_label or 'given'})\n"
                  f"radiological convention (patient left on image right); positions in patient mm (RAS+); "
                  f"voxels {sp} mm", color="#cccccc", fontsize=7)
    return fig


def _draw_panel(ax: Any, panel: tuple[Any, ...], img: np.ndarray, cut: tuple[int, int, int], world: np.ndarray,
                edges: list[tuple[float, float]], window: tuple[float, float], layer: MapLayer | None,
                data: np.ndarray | None, *, show_empty: bool) -> None:
    """One plane of the canonical volume (and of ``layer``'s map) through ``cut``, drawn in mm on ``ax``."""
    from matplotlib.patheffects import withStroke

    plane, axis, (h, v), letters, coord = panel
    take: list[Any] = [slice(None)] * 3
    take[axis] = cut[axis]
    extent = (*edges[h], *edges[v])
    ax.imshow(img[tuple(take)].T, cmap="gray", origin="lower", extent=extent, vmin=window[0],
              vmax=window[1], interpolation="nearest")
    if layer is not None and data is not None:
        m = data[tuple(take)].T
        ax.imshow(np.ma.masked_where(~(m >= layer.threshold), m), cmap=layer.cmap, origin="lower",
                  extent=extent, vmin=layer.vmin, vmax=layer.vmax, alpha=layer.alpha, interpolation="nearest")
    ax.axvline(world[h], color="#5fb4ff", lw=0.6, alpha=0.6)  # crosshair: the other planes' cuts
    ax.axhline(world[v], color="#5fb4ff", lw=0.6, alpha=0.6)
    ax.set_xlim(edges[h][1], edges[h][0])  # decreasing: R (axial/coronal) or A (sagittal) on the left
    ax.set_ylim(*edges[v])
    ax.set_aspect("equal")  # axes in mm: the aspect is the voxel spacing's
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    kw: dict[str, Any] = {"transform": ax.transAxes, "color": "white", "fontsize": 11, "fontweight": "bold",
                          "path_effects": [withStroke(linewidth=2.5, foreground="black")]}  # legible on any grey
    ax.text(0.02, 0.5, letters[0], ha="left", va="center", **kw)
    ax.text(0.98, 0.5, letters[1], ha="right", va="center", **kw)
    ax.text(0.5, 0.98, letters[2], ha="center", va="top", **kw)
    ax.text(0.5, 0.02, letters[3], ha="center", va="bottom", **kw)
    ax.set_title(f"{plane}  {coord} = {world[axis]:+.1f} mm", color="white", fontsize=9)
    if show_empty and layer is not None and data is not None \
            and not np.nanmax(data, initial=-np.inf) >= layer.threshold:
        ax.text(0.5, 0.3, f"{layer.name}: nothing >= {layer.threshold:g} anywhere\n(max {np.nanmax(data, initial=0):.3g})",
                ha="center", va="center", transform=ax.transAxes, color="#ffcc66", fontsize=8)


def _colorbar(fig: Any, cax: Any, layer: MapLayer) -> None:
    """A colour bar for ``layer`` on ``cax``, labelled with how its map was scaled."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cb = fig.colorbar(ScalarMappable(norm=Normalize(layer.vmin, layer.vmax), cmap=layer.cmap), cax=cax)
    cb.set_label(layer.label, color="white", fontsize=8)
    cb.ax.tick_params(colors="white", labelsize=7)
    cb.outline.set_edgecolor("white")


def figure_rgb(fig: Any) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_overlay_png(path: str | os.PathLike, image: np.ndarray, affine: np.ndarray, layers: Sequence[MapLayer],
                      **kw: Any) -> Path:
    """:func:`overlay_figure` written as a PNG atomically (temp file + rename); returns the path."""
    path = Path(path)
    fig = overlay_figure(image, affine, layers, **kw)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    log.debug("wrote %s", path)
    return path


def prediction_title(case_id: str, model_id: str, kind: str, classes: Sequence[str], values: Any,
                     true_label: Any = None) -> str:
    """The overlay's title: case, model, and the prediction in the words of predictions.csv.

    Args:
        values: (Q,) one case's averaged prediction quantities (:meth:`RunSpec.predictions` row): class
            probabilities (K,), the regression value (1,), or log-risk then survival per horizon.
        model_id: the run's model id ("" leaves the model out).
        true_label: the manifest's target of the case when known (class or value; not shown for survival).
    """
    parts = [f"case {case_id}"] + ([f"model {model_id}"] if model_id else [])
    v = [float(x) for x in values]
    if kind in ("binary", "multiclass") and len(classes) == len(v) and v:
        k = int(np.argmax(v))
        shown = 1 if kind == "binary" else k
        parts.append(f"P({classes[shown]}) = {v[shown]:.3f}, predicted {classes[k]}")
    elif kind == "regression" and v:
        parts.append(f"predicted {v[0]:.4g}")
    elif kind == "survival" and v:
        parts.append(f"log-risk {v[0]:+.3f}")
    if true_label is not None and str(true_label) not in ("", "nan", "None") and kind != "survival":
        parts.append(f"label {true_label}" if kind != "regression" else f"true value {true_label}")
    return " | ".join(parts)
