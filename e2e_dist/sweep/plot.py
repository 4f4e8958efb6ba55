"""Rendering a scaling fit: the PNG figure and the text/markdown summaries.

Uses matplotlib's object-oriented API on an Agg canvas (no pyplot, no global backend switch), so it
works headless, in threads, and inside Ray workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from e2e_dist.sweep.scaling import Fit

_GREEK = {"alpha": "α", "beta": "β"}
MAX_CURVES = 5  # fitted curves per panel; more are unreadable


def _fmt(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _param_line(name: str, value: float, ci: Any) -> str:
    rng = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
    return f"{_GREEK.get(name, name)} = {_fmt(value)}{rng}"


def _pick(values: np.ndarray, k: int = MAX_CURVES) -> np.ndarray:
    """Up to k distinct values spread over the range (in log space), for one fitted curve each."""
    uniq = np.unique(values)
    if len(uniq) <= k:
        return uniq
    return uniq[np.unique(np.round(np.linspace(0, len(uniq) - 1, k)).astype(int))]


def _panel(ax, fit: Fit, x, y, other, x_is_n: bool, xlabel: str, other_label: str | None, metric: str) -> None:
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
    if other_label is None:  # one-variable fit: one curve, plain points
        ax.scatter(x, y, color="tab:blue", zorder=3, label="trials")
        pred = fit.predict(grid, None) if x_is_n else fit.predict(None, grid)
        ax.plot(grid, pred, color="tab:red", label="fit")
    else:
        norm = LogNorm(other.min(), other.max()) if other.max() > other.min() else None
        sc = ax.scatter(x, y, c=other, cmap="viridis", norm=norm, zorder=3, edgecolor="k", linewidth=0.4)
        ax.figure.colorbar(sc, ax=ax, label=other_label)
        for v in _pick(other):
            color = sc.cmap(sc.norm(v)) if norm else "tab:red"
            pred = fit.predict(grid, v) if x_is_n else fit.predict(v, grid)
            ax.plot(grid, pred, color=color, linewidth=1.2, label=f"fit at {other_label.split(' ')[0]}={_fmt(v)}")
    ax.axhline(fit.params["E"], color="gray", linestyle=":", label=f"E = {_fmt(fit.params['E'])}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def plot_fit(fit: Fit, n: np.ndarray, d: np.ndarray, loss: np.ndarray, path: str | Path, *,
             optimal: dict | None = None, d_label: str = "tokens_seen", metric: str = "val_loss") -> Path:
    """Loss vs data and loss vs parameters: trial points, fitted curves, fitted values with CIs."""
    n_lbl, d_lbl = "N (non-embedding params)", f"D ({d_label})"
    panels = {"joint": [(d, n, False, d_lbl, n_lbl), (n, d, True, n_lbl, d_lbl)],
              "data": [(d, None, False, d_lbl, None)],
              "params": [(n, None, True, n_lbl, None)]}[fit.form]
    fig = Figure(figsize=(6.2 * len(panels), 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (x, other, x_is_n, xlabel, other_label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _panel(ax, fit, x, loss, other, x_is_n, xlabel, other_label, metric)
    pct = int(round(fit.ci_level * 100))
    title = f"{fit.formula}   ({fit.n_points} trials, {pct}% bootstrap CI, n={fit.n_boot})\n"
    title += "   ".join(_param_line(k, v, fit.ci.get(k)) for k, v in fit.params.items())
    if optimal:
        title += (f"\ncompute-optimal at C={optimal['budget']:.2g} FLOPs: N={_fmt(optimal['n_opt'])}, "
                  f"D={_fmt(optimal['d_opt'])}, {metric}={_fmt(optimal['loss_opt'])}")
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path)
    return path


def summary_text(report: dict[str, Any]) -> str:
    """Print-ready summary of a report made by `scaling.scaling_report`."""
    pct = int(round(report["ci_level"] * 100))
    lines = [f"{report['formula']}  fitted to {report['n_points']} completed trials "
             f"(D = {report['d_key']}, log-RMSE {report['rmse_log']:.2%}, {report['n_boot']} bootstrap refits)"]
    for k, v in report["params"].items():
        ci = report["ci"].get(k)
        lines.append(f"  {k:<6}= {_fmt(v):>9}" + (f"   {pct}% CI [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""))
    opt = report.get("optimal")
    if opt:
        lines.append(f"compute-optimal for C = {opt['budget']:.3g} FLOPs (C = 6 N D): N = {_fmt(opt['n_opt'])}"
                     + (f" [{_fmt(opt['n_opt_ci'][0])}, {_fmt(opt['n_opt_ci'][1])}]" if "n_opt_ci" in opt else "")
                     + f", D = {_fmt(opt['d_opt'])}"
                     + (f" [{_fmt(opt['d_opt_ci'][0])}, {_fmt(opt['d_opt_ci'][1])}]" if "d_opt_ci" in opt else "")
                     + f", predicted {report['metric']} {_fmt(opt['loss_opt'])}")
    if report.get("note"):
        lines.append(report["note"])
    return "\n".join(lines)


def summary_markdown(report: dict[str, Any]) -> str:
    """The summary as markdown: fitted values, the compute-optimal split, every point and its fit."""
    pct = int(round(report["ci_level"] * 100))
    out = [f"# Scaling fit: `{report['formula']}`", "",
           f"Results: `{report['results']}` — {report['n_points']} completed trials, N = non-embedding "
           f"parameters, D = `{report['d_key']}`, loss = `{report['metric']}`. Huber fit in log space; "
           f"{pct}% percentile intervals from {report['n_boot']} bootstrap refits (seed {report['seed']}); "
           f"log-RMSE {report['rmse_log']:.2%}.", "",
           f"| parameter | fit | {pct}% CI |", "|---|---|---|"]
    for k, v in report["params"].items():
        ci = report["ci"].get(k)
        out.append(f"| {k} | {_fmt(v)} | " + (f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "—") + " |")
    if report.get("optimal"):
        opt = report["optimal"]
        out += ["", f"**Compute-optimal for C = {opt['budget']:.3g} FLOPs** (C = 6·N·D): "
                    f"N = {_fmt(opt['n_opt'])}, D = {_fmt(opt['d_opt'])}, predicted {report['metric']} "
                    f"{_fmt(opt['loss_opt'])}."]
        if "n_opt_ci" in opt:
            out[-1] += (f" {pct}% CI: N [{_fmt(opt['n_opt_ci'][0])}, {_fmt(opt['n_opt_ci'][1])}], "
                        f"D [{_fmt(opt['d_opt_ci'][0])}, {_fmt(opt['d_opt_ci'][1])}].")
    if report.get("note"):
        out += ["", report["note"]]
    out += ["", "| trial | N | D | loss | fit |", "|---|---|---|---|---|"]
    out += [f"| {p['trial']} | {_fmt(p['N'])} | {_fmt(p['D'])} | {p['loss']:.4f} | {p['fit']:.4f} |"
            for p in report["points"]]
    out += ["", "![scaling fit](scaling_fit.png)", ""]
    return "\n".join(out)
