"""Confidence intervals of a scaling-law fit that hold their level with few points: profile-t.

A sweep has 4-12 points for 3-5 parameters. Resampling the points (the bootstrap the fitter used
before) then has almost nothing to resample: with 4 points its 95% percentile interval held a
planted exponent 13 times in 20, and most resamples of 4 points repeat one. The classical answer
for nonlinear least squares is the profile-t interval (Bates & Watts, Nonlinear Regression
Analysis, ch. 6): a value v of parameter k is inside when the best fit with k held at v is not
significantly worse than the best fit,

    (S(v) - S) / (S / (n - p)) <= t(n - p)^2        S = sum of squared log residuals,

Student's t with the residual degrees of freedom carries the uncertainty of the noise estimated
from the same few points (t(1) = 12.7 at 4 points and 3 parameters, 2.78 at 7), and profiling
instead of a linearised standard error follows the curved valley of the exponent. A planted
L(D) measured (`planted_coverage`) and the test in tests/sweep hold it to its nominal rate.

A prediction interval at a new point is the linearised (delta-method) one with the same t:
log L(x) +- t sqrt(s^2 (1 + g' (J'J)^-1 g)), g the gradient of log L(x), J the fit's Jacobian,
s^2 = S / (n - p): it covers a new measurement, not only the law.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.optimize import brentq, least_squares
from scipy.stats import t as student_t

Residuals = Callable[[np.ndarray], np.ndarray]
Jacobian = Callable[[np.ndarray], np.ndarray]


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile of `level` with `dof` degrees of freedom."""
    return float(student_t.ppf(0.5 + level / 2, max(dof, 1)))


def least_squares_fit(resid: Residuals, jac: Jacobian, x0: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Plain least squares from x0 (the intervals are those of the sum of squares; the point fit
    may be a robust one started nearby, and is the start)."""
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
    return least_squares(resid, x0, jac=jac, bounds=(lo, hi), x_scale="jac", max_nfev=2000).x


def profile_interval(resid: Residuals, jac: Jacobian, theta: np.ndarray, k: int, lo: np.ndarray, hi: np.ndarray,
                     level: float = 0.95) -> tuple[float, float]:
    """The profile-t interval of parameter k (in theta's units); a side that stays inside up to a
    bound of the search ends at that bound (the points do not pin it down there)."""
    n, p = resid(theta).size, theta.size
    s_min = float(np.sum(resid(theta) ** 2))
    dof = max(n - p, 1)
    # A perfect fit (s_min ~ 0) still has floating-point noise: a floor keeps the threshold finite.
    limit = s_min + t_quantile(level, dof) ** 2 * max(s_min, 1e-24 * n) / dof
    rest = [j for j in range(p) if j != k]

    def full(v: float, x: np.ndarray) -> np.ndarray:
        out = np.empty(p)
        out[k], out[rest] = v, x
        return out

    memo: dict[float, np.ndarray] = {}

    def excess(v: float, start: np.ndarray) -> float:
        """S at parameter k = v (the others refitted) minus the limit."""
        if p == 1:
            return float(np.sum(resid(np.array([v])) ** 2)) - limit
        x = least_squares_fit(lambda x: resid(full(v, x)), lambda x: jac(full(v, x))[:, rest], start, lo[rest], hi[rest])
        memo[v] = x
        return float(np.sum(resid(full(v, x)) ** 2)) - limit

    ends = []
    for direction, bound in ((-1, lo[k]), (1, hi[k])):
        inside, start = float(theta[k]), theta[rest]
        step = max(abs(theta[k]) * 0.02, 1e-3)
        found = None
        while True:  # walk out in growing steps until the sum of squares passes the limit
            v = float(np.clip(inside + direction * step, lo[k], hi[k]))
            if excess(v, start) > 0:
                found = v
                break
            if v == bound:
                break
            inside, start, step = v, memo.get(v, start), step * 1.6
        if found is None:
            ends.append(float(bound))
            continue
        warm = memo.get(inside, theta[rest])
        ends.append(float(brentq(lambda v: excess(v, warm), inside, found, xtol=1e-6 * max(1.0, abs(found)))))
    return ends[0], ends[1]


def profile_intervals(resid: Residuals, jac: Jacobian, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                      level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(theta of the least-squares fit started at theta, the profile-t intervals as rows (low, high))."""
    ls = least_squares_fit(resid, jac, theta, lo, hi)
    return ls, np.array([profile_interval(resid, jac, ls, k, lo, hi, level) for k in range(theta.size)])


def linear_prediction(resid: Residuals, jac: Jacobian, theta: np.ndarray, grad: np.ndarray, level: float = 0.95) -> float:
    """Half-width, in log-loss units, of the prediction interval of a new measurement at a point
    whose log-law gradient is `grad` (the module docstring)."""
    r, j = resid(theta), jac(theta)
    n, p = r.size, theta.size
    dof = max(n - p, 1)
    s2 = float(np.sum(r**2)) / dof
    cov = np.linalg.pinv(j.T @ j)  # pinv: a parameter at a bound leaves J'J singular
    return t_quantile(level, dof) * math.sqrt(s2 * (1.0 + float(grad @ cov @ grad)))
