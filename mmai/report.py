"""``mmai evaluate --out DIR``'s HTML page (report.html) and its survival calibration plot.

The page is self-contained apart from the PNGs beside it (linked by relative name): no external
script, style or font, so it opens offline and from an archive. With ``mmai evaluate --explain DIR``
it also holds a "3D viewer" section (mmai.viewer: NiiVue and the volumes inlined, its only script).
It shows what was scored (files, split, row counts), one metrics table with 95% CIs per model, the
survival horizons (time-dependent AUROC, calibration at t), the cases left out and every plot of
the report.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

from mmai.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_METRICS = {
    "binary": ("auroc", "auprc", "brier", "ece", "balanced_accuracy"),
    "multiclass": ("auroc", "brier", "balanced_accuracy"),
    "regression": ("mae", "rmse", "r2"),
    "survival": ("c_index",),
}
_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}th{background:#eee}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}"
          "figure{display:inline-block;margin:.5em;width:46%;vertical-align:top}")


def plot_horizon_calibration(models: dict[str, Any], path: Path) -> Path | None:
    """Predicted vs Kaplan-Meier observed P(event by t) per risk group, one line per model and horizon.

    Returns:
        The PNG written, or None when no model has horizon metrics.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = [(f"{m}: t={h['t']:g}", h["calibration"]) for m, e in models.items()
             for h in ((e.get("metrics") or {}).get("horizons") or {}).values()]
    if not lines:
        return None
    fig = Figure(figsize=(6.0, 5.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect")
    for name, cal in lines:
        ax.plot(cal["predicted"], cal["observed"], marker="o", label=f"{name} (error {cal['error']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Predicted P(event by t) = 1 - surv_t",
           ylabel="Observed (Kaplan-Meier) P(event by t)", title="Calibration at the horizons")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _num(v: Any, ci: Any = None) -> str:
    if v is None:
        return "undefined"
    text = f"{v:.3f}"
    if ci and None not in ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _sections(report: dict[str, Any]) -> list[str]:
    kind, models = report["kind"], report["models"]
    keys = _METRICS[kind]
    rows = []
    for model, e in models.items():
        m = e.get("metrics") or {}
        rows.append([model, str(e["n_evaluated"]), *[_num(m.get(k), m.get(f"{k}_ci")) if m else "-" for k in keys]])
    out = ["<h2>Metrics (95% CI)</h2>", _table(["model", "n", *keys], rows)]
    hz = [[model, f"{h['t']:g}", str(h["n_events_by_t"]), str(h["n_at_risk_after_t"]),
           _num(h.get("auroc"), h.get("auroc_ci")), f"{h['calibration']['predicted_mean']:.3f}",
           f"{h['calibration']['observed_all']:.3f}", f"{h['calibration']['error']:.3f}"]
          for model, e in models.items() for h in ((e.get("metrics") or {}).get("horizons") or {}).values()]
    if hz:
        out += ["<h2>Survival at the horizons</h2>",
                _table(["model", "t", "events by t", "at risk after t", "time-dependent AUROC",
                        "mean predicted P(event)", "observed (KM)", "calibration error"], hz)]
    left = [[model, what.replace("_", " "), str(e[what]["count"]), ", ".join(e[what]["case_ids"])]
            for model, e in models.items()
            for what in ("not_in_manifest", "missing_target", "invalid_prediction", "not_predicted")
            if e[what]["count"]]
    left += [[model, "outside the split", str(e["outside_split"]), ""] for model, e in models.items()
             if e.get("outside_split")]
    if left:
        out += ["<h2>Cases left out</h2>", _table(["model", "why", "count", "first case ids"], left)]
    return out


def write_html(report: dict[str, Any], out_dir: Path, viewer: str | None = None) -> Path:
    """Write ``out_dir/report.html`` from an evaluate report (with its "plots" already drawn).

    ``viewer``: the "3D viewer" section's HTML (:func:`mmai.viewer.report.viewer_section`), if any."""
    out_dir = Path(out_dir)
    esc = html.escape
    what = [["predictions", str(report.get("predictions", "-"))], ["manifest", str(report.get("manifest", "-"))],
            ["task", report["kind"] + (f" (positive class {report['positive_class']})"
                                       if report.get("positive_class") else "")],
            ["split", str(report.get("split", "all"))],
            ["manifest rows", str(report.get("n_manifest_rows", "-"))],
            ["rows in the split", str(report.get("n_split_rows", "-"))],
            ["confidence intervals", f"{report['ci']}, {report['n_boot']} resamples, seed {report['seed']}"
             if report["n_boot"] else "none (--n-boot 0)"]]
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mmai evaluate: "
             f"{esc(report['kind'])}</title><style>{_STYLE}</style></head><body>",
             f"<h1>mmai evaluate: {esc(report['kind'])}, split {esc(str(report.get('split', 'all')))}</h1>",
             "<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in what) + "</table>",
             *_sections(report)]
    plots = report.get("plots") or {}
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure><img src=\"{esc(f)}\" alt=\"{esc(n)}\"><figcaption>{esc(n)}</figcaption></figure>"
                  for n, f in plots.items()]
    if viewer:
        parts += ["<h2>3D viewer</h2>", viewer]
    notes = report.get("plot_notes") or []
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    path = out_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    log.info("wrote %s", path)
    return path
