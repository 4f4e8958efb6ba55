"""Scaling-law fits of a finished sweep: L(N, D) = E + A/N^alpha + B/D^beta, and its one-variable forms.

N counts non-embedding parameters, D training tokens (or samples). The fit follows Chinchilla's
recipe: in log space, log L = logsumexp(e, a - alpha log N, b - beta log D) with E = exp(e),
A = exp(a), B = exp(b), minimising a Huber loss of the log residuals (robust to an odd trial,
well conditioned whatever the magnitudes) from a grid of starts, under bounds. Confidence intervals
come from a seeded bootstrap (resample points, refit from the best fit). The compute-optimal
split of a budget C ~ 6 N D has a closed form:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta))

## The results table a sweep writes: `<storage>/<sweep name>/results.jsonl`
One JSON object per line, one line per finished trial (the Tuner appends them):

    {"trial": "scaling-grid-t003-1a2b3c",          # the trial's run name
     "status": "completed",                        # completed | stopped (scheduler) | error
     "params": {"model.d_model": 64, ...},         # the swept values (flat dotted keys)
     "metrics": {"val_loss": 1.93,                 # final value of the target metric
                 "n_params_non_embedding": 98944,  # N
                 "tokens_seen": 505856,            # D: training tokens consumed (text) ...
                 "samples_seen": 3952,             # ... or samples (vision, speech)
                 "train_tokens": 4000000,          # optional: tokens in the training subset
                 "train_samples": 31250}}          # optional: samples in the training subset

Extra keys are allowed and ignored. Only `completed` trials enter the fit (a trial stopped early
by ASHA reports a loss of an unfinished schedule).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_origin

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from scipy.optimize import least_squares, nnls
from scipy.special import logsumexp, softmax

from e2e_dist import storage
from e2e_dist.config import redact
from e2e_dist.errors import UserError

RESULTS_FILE = "results.jsonl"
STATUSES = ("completed", "stopped", "error")
D_KEYS = ("tokens_seen", "samples_seen", "train_tokens", "train_samples")
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


class ScalingError(UserError):
    """The results cannot be fitted (too few points, missing fields, bad values)."""


@dataclass
class Fit:
    form: Form
    """joint: L(N, D); data: L(D) (one model, several data sizes); params: L(N) (one data size)."""
    params: dict[str, float]
    """Fitted E, A, alpha, B, beta (those of the form)."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap percentile interval of each parameter."""
    ci_level: float = 0.95
    n_points: int = 0
    n_boot: int = 0
    """Bootstrap refits that succeeded."""
    rmse_log: float = 0.0
    """Root-mean-square log residual of the fit (0.01 ~ 1% error)."""
    boot: np.ndarray | None = field(default=None, repr=False)
    """Bootstrap parameter samples (n_boot x len(params)), in the order of `_NAMES[form]`."""

    @property
    def formula(self) -> str:
        return _FORMULA[self.form]

    def predict(self, n: Any = None, d: Any = None) -> np.ndarray:
        p = self.params
        out = np.asarray(p["E"], dtype=float)
        if "A" in p:
            out = out + p["A"] / np.asarray(n, dtype=float) ** p["alpha"]
        if "B" in p:
            out = out + p["B"] / np.asarray(d, dtype=float) ** p["beta"]
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


def _detect_form(n: np.ndarray, d: np.ndarray) -> Form:
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
    form = form or _detect_form(n, d)
    _check_enough(form, n, d)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    theta, _ = _solve(form, log_n, log_d, log_l, _starts(form, n, d, loss))
    resid = _residuals(theta, form, log_n, log_d, log_l)
    fit = Fit(form=form, params=_to_params(theta, form), ci_level=ci_level, n_points=len(loss),
              rmse_log=float(np.sqrt(np.mean(resid**2))))
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
    if boots:
        b = np.array(boots)
        b_nat = np.where([k in ("E", "A", "B") for k in _NAMES[form]], np.exp(b), b)
        q = (1 - ci_level) / 2 * 100
        lo, hi = np.percentile(b_nat, [q, 100 - q], axis=0)
        fit.ci = {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(_NAMES[form])}
        fit.boot, fit.n_boot = b_nat, len(boots)
    return fit


def compute_optimal(fit: Fit, budget: float) -> dict[str, Any]:
    """Loss-minimising (N, D) with 6 N D = budget FLOPs, with bootstrap intervals when available."""
    if fit.form != "joint":
        raise ScalingError(f"a compute-optimal split needs the joint fit L(N, D); this is {fit.formula}")
    if not (budget > 0 and math.isfinite(budget)):
        raise ScalingError(f"budget must be a positive number of FLOPs, got {budget}")

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


# ------------------------------------------------------------------------------ results table
def _read_text(uri: str, storage_cfg: Any = None) -> str:
    if not storage.exists(uri, storage_cfg):
        raise ScalingError(f"results not found: {redact(uri)} (has the sweep finished a trial?)")
    return storage.read_text(uri, storage_cfg)


def results_file(results_uri: str) -> str:
    """`<sweep dir>/results.jsonl` for a sweep folder; a `.jsonl` URI is taken as it is."""
    return results_uri if results_uri.endswith(".jsonl") else storage.join(results_uri, RESULTS_FILE)


class ResultRow(BaseModel):
    """One line of results.jsonl (the schema in this module's docstring); extra keys are kept."""

    # strict: a row whose status is not a string or whose params are not an object was not written by
    # a sweep, and converting it would hide that.
    model_config = ConfigDict(strict=True, extra="allow")

    trial: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, Any]

    @model_validator(mode="after")
    def _known_status(self) -> ResultRow:
        # After the type checks, so a row missing fields reports those first.
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        return self


def _row_problem(err: ValidationError) -> str:
    """The first problem of a bad row, as one line that names the field."""
    first = err.errors(include_url=False)[0]
    loc, kind = first["loc"], first["type"]
    if kind == "json_invalid":
        return f"not valid JSON ({first['ctx']['error']})"
    if kind == "value_error":
        return str(first["ctx"]["error"])  # _known_status words its own message
    if not loc:
        return f"expected an object, got {type(first['input']).__name__}"
    wanted = ResultRow.model_fields[str(loc[0])].annotation
    return f"{loc[0]} missing or not a {(get_origin(wanted) or wanted).__name__}"


def load_results(results_uri: str, storage_cfg: Any = None) -> list[dict[str, Any]]:
    """Read a sweep's results table (a sweep folder or its results.jsonl; local or s3://), checked
    against the schema in this module's docstring; a bad line is one ScalingError naming it."""
    uri = results_file(results_uri)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(_read_text(uri, storage_cfg).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(ResultRow.model_validate_json(line).model_dump())
        except ValidationError as e:
            raise ScalingError(f"{redact(uri)} line {i}: {_row_problem(e)}") from None
    return rows


def fit_points(rows: list[dict[str, Any]], metric: str = "val_loss", d_key: str = "auto"):
    """(trial names, N, D, loss, d_key used) of the completed trials. `d_key` auto takes the first of
    D_KEYS that every trial reports and that varies (a data ablation with equal steps varies only
    train_tokens); if none varies, the first reported."""
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        raise ScalingError(f"no completed trials among {len(rows)} in the results")
    keys = [k for k in D_KEYS if all(k in r["metrics"] for r in done)] if d_key == "auto" else [d_key]
    if not keys:
        raise ScalingError(f"trials report none of {', '.join(D_KEYS)} in metrics: no data size D")
    varying = [k for k in keys if len({r["metrics"].get(k) for r in done}) > 1]
    d_key = (varying or keys)[0]
    cols = []
    for key in ("n_params_non_embedding", d_key, metric):
        col = []
        for r in done:
            v = r["metrics"].get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ScalingError(f"trial {r['trial']}: metrics.{key} missing or not a number (got {v!r})")
            col.append(float(v))
        cols.append(np.array(col))
    return [r["trial"] for r in done], cols[0], cols[1], cols[2], d_key


def scaling_report(results_uri: str, budget: float | None = None, out_uri: str | None = None, *,
                   metric: str = "val_loss", d_key: str = "auto", n_boot: int = 200, seed: int = 0,
                   storage_cfg: Any = None) -> dict[str, Any]:
    """Fit a finished sweep's results, write scaling_fit.{png,json,md} (next to the results unless
    `out_uri`), and return the report: `summary` (print-ready text), `formula`, `params`, `ci`,
    `optimal` (None without a budget or without the joint form; `note` says why), `points`, the
    written URIs `png`/`json`/`md`, and `png_local`, a local file of the plot (for wandb.Image).
    `d_key`: which metric is D (see `fit_points`)."""
    from e2e_dist.sweep import plot  # matplotlib only when a report is made

    uri = results_file(results_uri)
    names, n, d, loss, d_used = fit_points(load_results(uri, storage_cfg), metric, d_key)
    fit = fit_scaling(n, d, loss, n_boot=n_boot, seed=seed)
    optimal, note = None, None
    if budget is not None:
        if fit.form == "joint":
            optimal = compute_optimal(fit, budget)
        else:
            note = f"no compute-optimal split: it needs L(N, D), and this sweep only fits {fit.formula}"
    report: dict[str, Any] = {
        "results": redact(uri), "metric": metric, "d_key": d_used, "formula": fit.formula, "form": fit.form,
        "params": fit.params, "ci": {k: list(v) for k, v in fit.ci.items()}, "ci_level": fit.ci_level,
        "n_points": fit.n_points, "n_boot": fit.n_boot, "seed": seed, "rmse_log": fit.rmse_log,
        "optimal": optimal, "note": note,
        "points": [{"trial": t, "N": a, "D": b, "loss": c, "fit": float(fit.predict(a, b))}
                   for t, a, b, c in zip(names, n.tolist(), d.tolist(), loss.tolist())],
    }
    report["summary"] = plot.summary_text(report)
    out_dir = out_uri.rstrip("/") if out_uri else (uri.rsplit("/", 1)[0] if "/" in uri else ".")
    report.update(png=storage.join(out_dir, "scaling_fit.png"), json=storage.join(out_dir, "scaling_fit.json"),
                  md=storage.join(out_dir, "scaling_fit.md"))
    # Render locally (W&B logs a local file), then store the copy next to the results.
    png_local = Path(tempfile.mkdtemp(prefix="e2e-dist-scaling-")) / "scaling_fit.png"
    plot.plot_fit(fit, n, d, loss, png_local, optimal=optimal, d_label=d_used, metric=metric)
    storage.write_bytes(report["png"], png_local.read_bytes(), storage_cfg)
    if not storage.is_s3(out_dir):  # the stored file is local already: no second copy
        shutil.rmtree(png_local.parent)
        png_local = Path(storage.resolve(report["png"], storage_cfg)[1])
    report["png_local"] = str(png_local)
    storage.write_text(report["md"], plot.summary_markdown(report), storage_cfg)
    storage.write_text(report["json"], json.dumps({k: v for k, v in report.items() if k not in ("summary", "png_local")},
                                                  indent=2), storage_cfg)
    return report
