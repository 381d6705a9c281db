"""Full-resolution synthetic cohort (``mmai synth --kind nodule``): a feature seen only at 2 mm.

Each patient gets a chest-like CT at 2 mm (128 x 112 x 96 voxels, 256 x 224 x 192 mm, HU, int16
NIfTI): soft-tissue body ellipse, two lungs, heart, spine, a few vessels, Gaussian noise, and one
small lung nodule (radius 5-8 mm) with a lesion mask (NIfTI, same grid). Half of the nodules have
a central calcification (a core of 0.4 x the radius at 700 HU); the rim of a calcified nodule is
darker so that both classes have the SAME lesion volume and the SAME mean lesion intensity (so
the same integral): on a 9 mm grid (the demo's) the two look alike, at 2 mm the core is plain.

Outcome (binary):

    s      = +1 without calcification, -1 with it (calcification: benign pattern)
    z_clin = 0.8 age_z + 0.8 [current] + 0.4 [former] + 0.7 log_crp_z + 0.5 diabetes   (as mmai synth)
    logit  = -0.2 + 1.5 s + 1.0 z_clin

Writes DIR/manifest.csv (``image``, ``lesion_mask``, ``lesion_x/y/z`` RAS mm, clinical columns,
``label``, ``split``), clinical.csv, truth.csv (``calcified``, true probability), truth.json
(Bayes-optimal AUROC overall and on the test split), images/<case>.nii.gz, masks/<case>.nii.gz.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from mmai.errors import ConfigError
from mmai.synth import (
    CLINICAL_COLUMNS,
    bayes_metric,
    centred_affine_ras,
    clinical_score,
    map_cases,
    sample_clinical,
    soft_ball,
)
from mmai.utils import atomic_write_json

SHAPE = (128, 112, 96)
SPACING = (2.0, 2.0, 2.0)
R_MIN, R_MAX = 5.0, 8.0  # nodule radius, mm
CORE_FRACTION = 0.4  # calcified core radius / nodule radius
MEAN_HU, CORE_HU = 60.0, 700.0
NOISE_HU = 20.0


def true_logit(calcified: np.ndarray, z_clin: np.ndarray) -> np.ndarray:
    """The generating log-odds."""
    s = np.where(np.asarray(calcified, bool), -1.0, 1.0)
    return -0.2 + 1.5 * s + 1.0 * np.asarray(z_clin, float)


def affine_ras() -> np.ndarray:
    """Voxel -> RAS mm of the nodule phantom grid (:func:`mmai.synth.centred_affine_ras`)."""
    return centred_affine_ras(SHAPE, SPACING)


def make_nodule_phantom(rng: np.random.Generator, radius_mm: float, calcified: bool,
                        noise: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom: (volume HU float32 (I, J, K), mask uint8 (I, J, K), lesion centre (3,) in LPS mm).

    The random draws do not depend on ``calcified`` (the same seed gives the same anatomy and
    lesion for both classes), so a pair differs only in the lesion's inner pattern.
    """
    x, y, z = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE, SPACING, strict=True))
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    vol = np.full(SHAPE, -1000.0, dtype=np.float32)
    a, b = rng.uniform(108, 118), rng.uniform(80, 88)
    vol[np.broadcast_to((X / a) ** 2 + (Y / b) ** 2 <= 1.0, SHAPE)] = 40.0 + rng.normal(0, 5)
    la, lb, lc = a * 0.33, b * 0.6, rng.uniform(75, 85)
    lungs = []
    for side in (-1, 1):
        cx = side * a * 0.45
        lung = ((X - cx) / la) ** 2 + ((Y + 5) / lb) ** 2 + (Z / lc) ** 2 <= 1.0
        vol[np.broadcast_to(lung, SHAPE)] = -850.0
        lungs.append(cx)
    heart = ((X - 10) / (a * 0.22)) ** 2 + ((Y + 12) / (b * 0.35)) ** 2 + ((Z + 15) / 40) ** 2 <= 1.0
    vol[np.broadcast_to(heart, SHAPE)] = 45.0
    vol[np.broadcast_to((X / 12) ** 2 + ((Y - b * 0.72) / 12) ** 2 <= 1.0, SHAPE)] = 700.0
    cx = lungs[int(rng.integers(2))]
    margin = radius_mm + 6.0
    centre = np.array([cx, -5.0, 0.0])
    for _ in range(200):
        c = np.array([cx + rng.uniform(-0.6, 0.6) * la, -5 + rng.uniform(-0.6, 0.6) * lb, rng.uniform(-0.6, 0.6) * lc])
        if (((c[0] - cx) / (la - margin)) ** 2 + ((c[1] + 5) / (lb - margin)) ** 2 + (c[2] / (lc - margin)) ** 2) <= 1:
            centre = c
            break
    for _ in range(int(rng.integers(3, 7))):  # vessels: thin tubes along z, away from the nodule
        vx, vy = cx + rng.uniform(-0.7, 0.7) * la, -5 + rng.uniform(-0.7, 0.7) * lb
        if np.hypot(vx - centre[0], vy - centre[1]) < radius_mm + 5:
            continue
        tube = soft_ball(np.sqrt((X - vx) ** 2 + (Y - vy) ** 2), rng.uniform(1.0, 2.0))  # (I, J, 1)
        in_lung = vol == -850.0
        vol = np.where((tube > 0) & in_lung, vol * (1 - tube) + 40.0 * tube, vol).astype(np.float32)
    dist = np.sqrt((X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2)
    f_les = soft_ball(dist, radius_mm)
    lesion = np.full(SHAPE, MEAN_HU, dtype=np.float64)
    if calcified:  # rim darker so that the mean over the lesion (weighted by occupancy) stays MEAN_HU
        f_core = soft_ball(dist, CORE_FRACTION * radius_mm)
        q = float(f_core.sum() / f_les.sum())
        rim = (MEAN_HU - CORE_HU * q) / (1.0 - q)
        lesion = rim + (CORE_HU - rim) * f_core
    vol = (vol * (1 - f_les) + lesion * f_les).astype(np.float32)
    if noise:
        vol += rng.normal(0, NOISE_HU, SHAPE).astype(np.float32)
    mask = (f_les >= 0.5).astype(np.uint8)
    return vol, mask, centre


def sample_nodule_cohort(n: int, seed: int, missing_rate: float = 0.10, test_fraction: float = 0.25) -> pd.DataFrame:
    """The cohort table (no images): clinical values (with missing cells), calcification, outcome, truth."""
    rng = np.random.default_rng([seed, 7])
    age, sex, smoking, diabetes, crp, bmi = sample_clinical(rng, n)
    radius = rng.uniform(R_MIN, R_MAX, n)
    calcified = rng.random(n) < 0.5
    lin = true_logit(calcified, clinical_score(age, smoking, crp, diabetes))
    p = 1.0 / (1.0 + np.exp(-lin))
    df = pd.DataFrame({
        "case_id": [f"nod{i:04d}" for i in range(n)], "patient_id": [f"N{i:04d}" for i in range(n)],
        "age": age, "sex": sex, "smoking": smoking, "diabetes": diabetes, "crp": crp, "bmi": bmi,
        "lesion_radius_mm": radius.round(3), "calcified": calcified.astype(int), "true_linear_predictor": lin,
        "true_probability": p, "label": (rng.random(n) < p).astype(int)})
    for col in CLINICAL_COLUMNS:
        miss = rng.random(n) < missing_rate
        df[col] = df[col].astype(object)
        df.loc[miss, col] = None
    df["split"] = "train"
    df.loc[rng.permutation(n)[: int(round(test_fraction * n))], "split"] = "test"
    return df


def _nodule_case(job: tuple[Path, int, str, float, bool, int]) -> tuple[str, str, list[float]]:
    out, i, case_id, radius, calcified, seed = job
    vol, mask, centre_lps = make_nodule_phantom(np.random.default_rng([seed, 2, i]), radius, calcified)
    aff = affine_ras()
    nib.save(nib.Nifti1Image(np.round(vol).astype(np.int16), aff), str(out / "images" / f"{case_id}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, aff), str(out / "masks" / f"{case_id}.nii.gz"))
    centre_ras = [-centre_lps[0], -centre_lps[1], centre_lps[2]]
    return f"images/{case_id}.nii.gz", f"masks/{case_id}.nii.gz", [round(float(c), 3) for c in centre_ras]


def write_nodule_cohort(out_dir: Path, *, n: int = 300, seed: int = 0, progress: bool = True,
                        workers: int = 1) -> dict[str, Any]:
    """Write the nodule cohort (see module docstring); returns truth.json's contents."""
    if n < 4:
        raise ConfigError(f"synth: --n must be at least 4, got {n}")
    if workers < 1:
        raise ConfigError(f"synth: --workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    for sub in ("images", "masks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    df = sample_nodule_cohort(n, seed)
    jobs = [(out_dir, i, r.case_id, float(r.lesion_radius_mm), bool(r.calcified), seed)
            for i, r in enumerate(df.itertuples(index=False))]
    rows = map_cases(_nodule_case, jobs, workers=workers, desc="synth nodules", progress=progress)
    df["image"] = [r[0] for r in rows]
    df["lesion_mask"] = [r[1] for r in rows]
    for k, name in enumerate(("lesion_x", "lesion_y", "lesion_z")):
        df[name] = [r[2][k] for r in rows]
    df[["case_id", "patient_id", *CLINICAL_COLUMNS]].to_csv(out_dir / "clinical.csv", index=False)
    df[["case_id", "patient_id", "image", "lesion_mask", "lesion_x", "lesion_y", "lesion_z", *CLINICAL_COLUMNS,
        "label", "split"]].to_csv(out_dir / "manifest.csv", index=False)
    df[["case_id", "lesion_radius_mm", "calcified", "true_linear_predictor", "true_probability"]].to_csv(
        out_dir / "truth.csv", index=False)
    info = {"task": "binary", "kind": "nodule", "metric": "auroc", "n": n, "seed": seed,
            "bayes": bayes_metric(df, "binary"), "bayes_test": bayes_metric(df[df["split"] == "test"], "binary"),
            "shape": list(SHAPE), "spacing_mm": list(SPACING),
            "model": "logit = -0.2 + 1.5 s + 1.0 z_clin, s = -1 calcified core / +1 none (same volume and mean HU)"}
    atomic_write_json(out_dir / "truth.json", info)
    return info
