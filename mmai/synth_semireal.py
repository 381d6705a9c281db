"""Semi-real survival cohort (``mmai synth --kind semireal``): a real table, two of its columns in the image only.

The table is the German Breast Cancer Study Group 2 trial (GBSG2, 686 patients; Schumacher et al.
1994; as shipped by lifelines, ``lifelines.datasets.load_gbsg2``): hormonal therapy, age,
menopausal status, tumour grade, progesterone and oestrogen receptors, recurrence-free survival
(days) and its event indicator. Two prognostic columns are REMOVED from the table and drawn into
each patient's CT instead:

- ``tsize`` (tumour size, 3-120 mm): one enhancing tumour (+95 HU) of that diameter in the breast;
- ``pnodes`` (positive lymph nodes, 1-51): that many enhancing nodules (+80 HU, 5-15 mm across)
  in the axillary fat (spilling over into the lateral breast when many do not fit there).

Each image is an axial CT of one breast and its axilla, HU, int16 NIfTI, anisotropic voxels
(:data:`SPACING` = 2 x 2 x 4 mm, :data:`SHAPE` = 96 x 96 x 36, i.e. 192 x 192 x 144 mm): air,
a body of subcutaneous fat (-100 HU) with smooth fibroglandular tissue (up to 0 HU) in the breast, the
pectoral muscle (+45 HU) and lung (-850 HU) behind it, tissue texture and Gaussian noise (12 HU).
The outcome is the REAL one: the image carries exactly the information the two removed columns
carried, so Cox PH on the full table is the reachable target and Cox PH on the two true values
alone is the image-only oracle.

Writes DIR/manifest.csv (``case_id``, ``patient_id``, ``image``, the table without tsize and
pnodes, ``time``, ``event``, ``split``; with ``mask=True`` also ``lesion_mask``: the tumour only,
nodes are never in a mask), clinical.csv, truth.csv (``tsize``, ``pnodes``, node diameters),
truth.json, images/<case>.nii.gz [, masks/<case>.nii.gz]. The split is fixed by the seed (or
``split_seed``): :data:`TEST_FRACTION` of the patients (219 of 686) are ``test``, the rest (467)
train + validation. :data:`VARIANTS` render the same patients as other cohorts would look
(contrast, noise, voxel size, node sizes and gaps, tumour shape, body size;
:class:`SemirealVariant`), for checking that what is measured from the images generalises.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from mmai.errors import ConfigError
from mmai.synth import centred_affine_ras, map_cases, soft_ball
from mmai.utils import atomic_write_json

SHAPE = (96, 96, 36)
SPACING = (2.0, 2.0, 4.0)
SPACING_DEFAULT = SPACING
TEXTURE_SD_HU = 8.0 * (2.0 * np.sqrt(np.pi)) ** -1.5  # white noise smoothed by a 1-voxel Gaussian, times 8
TEST_FRACTION = 0.32
TABLE_COLUMNS = ("horTh", "age", "menostat", "tgrade", "progrec", "estrec")
IMAGE_COLUMNS = ("tsize", "pnodes")
FAT_HU, GLAND_HU, MUSCLE_HU, LUNG_HU = -100.0, 0.0, 45.0, -850.0
TUMOUR_HU, NODE_HU = 95.0, 80.0
NODE_MM = (5.0, 15.0)
NOISE_HU = 12.0
FOV_MM = (192.0, 192.0, 144.0)


@dataclass(frozen=True)
class SemirealVariant:
    """How a semi-real cohort's scans look: the knobs along which real breast CT cohorts differ.

    The default reproduces the cohort of docs/benchmarks.md ("Semi-real cohort") voxel for voxel;
    :data:`VARIANTS` are the other cohorts the focal inventory must generalise to (measured by
    ``benchmarks/focal_variants.py``). The field of view stays :data:`FOV_MM`.

    Attributes:
        tumour_hu / node_hu: enhancement of the tumour / the nodes (HU; fat -100, gland 0, muscle +45).
        noise_hu: standard deviation of the white image noise (HU).
        spacing: voxel size (mm) along I, J, K; the grid covers :data:`FOV_MM`.
        node_mm: range of the node diameters (mm), drawn uniformly.
        node_gap_mm: the least gap between two nodes / a node and the tumour (mm); small gaps give
            matted, touching nodes.
        irregular: amplitude (0..1) of a lobulated tumour surface (0: a ball).
        body_scale: body width and depth relative to the default (0.8 thin .. 1.15 wide, clipped
            at the field of view).
    """

    tumour_hu: float = TUMOUR_HU
    node_hu: float = NODE_HU
    noise_hu: float = NOISE_HU
    spacing: tuple[float, float, float] = SPACING
    node_mm: tuple[float, float] = NODE_MM
    node_gap_mm: float = 4.0
    irregular: float = 0.0
    body_scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size covering :data:`FOV_MM` at :attr:`spacing`."""
        i, j, k = (int(round(f / s)) for f, s in zip(FOV_MM, self.spacing, strict=True))
        return i, j, k


DEFAULT_VARIANT = SemirealVariant()
#: the cohorts the inventory is checked on (``benchmarks/focal_variants.py``); names are CLI values
VARIANTS: dict[str, SemirealVariant] = {
    "default": DEFAULT_VARIANT,
    "low_contrast": SemirealVariant(tumour_hu=40.0, node_hu=40.0),
    "mid_contrast": SemirealVariant(tumour_hu=60.0, node_hu=55.0),
    "noisy": SemirealVariant(noise_hu=30.0),
    "thick_slices": SemirealVariant(spacing=(0.8, 0.8, 5.0)),
    "fine": SemirealVariant(spacing=(1.0, 1.0, 1.5)),
    "small_nodes": SemirealVariant(node_mm=(4.0, 8.0)),
    "large_nodes": SemirealVariant(node_mm=(10.0, 25.0)),
    "matted_nodes": SemirealVariant(node_gap_mm=1.0),
    "irregular": SemirealVariant(irregular=0.35),
    "small_body": SemirealVariant(body_scale=0.8),
    "large_body": SemirealVariant(body_scale=1.15),
    "hard": SemirealVariant(tumour_hu=50.0, node_hu=45.0, noise_hu=25.0, spacing=(0.8, 0.8, 5.0),
                            node_gap_mm=2.0, irregular=0.3),
}


def variant(name: str, **overrides: Any) -> SemirealVariant:
    """A named variant of :data:`VARIANTS` with field overrides; unknown names / fields are errors."""
    if name not in VARIANTS:
        raise ConfigError(f"semireal: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    fields = set(SemirealVariant.__dataclass_fields__)
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConfigError(f"semireal: unknown variant field(s) {bad}; allowed: {sorted(fields)}")
    return replace(VARIANTS[name], **overrides)


def load_table() -> pd.DataFrame:
    """The GBSG2 table (686 rows) as lifelines ships it."""
    from lifelines.datasets import load_gbsg2

    return load_gbsg2()


def affine_ras(var: SemirealVariant = DEFAULT_VARIANT) -> np.ndarray:
    """Voxel -> RAS mm of the semi-real phantom grid (:func:`mmai.synth.centred_affine_ras`)."""
    return centred_affine_ras(var.shape, var.spacing)


def _place(rng: np.random.Generator, radius: float, lo: np.ndarray, hi: np.ndarray,
           taken: list[tuple[np.ndarray, float]], gap: float, inside: Any, tries: int = 400) -> np.ndarray | None:
    """A centre in the box [lo, hi] (mm) whose ball keeps ``gap`` mm from every taken ball and
    satisfies ``inside(centre, radius)``; None when none was found."""
    for _ in range(tries):
        c = lo + (hi - lo) * rng.random(3)
        if not inside(c, radius):
            continue
        if all(np.linalg.norm(c - t) >= radius + r + gap for t, r in taken):
            return c
    return None


def make_semireal_phantom(rng: np.random.Generator, tsize_mm: float, pnodes: int, *, noise: bool = True,
                          var: SemirealVariant = DEFAULT_VARIANT) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One breast CT: (volume HU float32 (I, J, K) = ``var.shape``, tumour mask uint8 (I, J, K), info).

    ``info``: ``tumour_centre_mm`` (3,), ``node_centres_mm`` (pnodes, 3), ``node_diameters_mm``
    (pnodes,), in the phantom's centred LPS-like frame (x right -> left, y anterior -> posterior).
    Every node keeps ``var.node_gap_mm`` (default 4 mm) from the tumour and from every other node.
    The random draws come in a fixed order (anatomy, tumour, nodes, tumour shape, noise), so a seed
    gives the same phantom.
    """
    x, y, z = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(var.shape, var.spacing, strict=True))
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    vol, texture, body = _anatomy(rng, var, X, Y)
    r_t = tsize_mm / 2.0
    z_half = var.shape[2] * var.spacing[2] / 2
    a, b, yc, wall = body

    def in_breast(c: np.ndarray, r: float) -> bool:
        return bool((c[0] / (a - r - 4)) ** 2 + ((c[1] - yc) / (b - r - 4)) ** 2 <= 1.0 and c[1] + r < wall + 2)

    lo_t = np.array([-0.45 * a, yc - b, -z_half + r_t + 4])
    hi_t = np.array([0.2 * a, wall - r_t, z_half - r_t - 4])
    hi_t = np.maximum(hi_t, lo_t + 1e-3)
    centre = _place(rng, r_t, lo_t, hi_t, [], 0.0, in_breast)
    if centre is None:  # a very large tumour: as central as the breast allows
        centre = np.array([-0.1 * a, min(wall - r_t, yc - 0.3 * b), 0.0])
    nodes, diam = _place_nodes(rng, var, pnodes, body, z_half, (centre, r_t), tsize_mm)

    def ball(c: np.ndarray, r: float) -> np.ndarray:
        return soft_ball(np.sqrt((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2), r)

    f_t = _lobulated(rng, var.irregular, X, Y, Z, centre, r_t) if var.irregular > 0 else ball(centre, r_t)
    vol = (vol * (1 - f_t) + (var.tumour_hu + texture * 0.5) * f_t).astype(np.float32)
    for c, d in zip(nodes, diam, strict=True):
        f_n = ball(c, d / 2)
        vol = (vol * (1 - f_n) + var.node_hu * f_n).astype(np.float32)
    if noise:
        vol += rng.normal(0, var.noise_hu, var.shape).astype(np.float32)
    mask = (f_t >= 0.5).astype(np.uint8)
    info = {"tumour_centre_mm": centre.round(2).tolist(),
            "node_centres_mm": [c.round(2).tolist() for c in nodes],
            "node_diameters_mm": [round(float(d), 2) for d in diam]}
    return vol, mask, info


def _anatomy(rng: np.random.Generator, var: SemirealVariant, X: np.ndarray, Y: np.ndarray  # noqa: N803
             ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """The breast without lesions: (volume HU (I, J, K), the tissue texture added to it (I, J, K),
    (a, b, yc, wall): the body ellipse's half-axes and centre y and the pectoral muscle's anterior
    face, in mm). ``X``, ``Y``: the sparse mm grids of ``var``'s volume."""
    shape, spacing = var.shape, var.spacing
    a, b = rng.uniform(80, 90), rng.uniform(105, 115)  # body ellipse (x, y); its centre is posterior
    a, b = a * var.body_scale, b * var.body_scale
    yc = 30.0
    body = np.broadcast_to((X / a) ** 2 + ((Y - yc) / b) ** 2 <= 1.0, shape)
    wall = rng.uniform(45, 55)  # anterior face of the pectoral muscle (y, mm)
    thick = rng.uniform(12, 18)
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[body] = FAT_HU
    # glandular tissue: a smooth random field, thresholded, in the breast cone only
    sig = tuple(8.0 / s for s in spacing)  # 8 mm correlation (4, 4, 2 voxels on the default grid)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=sig)
    field /= field.std() + 1e-9
    cone = np.broadcast_to((np.abs(X) < 0.65 * a) & (wall - 8 > Y) & (yc - b + 12 < Y), shape)
    gland = np.clip(field - 0.3, 0.0, 0.5) / 0.5  # (0..1) partial gland fraction
    vol = np.where(body & cone, vol + (GLAND_HU - FAT_HU) * gland, vol)
    muscle = body & np.broadcast_to((wall <= Y) & (wall + thick > Y), shape)
    vol[muscle] = MUSCLE_HU
    vol[body & np.broadcast_to(wall + thick <= Y, shape)] = LUNG_HU
    # tissue texture (soft, correlated) in the body
    if spacing == SPACING_DEFAULT:
        texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.0) * 8.0
    else:  # the default's texture in mm (2 x 2 x 4 mm correlation, ~1.2 HU) on another grid
        texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=tuple(d / s for d, s in
                                                                            zip(SPACING_DEFAULT, spacing, strict=True)))
        texture *= TEXTURE_SD_HU / (float(texture.std()) + 1e-9)
    vol = np.where(body, vol + texture, vol).astype(np.float32)
    return vol, texture, (a, b, yc, wall)


def _place_nodes(rng: np.random.Generator, var: SemirealVariant, pnodes: int, body: tuple[float, float, float, float],
                 z_half: float, tumour: tuple[np.ndarray, float], tsize_mm: float) -> tuple[list[np.ndarray], np.ndarray]:
    """``pnodes`` lymph nodes (centres (3,) mm, diameters (pnodes,) mm): the axilla first, then the rest
    of the breast, each at ``var.node_gap_mm`` from the tumour and the other nodes, shrunk towards
    ``var.node_mm[0]`` where it does not fit; an error when one cannot be placed at all."""
    a, b, yc, wall = body
    taken: list[tuple[np.ndarray, float]] = [tumour]
    diam = rng.uniform(*var.node_mm, pnodes)
    nodes: list[np.ndarray] = []
    x_lat = a - 2  # the axilla: lateral (patient's left = +x), at and in front of the chest wall, cranial

    def in_body(c: np.ndarray, r: float) -> bool:
        return bool((c[0] / (a - r - 3)) ** 2 + ((c[1] - yc) / (b - r - 3)) ** 2 <= 1.0 and c[1] + r < wall - 1
                    and abs(c[2]) + r < z_half - 2)

    regions = [(np.array([0.35 * a, wall - 55, -10.0]), np.array([x_lat, wall - 2, z_half])),
               (np.array([0.0, yc - b, -z_half]), np.array([x_lat, wall - 2, z_half])),
               (np.array([-x_lat, yc - b, -z_half]), np.array([x_lat, wall - 2, z_half]))]
    for k in range(pnodes):
        c = None
        for d in (diam[k], max(var.node_mm[0], diam[k] * 0.7), var.node_mm[0]):
            for lo, hi in regions:
                c = _place(rng, d / 2, lo, hi, taken, var.node_gap_mm, in_body, tries=300)
                if c is not None:
                    diam[k] = d
                    break
            if c is not None:
                break
        if c is None:
            raise ConfigError(f"semireal phantom: cannot place lymph node {k + 1} of {pnodes} "
                              f"(tumour {tsize_mm:g} mm)")
        taken.append((c, diam[k] / 2))
        nodes.append(c)
    return nodes, diam


def _lobulated(rng: np.random.Generator, irregular: float, X: np.ndarray, Y: np.ndarray, Z: np.ndarray,  # noqa: N803
               centre: np.ndarray, r_t: float) -> np.ndarray:
    """The tumour's fraction (0..1) per voxel for a lobulated tumour: its radius varies with direction
    by ``irregular`` times a smooth random field (roughly zero mean: the volume stays ~ the ball's)."""
    dist = np.sqrt((X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2)
    lobes = rng.normal(size=(6, 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    w = rng.uniform(-1.0, 1.0, 6)
    u = [(X - centre[0]) / (dist + 1e-6), (Y - centre[1]) / (dist + 1e-6), (Z - centre[2]) / (dist + 1e-6)]
    g = sum(wk * (lk[0] * u[0] + lk[1] * u[1] + lk[2] * u[2]) ** 2 for wk, lk in zip(w, lobes, strict=True))
    g = g - float(np.mean(w)) / 3.0
    r_dir = r_t * (1.0 + irregular * np.clip(g, -1.0, 1.0))
    return np.clip((r_dir - dist) / 1.0 + 0.5, 0.0, 1.0)


def sample_semireal_table(seed: int = 0, *, split_seed: int | None = None) -> pd.DataFrame:
    """The GBSG2 rows with case ids, the fixed split and the two image-only columns kept aside.

    ``split_seed`` (None: ``seed``) draws the split: :data:`TEST_FRACTION` of the rows are test."""
    t = load_table().reset_index(drop=True)
    n = len(t)
    rng = np.random.default_rng([seed if split_seed is None else split_seed, 16])
    df = pd.DataFrame({"case_id": [f"gbsg{i:04d}" for i in range(n)], "patient_id": [f"G{i:04d}" for i in range(n)]})
    for col in TABLE_COLUMNS:
        df[col] = t[col].to_numpy()
    df["time"] = t["time"].astype(float).to_numpy()
    df["event"] = t["cens"].astype(int).to_numpy()
    df["tsize"] = t["tsize"].astype(float).to_numpy()
    df["pnodes"] = t["pnodes"].astype(int).to_numpy()
    df["split"] = "train"
    df.loc[rng.permutation(n)[: int(TEST_FRACTION * n)], "split"] = "test"
    return df


def _semireal_case(job: tuple[Path, int, str, float, int, int, bool, SemirealVariant]
                   ) -> tuple[str, str, list[float]]:
    out, i, case_id, tsize, pnodes, seed, with_mask, var = job
    vol, mask, info = make_semireal_phantom(np.random.default_rng([seed, 3, i]), tsize, pnodes, var=var)
    aff = affine_ras(var)
    nib.save(nib.Nifti1Image(np.round(vol).astype(np.int16), aff), str(out / "images" / f"{case_id}.nii.gz"))
    mask_path = ""
    if with_mask:
        nib.save(nib.Nifti1Image(mask, aff), str(out / "masks" / f"{case_id}.nii.gz"))
        mask_path = f"masks/{case_id}.nii.gz"
    return f"images/{case_id}.nii.gz", mask_path, info["node_diameters_mm"]


def write_semireal_cohort(out_dir: Path, *, seed: int = 0, n: int | None = None, mask: bool = False,
                          progress: bool = True, workers: int = 1, var: SemirealVariant = DEFAULT_VARIANT,
                          split_seed: int | None = None) -> dict[str, Any]:
    """Write the semi-real GBSG2 cohort (module docstring); returns truth.json's contents.

    Args:
        out_dir: output folder.
        seed: phantom anatomy, placements and the split.
        n: first ``n`` patients only (tests; None = all 686).
        mask: also write the tumour mask (``lesion_mask`` column); the default is none, as a
            cohort without segmentations has none (nodes are never in a mask).
        workers: processes writing images (the files do not depend on it).
        var: how the scans look (:class:`SemirealVariant`; the default: the documented cohort).
        split_seed: the test / train split's own seed (None: ``seed``, the documented split).
    """
    if workers < 1:
        raise ConfigError(f"synth: --workers must be at least 1, got {workers}")
    df = sample_semireal_table(seed, split_seed=split_seed)
    if n is not None:
        if n < 4:
            raise ConfigError(f"synth: --n must be at least 4, got {n}")
        df = df.iloc[:n].reset_index(drop=True)
    out_dir = Path(out_dir)
    for sub in ("images", *(("masks",) if mask else ())):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, i, r.case_id, float(r.tsize), int(r.pnodes), seed, mask, var)
            for i, r in enumerate(df.itertuples())]
    rows = map_cases(_semireal_case, jobs, workers=workers, desc="synth semireal", progress=progress)
    df["image"] = [r[0] for r in rows]
    cols = ["case_id", "patient_id", "image"]
    if mask:
        df["lesion_mask"] = [r[1] for r in rows]
        cols.append("lesion_mask")
    df[["case_id", "patient_id", *TABLE_COLUMNS]].to_csv(out_dir / "clinical.csv", index=False)
    df[[*cols, *TABLE_COLUMNS, "time", "event", "split"]].to_csv(out_dir / "manifest.csv", index=False)
    truth = df[["case_id", "tsize", "pnodes"]].copy()
    truth["node_diameters_mm"] = [";".join(f"{d:g}" for d in r[2]) for r in rows]
    truth.to_csv(out_dir / "truth.csv", index=False)
    info = {"task": "survival", "kind": "semireal", "metric": "c_index", "n": len(df), "seed": seed,
            "n_test": int((df["split"] == "test").sum()), "table": "GBSG2 (lifelines.datasets.load_gbsg2)",
            "image_only_columns": list(IMAGE_COLUMNS), "mask": mask, "shape": list(var.shape),
            "spacing_mm": list(var.spacing), "tumour_hu": var.tumour_hu, "node_hu": var.node_hu,
            "node_mm": list(var.node_mm), "variant": {k: (list(v) if isinstance(v, tuple) else v)
                                                      for k, v in var.__dict__.items()},
            "split_seed": seed if split_seed is None else split_seed}
    atomic_write_json(out_dir / "truth.json", info)
    return info
