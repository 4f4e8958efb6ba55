"""Scaling-law fits of a finished sweep: L(N, D) = E + A/N^alpha + B/D^beta, and its one-variable forms.

N counts non-embedding parameters, D training tokens (or samples). The fit follows Chinchilla's
recipe: in log space, log L = logsumexp(e, a - alpha log N, b - beta log D) with E = exp(e),
A = exp(a), B = exp(b), minimising a Huber loss of the log residuals (robust to an odd trial,
well conditioned whatever the magnitudes) from a grid of starts, under bounds. Confidence intervals
are profile-t intervals of the sum of squared log residuals (intervals.py: they hold their level
with 4-7 points, where resampling the points did not); a seeded bootstrap (resample points, refit
from the best fit) still draws the plot's band and the compute-optimal split's interval. The
compute-optimal split of a budget C ~ 6 N D has a closed form:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta))
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.optimize import least_squares, nnls
from scipy.special import logsumexp, softmax

from e2e_dist.errors import UserError
from e2e_dist.sweep.intervals import linear_prediction, profile_intervals

HUBER_DELTA = 1e-2  # log-loss units: ~1% off counts fully (the noise of a final loss), gross outliers only linearly
Form = Literal["joint", "data", "params"]
# Which parameters each form fits, in the order of the parameter vector.
_NAMES: dict[str, tuple[str, ...]] = {
    "joint": ("E", "A", "alpha", "B", "beta"),
    "data": ("E", "B", "beta"),
    "params": ("E", "A", "alpha"),
}
_FORMULA = {
    "joint": "L(N, D) = E + A/N^alpha + B/D^beta",
    "data": "L(D) = E + B/D^beta",
    "params": "L(N) = E + A/N^alpha",
}


def fmt(x: float) -> str:
    """A fitted value for people: 3 significant digits, scientific outside [1e-3, 1e4)."""
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


class ScalingError(UserError):
    """The results cannot be fitted (too few points, missing fields, bad values)."""


@dataclass
class Fit:
    form: Form
    """joint: L(N, D); data: L(D) (one model, several data sizes); params: L(N) (one data size)."""
    params: dict[str, float]
    """Fitted E, A, alpha, B, beta (those of the form)."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Profile-t interval of each parameter, at ci_level (intervals.py)."""
    ci_level: float = 0.95
    n_points: int = 0
    n_boot: int = 0
    """Bootstrap refits that succeeded."""
    rmse_log: float = 0.0
    """Root-mean-square log residual of the fit (0.01 ~ 1% error)."""
    boot: np.ndarray | None = field(default=None, repr=False)
    """Bootstrap parameter samples (n_boot x len(params)), in the order of `_NAMES[form]`."""
    resid: np.ndarray | None = field(default=None, repr=False)
    """Log residuals of the fit at its points."""
    logs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    """(theta, log N, log D, log L) of the fit: what prediction intervals linearise around."""
    unidentified: dict[str, str] = field(default_factory=dict)
    """Parameters the points do not pin down -> why (interval at a bound, or wider than 10x)."""

    @property
    def formula(self) -> str:
        return _FORMULA[self.form]

    def predict_samples(self, n: Any = None, d: Any = None) -> np.ndarray:
        """The law of every bootstrap refit at (n, d): shape (n_boot, *broadcast shape of n, d)."""
        assert self.boot is not None, "no bootstrap samples"
        shape = np.broadcast(np.asarray(n if n is not None else 1.0), np.asarray(d if d is not None else 1.0)).shape
        col = (slice(None),) + (None,) * len(shape)  # one row per refit, broadcast over the points
        p = {k: self.boot[:, i][col] for i, k in enumerate(_NAMES[self.form])}
        out = _law(p, None if n is None else np.asarray(n, dtype=float)[None],
                   None if d is None else np.asarray(d, dtype=float)[None])
        return np.broadcast_to(out, (len(self.boot), *shape)).astype(float)

    def predict(self, n: Any = None, d: Any = None) -> np.ndarray:
        return _law(self.params, None if n is None else np.asarray(n, dtype=float),
                    None if d is None else np.asarray(d, dtype=float))


def _law(p: dict[str, Any], n: Any, d: Any) -> np.ndarray:
    """E + A/N^alpha + B/D^beta with the terms the form has (p's values may be arrays)."""
    out = np.asarray(p["E"], dtype=float)
    if "A" in p:
        out = out + p["A"] / n ** p["alpha"]
    if "B" in p:
        out = out + p["B"] / d ** p["beta"]
    return out


# ------------------------------------------------------------------------------------- fitting
def _log_terms(theta: np.ndarray, form: str, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, list]:
    """Columns of log(E), log(A/N^alpha), log(B/D^beta) and, per column, d/d(theta) of it."""
    cols, grads = [np.full_like(log_n if form != "data" else log_d, theta[0])], [{0: 1.0}]
    if form in ("joint", "params"):
        cols.append(theta[1] - theta[2] * log_n)
        grads.append({1: 1.0, 2: -log_n})
    if form in ("joint", "data"):
        i = 3 if form == "joint" else 1
        cols.append(theta[i] - theta[i + 1] * log_d)
        grads.append({i: 1.0, i + 1: -log_d})
    return np.stack(cols, axis=1), grads


def _residuals(theta, form, log_n, log_d, log_l):
    z, _ = _log_terms(theta, form, log_n, log_d)
    return logsumexp(z, axis=1) - log_l


def _jacobian(theta, form, log_n, log_d, log_l):
    z, grads = _log_terms(theta, form, log_n, log_d)
    w = softmax(z, axis=1)  # d logsumexp / d column
    jac = np.zeros((z.shape[0], theta.size))
    for c, g in enumerate(grads):
        for j, dz in g.items():
            jac[:, j] += w[:, c] * dz
    return jac


def _bounds(form: str, log_l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # e below the smallest loss (E is the floor); coefficients free over many decades; exponents
    # in a physically sensible range (they are ~0.05-1 in every published fit).
    lo = {"E": log_l.min() - 15, "A": -30.0, "alpha": 0.005, "B": -30.0, "beta": 0.005}
    hi = {"E": log_l.max(), "A": 80.0, "alpha": 3.0, "B": 80.0, "beta": 3.0}
    names = _NAMES[form]
    return np.array([lo[k] for k in names]), np.array([hi[k] for k in names])


def _starts(form: str, n: np.ndarray, d: np.ndarray, loss: np.ndarray, keep: int = 3) -> list[np.ndarray]:
    """Best starting points from a profile over the exponents: for fixed (alpha, beta) the law is
    linear in (E, A, B), solved by non-negative least squares (rows weighted by 1/L, so errors are
    relative as in log space). A global search at the cost of a few thousand tiny solves."""
    exps = np.geomspace(0.02, 2.0, 36)
    grid = itertools.product(exps, exps) if form == "joint" else ((x, None) for x in exps)
    scored = []
    for ex1, ex2 in grid:
        cols = [np.ones_like(loss)]
        if form in ("joint", "params"):
            cols.append(n ** -ex1)
        if form in ("joint", "data"):
            cols.append(d ** -(ex2 if form == "joint" else ex1))
        m = np.stack(cols, axis=1) / loss[:, None]
        coef, rnorm = nnls(m, np.ones_like(loss))
        scored.append((rnorm, ex1, ex2, coef))
    scored.sort(key=lambda t: t[0])
    floor = 1e-6 * float(loss.min())  # NNLS may zero a coefficient; logs need it positive
    starts = []
    for _, ex1, ex2, coef in scored[:keep]:
        c = np.log(np.maximum(coef, floor))
        th = [c[0]]
        if form == "joint":
            th += [c[1], ex1, c[2], ex2]
        else:
            th += [c[1], ex1]
        starts.append(np.array(th))
    return starts


def _solve(form, log_n, log_d, log_l, starts) -> tuple[np.ndarray, float]:
    lo, hi = _bounds(form, log_l)
    best, best_cost = None, math.inf
    for x0 in starts:
        x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
        r = least_squares(_residuals, x0, jac=_jacobian, bounds=(lo, hi), loss="huber", f_scale=HUBER_DELTA,
                          args=(form, log_n, log_d, log_l), x_scale="jac", max_nfev=500)
        if r.cost < best_cost:
            best, best_cost = r.x, r.cost
    return best, best_cost


def _to_params(theta: np.ndarray, form: str) -> dict[str, float]:
    return {k: float(math.exp(v) if k in ("E", "A", "B") else v) for k, v in zip(_NAMES[form], theta)}


def detect_form(n: np.ndarray, d: np.ndarray) -> Form:
    vary_n, vary_d = len(np.unique(n)) > 1, len(np.unique(d)) > 1
    if vary_n and vary_d:
        return "joint"
    if vary_d:
        return "data"
    if vary_n:
        return "params"
    raise ScalingError("all trials have the same N and D: nothing to fit (sweep model or data size)")


def _check_enough(form: str, n: np.ndarray, d: np.ndarray) -> None:
    k = len(_NAMES[form])
    if len(n) < k + 1:
        raise ScalingError(f"{_FORMULA[form]} has {k} free parameters: needs at least {k + 1} finished "
                           f"trials, got {len(n)}")
    # Three distinct values per variable: a power law plus the shared floor E has 3 unknowns along it.
    for var, vals, used in (("N (model sizes)", n, form != "data"), ("D (data sizes)", d, form != "params")):
        if used and len(np.unique(vals)) < 3:
            raise ScalingError(f"{_FORMULA[form]} needs at least 3 distinct {var}, got {len(np.unique(vals))}")


def fit_scaling(n: Any, d: Any, loss: Any, form: Form | None = None, *, n_boot: int = 200,
                seed: int = 0, ci_level: float = 0.95) -> Fit:
    """Fit a scaling law to points (N, D, L); `form` None picks it from what varies."""
    n, d, loss = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ScalingError(f"N, D and L differ in length ({len(n)}, {len(d)}, {len(loss)})")
    for name, v in (("N", n), ("D", d), ("loss", loss)):
        if len(v) and not (np.all(np.isfinite(v)) and np.all(v > 0)):
            raise ScalingError(f"{name} must be finite and > 0 for every point")
    if not len(loss):
        raise ScalingError("no finished trials to fit")
    form = form or detect_form(n, d)
    _check_enough(form, n, d)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    theta, _ = _solve(form, log_n, log_d, log_l, _starts(form, n, d, loss))
    resid = _residuals(theta, form, log_n, log_d, log_l)
    fit = Fit(form=form, params=_to_params(theta, form), ci_level=ci_level, n_points=len(loss),
              rmse_log=float(np.sqrt(np.mean(resid**2))), logs=(theta, log_n, log_d, log_l))
    lo_b, hi_b = _bounds(form, log_l)
    _, ci_theta = profile_intervals(lambda th: _residuals(th, form, log_n, log_d, log_l),
                                    lambda th: _jacobian(th, form, log_n, log_d, log_l), theta, lo_b, hi_b, ci_level)
    ci_nat = np.where(np.array([k in ("E", "A", "B") for k in _NAMES[form]])[:, None], np.exp(ci_theta), ci_theta)
    fit.ci = {k: (float(ci_nat[i, 0]), float(ci_nat[i, 1])) for i, k in enumerate(_NAMES[form])}
    fit.unidentified = _unidentified(form, theta, ci_theta.T, log_l, fit.ci)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(len(loss), size=len(loss))
        try:
            _check_enough(form, n[idx], d[idx])
        except ScalingError:
            continue  # a degenerate resample (too few distinct sizes) says nothing about the fit
        # Start from the full fit: the bootstrap measures spread around it, not the start grid.
        th, _ = _solve(form, log_n[idx], log_d[idx], log_l[idx], [theta])
        boots.append(th)
    fit.resid = resid
    if boots:
        b = np.array(boots)
        fit.boot = np.where([k in ("E", "A", "B") for k in _NAMES[form]], np.exp(b), b)
        fit.n_boot = len(boots)
    return fit


SPAN_LIMIT = 10.0
"""A parameter whose interval spans more than this factor is not identified by the points."""


def _unidentified(form: str, theta: np.ndarray, ci_theta: np.ndarray, log_l: np.ndarray,
                  ci: dict[str, tuple[float, float]]) -> dict[str, str]:
    """Which parameters the points leave free, and why: the fit or its interval reaches a bound of
    the search (the data would take it further), or the interval spans more than SPAN_LIMIT x."""
    lo_b, hi_b = _bounds(form, log_l)
    tol = 1e-3 * (hi_b - lo_b)
    out = {}
    for i, k in enumerate(_NAMES[form]):
        lo, hi = ci[k]
        at_low = min(theta[i], ci_theta[0][i]) <= lo_b[i] + tol[i]
        if at_low or max(theta[i], ci_theta[1][i]) >= hi_b[i] - tol[i]:
            bound = lo_b[i] if at_low else hi_b[i]
            shown = math.exp(bound) if k in ("E", "A", "B") else bound
            out[k] = f"its interval reaches the search bound {shown:.3g}"
        elif lo <= 0 or hi / lo > SPAN_LIMIT:
            out[k] = f"its interval spans {hi / lo:.0f}x" if lo > 0 else "its interval reaches 0"
    return out


def predict_interval(fit: Fit, n: Any = None, d: Any = None, *, seed: int = 0,
                     method: Literal["linear-t", "bootstrap"] = "linear-t") -> tuple[float, float, float]:
    """(prediction, low, high) of a new measurement at one point, at fit.ci_level. linear-t: the
    linearised interval with Student's t (intervals.linear_prediction); bootstrap (what was used
    before, kept to compare): the bootstrap's fits at (n, d), each times a resampled residual
    inflated by sqrt(points / (points - parameters)) -- too narrow with few points."""
    pred = float(fit.predict(n, d))
    if method == "linear-t":
        if fit.logs is None:
            return pred, math.nan, math.nan
        theta, log_n, log_d, log_l = fit.logs
        at = [np.log(np.atleast_1d(np.asarray(x if x is not None else 1.0, dtype=float))) for x in (n, d)]
        grad = _jacobian(theta, fit.form, at[0], at[1], np.zeros(1))[0]
        half = linear_prediction(lambda th: _residuals(th, fit.form, log_n, log_d, log_l),
                                 lambda th: _jacobian(th, fit.form, log_n, log_d, log_l), theta, grad, fit.ci_level)
        return pred, pred * math.exp(-half), pred * math.exp(half)
    if fit.boot is None or fit.resid is None:
        return pred, math.nan, math.nan
    boot = fit.predict_samples(n, d).ravel()
    dof = max(fit.n_points - len(_NAMES[fit.form]), 1)
    resid = fit.resid * math.sqrt(fit.n_points / dof)
    rng = np.random.default_rng(seed)
    draws = boot * np.exp(rng.choice(resid, size=boot.size))
    q = (1 - fit.ci_level) / 2 * 100
    lo, hi = np.percentile(draws, [q, 100 - q])
    return pred, float(lo), float(hi)


def compute_optimal(fit: Fit, budget: float) -> dict[str, Any]:
    """Loss-minimising (N, D) with 6 N D = budget FLOPs, with bootstrap intervals when available."""
    if fit.form != "joint":
        raise ScalingError(f"a compute-optimal split needs the joint fit L(N, D); this is {fit.formula}")
    if not (budget > 0 and math.isfinite(budget)):
        raise ScalingError(f"budget must be a positive number of FLOPs, got {budget}")
    free = [k for k in ("alpha", "beta") if k in fit.unidentified]
    if free:
        why = "; ".join(f"{k}: {fit.unidentified[k]}" for k in free)
        raise ScalingError(f"no compute-optimal split: the exponents decide it and the points do not identify "
                           f"{' and '.join(free)} ({why})")

    def opt(e, a, alpha, b, beta):
        g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
        n_opt = g * (budget / 6) ** (beta / (alpha + beta))
        return n_opt, budget / 6 / n_opt

    p = fit.params
    n_opt, d_opt = opt(p["E"], p["A"], p["alpha"], p["B"], p["beta"])
    out: dict[str, Any] = {"budget": budget, "n_opt": float(n_opt), "d_opt": float(d_opt),
                           "loss_opt": float(fit.predict(n_opt, d_opt))}
    if fit.boot is not None:
        ns, ds = opt(*fit.boot.T)
        q = (1 - fit.ci_level) / 2 * 100
        out["n_opt_ci"] = tuple(float(x) for x in np.percentile(ns, [q, 100 - q]))
        out["d_opt_ci"] = tuple(float(x) for x in np.percentile(ds, [q, 100 - q]))
    return out
