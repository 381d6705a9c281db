"""Synthetic multimodal cohort with known ground truth (the demo's data).

Each patient gets a chest-like CT phantom (air, soft-tissue body, two lungs, heart, spine bone,
Gaussian noise) with one soft-tissue lesion in a lung, written as a real DICOM series (or NIfTI),
and a row of clinical data: age, sex, smoking (never/former/current), diabetes, CRP (log-normal),
BMI (no effect), with about 10% of the cells missing at random.

The outcome depends on both modalities:

    z_img  = standardised lesion volume (4/3 pi r^3, uniform on [2, 40] mL)   (image only)
    z_clin = 0.8 age_z + 0.8 [current] + 0.4 [former] + 0.7 log_crp_z + 0.5 diabetes
    logit  = -0.6 + 1.8 z_img + 2.0 z_clin + 0.9 z_img [current]  (interaction)

so neither modality alone reaches the fusion optimum. ``truth.csv`` holds each case's true
probability (binary) or true log-hazard (survival); ``truth.json`` the Bayes-optimal AUROC
(or C-index) of that truth on the realised outcomes, overall and on the test split.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mmai.errors import ConfigError
from mmai.utils import atomic_write_json

log = logging.getLogger(__name__)

#: Geometry of the written CT series (i, j, k): 4 mm pixels, 5 mm slices.
SHAPE = (80, 80, 40)
SPACING = (4.0, 4.0, 5.0)
SMOKING = ("never", "former", "current")
CLINICAL_COLUMNS = ("age", "sex", "smoking", "diabetes", "crp", "bmi")
V_MIN, V_MAX = 2000.0, 40000.0  # lesion volume, mm^3 (radius 7.8 to 21.2 mm)
LESION_HU = 250.0  # an enhancing nodule: brighter than soft tissue, darker than bone


@dataclass(frozen=True)
class SynthSpec:
    """What to generate.

    Attributes:
        n: number of patients (one study each).
        task: ``binary`` (label) or ``survival`` (time, event).
        seed: random seed; the same spec always gives the same cohort.
        fmt: ``dicom`` (one CT series folder per case) or ``nifti``.
        missing_rate: fraction of clinical cells blanked at random.
        test_fraction: fraction of patients in the held-out ``split == test``.
    """

    n: int = 200
    task: str = "binary"
    seed: int = 0
    fmt: str = "dicom"
    missing_rate: float = 0.10
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.n < 4:
            raise ConfigError(f"synth: --n must be at least 4, got {self.n}")
        if self.task not in ("binary", "survival"):
            raise ConfigError(f"synth: task {self.task!r} is not allowed; choose binary or survival")
        if self.fmt not in ("dicom", "nifti"):
            raise ConfigError(f"synth: format {self.fmt!r} is not allowed; choose dicom or nifti")
        if not 0.0 <= self.missing_rate < 1.0:
            raise ConfigError(f"synth: missing_rate must be in [0, 1), got {self.missing_rate}")


# ----------------------------------------------------------------------------- outcome model


def centred_affine_ras(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel -> RAS mm (4, 4) of a phantom grid centred on the origin (i: right -> left, j: anterior
    -> posterior, k: feet -> head), as the NIfTI phantoms of ``mmai synth`` are written."""
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [(shape[0] - 1) / 2 * spacing[0], (shape[1] - 1) / 2 * spacing[1], -(shape[2] - 1) / 2 * spacing[2]]
    return aff


def soft_ball(dist: np.ndarray, radius: float) -> np.ndarray:
    """Partial-volume occupancy of a ball from the distance to its centre (1 mm soft edge)."""
    return np.clip((radius - dist) / 1.0 + 0.5, 0.0, 1.0)


def map_cases(fn: Any, jobs: list[Any], *, workers: int, desc: str, progress: bool, chunksize: int = 8) -> list[Any]:
    """``[fn(job) for job in jobs]`` in order, in ``workers`` processes when > 1, with a progress bar."""
    out: list[Any] = []
    with tqdm(total=len(jobs), desc=desc, disable=not progress, unit="case") as bar, \
            contextlib.ExitStack() as stack:
        results = (stack.enter_context(cf.ProcessPoolExecutor(workers)).map(fn, jobs, chunksize=chunksize)
                   if workers > 1 else map(fn, jobs))
        for res in results:
            out.append(res)
            bar.update()
    return out


def image_score(radius_mm: np.ndarray) -> np.ndarray:
    """Standardised image latent: the lesion volume (from its radius in mm), mean 0 and SD 1
    over the generating distribution (volume uniform on [V_MIN, V_MAX])."""
    volume = 4.0 / 3.0 * np.pi * np.asarray(radius_mm, dtype=np.float64) ** 3
    return (volume - (V_MIN + V_MAX) / 2) / ((V_MAX - V_MIN) / np.sqrt(12.0))


def clinical_score(age: np.ndarray, smoking: np.ndarray, crp: np.ndarray, diabetes: np.ndarray) -> np.ndarray:
    """Clinical latent from the complete (never missing) clinical values."""
    age_z = (age - 62.0) / 10.0
    crp_z = (np.log(crp) - np.log(5.0)) / 0.8
    return (0.8 * age_z + 0.8 * (smoking == "current") + 0.4 * (smoking == "former")
            + 0.7 * crp_z + 0.5 * diabetes)


def true_logit(radius_mm: np.ndarray, age: np.ndarray, smoking: np.ndarray, crp: np.ndarray,
               diabetes: np.ndarray) -> np.ndarray:
    """The generating linear predictor (log-odds for binary, log-hazard for survival)."""
    z_img = image_score(radius_mm)
    z_clin = clinical_score(age, smoking, crp, diabetes)
    return -0.6 + 1.8 * z_img + 2.0 * z_clin + 0.9 * z_img * (smoking == "current")


# ----------------------------------------------------------------------------- phantom


def make_phantom(rng: np.random.Generator, radius_mm: float) -> tuple[np.ndarray, dict[str, Any]]:
    """One CT phantom in HU, indexed (i, j, k) on the :data:`SHAPE` grid with :data:`SPACING`.

    i runs patient right -> left (DICOM +x), j anterior -> posterior (+y), k feet -> head.
    Returns the volume (float32) and the lesion centre in voxel coordinates.
    """
    ni, nj, nk = SHAPE
    si, sj, sk = SPACING
    x = (np.arange(ni) - (ni - 1) / 2) * si
    y = (np.arange(nj) - (nj - 1) / 2) * sj
    z = (np.arange(nk) - (nk - 1) / 2) * sk
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
    vol = np.full(SHAPE, -1000.0, dtype=np.float32)
    a, b = rng.uniform(130, 140), rng.uniform(95, 103)
    body = (X / a) ** 2 + (Y / b) ** 2 <= 1.0
    vol[body] = 40.0 + rng.normal(0, 5)
    lung_a, lung_b, lung_c = a * 0.32, b * 0.62, rng.uniform(85, 92)
    lungs = []
    for side in (-1, 1):
        cx = side * a * 0.45
        lung = ((X - cx) / lung_a) ** 2 + ((Y + 5) / lung_b) ** 2 + (Z / lung_c) ** 2 <= 1.0
        vol[lung] = -850.0
        lungs.append((cx, lung))
    heart = ((X - 12) / (a * 0.22)) ** 2 + ((Y + 15) / (b * 0.35)) ** 2 + ((Z + 20) / 45) ** 2 <= 1.0
    vol[heart] = 45.0
    spine = ((X / 14) ** 2 + ((Y - b * 0.72) / 14) ** 2) <= 1.0
    vol[spine] = 700.0
    # lesion: a sphere fully inside one lung, at least 6 mm from its border where possible
    cx, lung = lungs[int(rng.integers(2))]
    centre_mm = None
    for _ in range(200):
        c = np.array([cx + rng.uniform(-0.5, 0.5) * lung_a, -5 + rng.uniform(-0.6, 0.6) * lung_b,
                      rng.uniform(-0.6, 0.6) * lung_c])
        inside = (((c[0] - cx) / (lung_a - radius_mm - 4)) ** 2 + ((c[1] + 5) / (lung_b - radius_mm - 4)) ** 2
                  + (c[2] / (lung_c - radius_mm - 4)) ** 2) <= 1.0
        if inside:
            centre_mm = c
            break
    if centre_mm is None:
        centre_mm = np.array([cx, -5.0, 0.0])
    # soft-edged sphere (partial volume), integrated lesion mass ~ r^3
    dist = np.sqrt((X - centre_mm[0]) ** 2 + (Y - centre_mm[1]) ** 2 + (Z - centre_mm[2]) ** 2)
    frac = np.clip((radius_mm - dist) / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)
    vol = vol * (1 - frac) + LESION_HU * frac
    vol += rng.normal(0, 15, SHAPE).astype(np.float32)
    centre_vox = (centre_mm - np.array([x[0], y[0], z[0]])) / np.array(SPACING)
    return vol.astype(np.float32), {"lesion_centre_voxel": centre_vox.round(2).tolist()}


def phantom_origin_lps() -> tuple[float, float, float]:
    """ImagePositionPatient of slice k = 0 (the volume is centred on the scanner origin)."""
    return tuple(float(-(n - 1) / 2 * s) for n, s in zip(SHAPE, SPACING, strict=True))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- cohort


def sample_clinical(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """The synthetic clinical columns, drawn in this order from ``rng`` (every cohort kind uses
    the same draws): age, sex, smoking, diabetes, crp, bmi; (n,) each."""
    age = np.clip(rng.normal(62, 10, n), 30, 90).round(0)
    sex = rng.choice(["F", "M"], n)
    smoking = rng.choice(np.array(SMOKING), n, p=[0.45, 0.30, 0.25])
    diabetes = (rng.random(n) < 0.25).astype(int)
    crp = np.exp(rng.normal(np.log(5.0), 0.8, n)).round(2)
    bmi = rng.normal(27, 4, n).round(1)
    return age, sex, smoking, diabetes, crp, bmi


def sample_cohort(spec: SynthSpec) -> pd.DataFrame:
    """The cohort table (no images yet): clinical values (with missing cells), outcome, truth."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n
    age, sex, smoking, diabetes, crp, bmi = sample_clinical(rng, n)
    radius = np.cbrt(3.0 * rng.uniform(V_MIN, V_MAX, n) / (4.0 * np.pi))
    lin = true_logit(radius, age, smoking, crp, diabetes)
    df = pd.DataFrame({
        "case_id": [f"case{i:04d}" for i in range(n)],
        "patient_id": [f"P{i:04d}" for i in range(n)],
        "age": age, "sex": sex, "smoking": smoking, "diabetes": diabetes, "crp": crp, "bmi": bmi,
        "lesion_radius_mm": radius.round(3), "true_linear_predictor": lin,
    })
    if spec.task == "binary":
        p = 1.0 / (1.0 + np.exp(-lin))
        df["true_probability"] = p
        df["label"] = (rng.random(n) < p).astype(int)
    else:
        hazard = 0.05 * np.exp(lin)
        t_event = rng.exponential(1.0 / hazard)
        t_cens = rng.uniform(0.0, 36.0, n)
        df["time"] = np.minimum(t_event, t_cens).round(3) + 1e-3
        df["event"] = (t_event <= t_cens).astype(int)
    # blank clinical cells at random (never the outcome)
    for col in CLINICAL_COLUMNS:
        miss = rng.random(n) < spec.missing_rate
        df[col] = df[col].astype(object)
        df.loc[miss, col] = None
    test = rng.permutation(n)[: int(round(spec.test_fraction * n))]
    df["split"] = "train"
    df.loc[test, "split"] = "test"
    return df


def bayes_metric(df: pd.DataFrame, task: str) -> float:
    """AUROC (binary) or Harrell's C-index (survival) of the true linear predictor."""
    lin = df["true_linear_predictor"].to_numpy(float)
    if task == "binary":
        from sklearn.metrics import roc_auc_score

        y = df["label"].to_numpy(int)
        if y.min() == y.max():
            return float("nan")
        return float(roc_auc_score(y, lin))
    from mmai.engine.metrics import c_index

    return float(c_index(df["time"].to_numpy(float), df["event"].to_numpy(int), lin))


def write_cohort(out_dir: Path, spec: SynthSpec, *, progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Write a synthetic cohort: manifest.csv, clinical.csv, images/, truth.csv, truth.json.

    ``workers`` > 1 writes the images in that many processes (same files as with one).

    Returns the contents of truth.json (``metric``, ``bayes``, ``bayes_test`` ...).
    """
    if workers < 1:
        raise ConfigError(f"synth: --workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    df = sample_cohort(spec)
    jobs = [(out_dir / "images", i, row.case_id, row.patient_id, float(row.lesion_radius_mm), spec)
            for i, row in enumerate(df.itertuples(index=False))]
    df["image"] = map_cases(_synth_case, jobs, workers=workers, desc="synth images", progress=progress, chunksize=16)
    clinical_cols = ["case_id", "patient_id", *CLINICAL_COLUMNS]
    outcome = ["label"] if spec.task == "binary" else ["time", "event"]
    df[clinical_cols].to_csv(out_dir / "clinical.csv", index=False)
    df[["case_id", "patient_id", "image", *CLINICAL_COLUMNS, *outcome, "split"]].to_csv(
        out_dir / "manifest.csv", index=False)
    truth_cols = ["case_id", "lesion_radius_mm", "true_linear_predictor"]
    if spec.task == "binary":
        truth_cols.append("true_probability")
    df[truth_cols].to_csv(out_dir / "truth.csv", index=False)
    metric = "auroc" if spec.task == "binary" else "c_index"
    info = {
        "task": spec.task, "metric": metric, "n": spec.n, "seed": spec.seed,
        "bayes": bayes_metric(df, spec.task),
        "bayes_test": bayes_metric(df[df["split"] == "test"], spec.task),
        "missing_rate": spec.missing_rate,
        "model": "logit = -0.6 + 1.8 z_img + 2.0 z_clin + 0.9 z_img [smoking == current]",
    }
    atomic_write_json(out_dir / "truth.json", info)
    return info


def _synth_case(job: tuple[Path, int, str, str, float, SynthSpec]) -> str:
    """Make and write one case's image; its own random stream (seed, case index) makes the
    cohort identical whatever the number of workers."""
    folder, i, case_id, patient_id, radius, spec = job
    rng = np.random.default_rng([spec.seed, 1, i])
    vol, _info = make_phantom(rng, radius)
    return _write_image(folder, case_id, patient_id, vol, spec, rng)


def _write_image(folder: Path, case_id: str, patient_id: str, vol: np.ndarray, spec: SynthSpec,
                 rng: np.random.Generator) -> str:
    if spec.fmt == "nifti":
        import nibabel as nib

        affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        origin = phantom_origin_lps()
        affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
        nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), str(folder / f"{case_id}.nii.gz"))
        return f"images/{case_id}.nii.gz"
    from mmai.io.dicom_write import write_series

    series_dir = folder / case_id
    birth_year = int(rng.integers(1930, 1990))
    write_series(vol, series_dir, spacing=SPACING, origin=phantom_origin_lps(), modality="CT",
                 patient_id=patient_id, patient_name=f"SYNTH^{patient_id}",
                 series_description="CHEST CT SYNTH", rescale_slope=1.0, rescale_intercept=-1024.0,
                 extra={"PatientBirthDate": f"{birth_year}0101", "AccessionNumber": f"ACC{patient_id}"})
    return f"images/{case_id}"
