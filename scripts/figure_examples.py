"""Makes the example figures of docs/evaluate.md ("Figures") from synthetic data only:

    PYTHONPATH=. python scripts/figure_examples.py
"""

from __future__ import annotations

import numpy as np

from mmai import plots
from mmai.figures.overlay import MapLayer, write_overlay_png

OUT = "docs/figures"


def overlay_example() -> None:
    """A 0.7 x 0.7 x 5 mm chest phantom stored LPS (as DICOM-derived files are), a sphere in the
    patient's left lung and a saliency blob on it."""
    sp, shape = (0.7, 0.7, 5.0), (256, 200, 40)
    ii = np.indices(shape, dtype=np.float32)
    w = [(ii[a] - (shape[a] - 1) / 2) * sp[a] for a in range(3)]  # mm from the centre, RAS
    body = ((w[0] / 80) ** 2 + (w[1] / 60) ** 2 <= 1) & (np.abs(w[2]) < 90)
    lungs = (((np.abs(w[0]) - 38) / 28) ** 2 + (w[1] / 45) ** 2 <= 1) & (np.abs(w[2]) < 80)
    img = np.where(body, 40.0, -1000.0) - np.where(lungs, 850.0, 0.0)
    r = np.sqrt((w[0] + 40) ** 2 + (w[1] - 5) ** 2 + (w[2] - 10) ** 2)  # patient LEFT is -x in RAS
    img = np.where(r < 12, 60.0, img) + np.random.default_rng(0).normal(0, 15, shape)
    sal = np.clip(1 - r / 20, 0, 1).astype(np.float32)
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = [-(s - 1) / 2 * v for s, v in zip(shape, sp, strict=True)]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    write_overlay_png(f"{OUT}/overview_example.png", img[::-1, ::-1].copy(), aff @ flip,
                      [MapLayer("saliency", sal[::-1, ::-1].copy(),
                                "saliency |grad x input|\nscaled to its maximum (1 = peak), not drawn < 0.1")],
                      title="case p017 | model cross_attention-3f2a9c1b7d | P(1) = 0.912, predicted 1 | label 1", dpi=72)


def curve_examples() -> None:
    rng = np.random.default_rng(0)
    n = 300
    risk = rng.normal(size=n)
    t, c = rng.exponential(24 * np.exp(-risk)), rng.uniform(6, 60, n)
    e = (t <= c).astype(int)
    plots.plot_km_by_risk(np.minimum(t, c), e, risk, f"{OUT}/km_example.png", time_unit="months",
                          title="fusion: Kaplan-Meier by predicted-risk tertile")
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    plots.plot_calibration({"fusion": (y, p)}, f"{OUT}/calibration_example.png", n_boot=1000)


if __name__ == "__main__":
    overlay_example()
    curve_examples()
