"""Rendering a scaling fit: the PNG figure and the text/markdown summaries.

Uses matplotlib's object-oriented API on an Agg canvas (no pyplot, no global backend switch), so it
works headless, in threads, and inside Ray workers.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from e2e_dist.sweep.scaling import Fit, fmt

_GREEK = {"alpha": "α", "beta": "β"}
MAX_CURVES = 5  # fitted curves per panel; more are unreadable


def _param_line(name: str, value: float, ci: Any) -> str:
    rng = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""
    return f"{_GREEK.get(name, name)} = {fmt(value)}{rng}"


_UNITS = {"tokens": "tokens", "samples": "samples", "bytes": "bytes", "bpb": "bits per byte", "loss": "nats",
          "acc": "fraction correct", "cer": "character error rate", "wer": "word error rate"}


def short(v: float) -> str:
    """A tick label: 500, 30k, 1.5M, 2G."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:.3g}"


def with_unit(key: str) -> str:
    """A metric or data-size key with its unit, for an axis: `val_loss (nats)`, `train_tokens (tokens)`."""
    unit = next((u for k, u in _UNITS.items() if k in key), None)
    return f"{key} ({unit})" if unit else key


def _pick(values: np.ndarray, k: int = MAX_CURVES) -> np.ndarray:
    """Up to k distinct values spread over the range (in log space), for one fitted curve each."""
    uniq = np.unique(values)
    if len(uniq) <= k:
        return uniq
    return uniq[np.unique(np.round(np.linspace(0, len(uniq) - 1, k)).astype(int))]


def _band(ax, fit: Fit, grid: np.ndarray, x_is_n: bool, other: float | None, color: Any) -> None:
    """The bootstrap refits' spread around a curve (the fit's uncertainty, at ci_level)."""
    if fit.boot is None:
        return
    samples = fit.predict_samples(grid, other) if x_is_n else fit.predict_samples(other, grid)
    q = (1 - fit.ci_level) / 2 * 100
    lo, hi = np.percentile(samples, [q, 100 - q], axis=0)
    ax.fill_between(grid, lo, hi, color=color, alpha=0.15, linewidth=0)


def _panel(ax, fit: Fit, x, y, other, held, learning, x_is_n: bool, xlabel: str, other_label: str | None,
           metric: str) -> None:
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 200)
    fitted = ~held
    if other_label is None:  # one-variable fit: one curve, plain points
        ax.scatter(x[fitted], y[fitted], color="tab:blue", zorder=3, label="trials (fitted)")
        pred = fit.predict(grid, None) if x_is_n else fit.predict(None, grid)
        _band(ax, fit, grid, x_is_n, None, "tab:red")
        ax.plot(grid, pred, color="tab:red", label=f"fit ({int(round(fit.ci_level * 100))}% bootstrap band)")
    else:
        norm = LogNorm(other.min(), other.max()) if other.max() > other.min() else None
        sc = ax.scatter(x[fitted], y[fitted], c=other[fitted], cmap="viridis", norm=norm, zorder=3, edgecolor="k",
                        linewidth=0.4)
        ax.figure.colorbar(sc, ax=ax, label=other_label)
        for v in _pick(other):
            color = sc.cmap(sc.norm(v)) if norm else "tab:red"
            pred = fit.predict(grid, v) if x_is_n else fit.predict(v, grid)
            _band(ax, fit, grid, x_is_n, v, color)
            ax.plot(grid, pred, color=color, linewidth=1.2, label=f"fit at {other_label.split(' ')[0].rstrip(':')}={fmt(v)}")
    if held.any():
        ax.scatter(x[held], y[held], marker="X", s=90, color="tab:orange", edgecolor="k", zorder=4,
                   label="held out (not fitted)")
    if learning.any():
        ax.scatter(x[learning], y[learning], s=170, facecolors="none", edgecolors="tab:purple", linewidths=1.4,
                   zorder=5, label="still learning at its end")
    ax.axhline(fit.params["E"], color="gray", linestyle=":", label=f"E = {fmt(fit.params['E'])}")
    # Limits from the trials, not the band: an unidentified fit's band can span a decade.
    span = max(float(y.max() - y.min()), 0.05 * float(y.max()))
    ax.set_ylim(float(y.min()) - 0.4 * span, float(y.max()) + 0.4 * span)
    ax.set_xscale("log")
    # Short labels (30k, 1M) at 1-2-5 of each decade, or once per decade on wide ranges; none on the
    # minor ticks, which matplotlib labels on ranges under a decade until they overlap ("3x10^4 4x10^4").
    decades = np.log10(grid.max() / grid.min())
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: short(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(with_unit(metric))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def plot_fit(fit: Fit, n: np.ndarray, d: np.ndarray, loss: np.ndarray, path: str | Path, **kwargs: Any) -> Path:
    """`fit_figure` saved as a PNG at `path`."""
    path = Path(path)
    fit_figure(fit, n, d, loss, **kwargs).savefig(path)
    return path


def fit_figure(fit: Fit, n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, held_out: np.ndarray | None = None,
               optimal: dict | None = None, d_label: str = "tokens_seen", metric: str = "val_loss",
               still_learning: np.ndarray | None = None) -> Figure:
    """One panel per fitted variable (loss vs D, loss vs N): the trials, held-out ones and those
    `still_learning` at their end marked, each fitted curve with its bootstrap band; the title has
    the values, their intervals and what the points do not identify or measure."""
    held = np.zeros(len(loss), dtype=bool) if held_out is None else np.asarray(held_out, dtype=bool)
    learning = np.zeros(len(loss), dtype=bool) if still_learning is None else np.asarray(still_learning, dtype=bool)
    n_lbl, d_lbl = "N (non-embedding parameters)", f"D: {with_unit(d_label)}"
    panels = {"joint": [(d, n, False, d_lbl, n_lbl), (n, d, True, n_lbl, d_lbl)],
              "data": [(d, None, False, d_lbl, None)],
              "params": [(n, None, True, n_lbl, None)]}[fit.form]
    fig = Figure(figsize=(6.2 * len(panels), 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (x, other, x_is_n, xlabel, other_label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _panel(ax, fit, x, loss, other, held, learning, x_is_n, xlabel, other_label, metric)
    pct = int(round(fit.ci_level * 100))
    title = f"{fit.formula}   ({fit.n_points} trials, {pct}% profile-t CI; band: {fit.n_boot} bootstrap refits)\n"
    title += "   ".join(_param_line(k, v, fit.ci.get(k)) for k, v in fit.params.items())
    if fit.unidentified:
        title += "\nNOT IDENTIFIED: " + "; ".join(f"{_GREEK.get(k, k)} ({why})" for k, why in fit.unidentified.items())
    if learning.any():
        title += ("\nSTILL LEARNING AT THEIR END (circled; their loss is what their steps allowed): D = "
                  + ", ".join(fmt(float(v)) for v in d[learning]))
    if optimal:
        title += (f"\ncompute-optimal at C={optimal['budget']:.2g} FLOPs: N={fmt(optimal['n_opt'])}, "
                  f"D={fmt(optimal['d_opt'])}, {metric}={fmt(optimal['loss_opt'])}")
    width = 85 * len(panels)  # characters per title line at fontsize 9
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=9)
    return fig


def tick_labels_overlap(fig: Figure) -> list[str]:
    """Pairs of visible x tick labels that overlap once drawn (the check the plot test makes)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels]
        boxes.sort(key=lambda b: b[1].x0)
        out += [f"{a[0]} / {b[0]}" for a, b in zip(boxes, boxes[1:]) if a[1].x1 > b[1].x0]
    return out
