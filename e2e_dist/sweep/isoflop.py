"""Chinchilla's approach 2 on an isoFLOP sweep: per compute budget, the model size with the lowest
loss, read off a parabola in log N; then how that size grows with the budget.

The sweep trains several model sizes N at each budget C = 6 N D (D = C / 6N tokens), so the points
of one budget lie on a curve of loss against log N whose minimum is the compute-optimal size for
that budget. Unlike the parametric fit (approach 3, scaling.py) this assumes no functional form
beyond a locally quadratic valley, so the two cross-check each other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BUDGET_TOLERANCE = 1.25
"""Points whose C = 6 N D lie within this factor of the group's smallest are one budget (a sweep's
steps are rounded, so its nominal budgets are met within a few percent)."""
MIN_SIZES = 3
"""Sizes a budget needs for a parabola."""


@dataclass
class BudgetMinimum:
    budget: float
    """The group's compute, geometric mean of its points' 6 N D (FLOPs)."""
    sizes: list[float]
    losses: list[float]
    n_opt: float | None
    """The parabola's minimum in N; None when the valley is not bracketed by the sizes tried."""
    loss_min: float | None
    note: str | None = None


def group_budgets(n: np.ndarray, d: np.ndarray) -> list[np.ndarray]:
    """Indices of the points of each compute budget, smallest budget first."""
    c = 6 * n * d
    order = np.argsort(c)
    groups, start = [], 0
    for k in range(1, len(order) + 1):
        if k == len(order) or c[order[k]] > c[order[start]] * BUDGET_TOLERANCE:
            groups.append(order[start:k])
            start = k
    return groups


def budget_minimum(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> BudgetMinimum:
    """The parabola through (log N, loss) of one budget's points and its minimum, if inside the range."""
    budget = float(np.exp(np.mean(np.log(6 * n * d))))
    order = np.argsort(n)
    n, loss = n[order], loss[order]
    out = BudgetMinimum(budget=budget, sizes=n.tolist(), losses=loss.tolist(), n_opt=None, loss_min=None)
    x = np.log(n)
    a, b, c = np.polyfit(x, loss, 2)
    if a <= 0:
        out.note = "no valley: loss is not convex in log N here (sizes too close, or noise)"
        return out
    x_opt = -b / (2 * a)
    if not x[0] <= x_opt <= x[-1]:
        out.note = (f"not bracketed: the valley lies beyond the {'smallest' if x_opt < x[0] else 'largest'} "
                    "size tried; add sizes on that side")
    else:
        out.n_opt, out.loss_min = float(math.exp(x_opt)), float(a * x_opt**2 + b * x_opt + c)
    return out


def isoflop_analysis(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict[str, Any] | None:
    """Per-budget minima and the exponent a of N_opt ~ C^a, or None when the points are not an
    isoFLOP design (fewer than two budgets with MIN_SIZES sizes each)."""
    groups = [g for g in group_budgets(n, d) if len(np.unique(n[g])) >= MIN_SIZES]
    if len(groups) < 2:
        return None
    minima = [budget_minimum(n[g], d[g], loss[g]) for g in groups]
    found = [m for m in minima if m.n_opt is not None]
    out: dict[str, Any] = {"budgets": [asdict(m) for m in minima], "exponent": None, "increasing": None}
    if len(found) >= 2:
        cs, ns = np.log([m.budget for m in found]), np.log([m.n_opt for m in found])
        out["exponent"] = float(np.polyfit(cs, ns, 1)[0])
        out["increasing"] = bool(np.all(np.diff(ns) > 0))
    return out


def isoflop_lines(iso: dict[str, Any]) -> list[str]:
    """Print-ready lines of an isoflop_analysis."""
    lines = ["isoFLOP minima (approach 2: a parabola in log N per budget):"]
    for m in iso["budgets"]:
        if m["n_opt"] is None:
            lines.append(f"  C = {m['budget']:.3g}: {m['note']}")
        else:
            lines.append(f"  C = {m['budget']:.3g}: N_opt = {m['n_opt']:.3g}, loss {m['loss_min']:.4g} "
                         f"(sizes {', '.join(f'{s:.3g}' for s in m['sizes'])})")
    if iso["exponent"] is not None:
        trend = "grows" if iso["increasing"] else "does NOT grow"
        lines.append(f"  N_opt ~ C^{iso['exponent']:.2f}: the optimal size {trend} with the budget")
    return lines
