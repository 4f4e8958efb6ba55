"""`e2e-dist scaling`: fit a finished sweep, say what the fit does not know, check it on held-out
trials, predict, and write scaling_fit.{png,json,md}.

A fit is only as good as the question the sweep asked: a parameter whose profile-t interval reaches
a bound of the search or spans more than 10x is flagged (text, JSON `warnings`, plot title), and a
compute-optimal split is refused when it would rest on such an exponent. `--holdout` fits without
one trial and reports how far the prediction for it lands from its measurement; `--predict` gives
the law's value with an interval anywhere else.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from e2e_dist import storage
from e2e_dist.config import redact
from e2e_dist.sweep.isoflop import isoflop_analysis, isoflop_lines
from e2e_dist.sweep.results import SPEC_FILE, fit_points, load_results, results_file, still_learning
from e2e_dist.sweep.scaling import (Fit, ScalingError, compute_optimal, detect_form, fit_scaling, fmt,
                                     predict_interval)

_NEEDS = {"joint": ("N", "D"), "data": ("D",), "params": ("N",)}


def parse_point(text: str) -> dict[str, float]:
    """`N=1e6,D=2e7` (either may be left out when the law has no such term) -> {"N": 1e6, "D": 2e7}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().upper()
        if not sep or key not in ("N", "D"):
            raise ScalingError(f"--predict {text!r}: expected N=<parameters>,D=<tokens or samples>, got {part!r}")
        try:
            v = float(value)
        except ValueError:
            raise ScalingError(f"--predict {text!r}: {key}={value.strip()!r} is not a number") from None
        if not (v > 0 and math.isfinite(v)):
            raise ScalingError(f"--predict {text!r}: {key} must be a positive number")
        out[key] = v
    return out


def pick_holdout(which: str, names: list[str], n: np.ndarray, d: np.ndarray, form: str) -> int:
    """Index of the held-out trial: `largest` (largest D, N, or N*D for the joint law) or a trial name."""
    if which == "largest":
        return int(np.argmax({"data": d, "params": n}.get(form, n * d)))
    if which in names:
        return names.index(which)
    raise ScalingError(f"--holdout {which!r}: not a completed trial of this sweep (give 'largest' or a trial "
                       f"name, e.g. {names[0]})")


def _predicted(fit: Fit, point: dict[str, float], n_fit: np.ndarray, d_fit: np.ndarray) -> dict[str, Any]:
    pred, lo, hi = predict_interval(fit, point.get("N"), point.get("D"))
    out = {"N": point.get("N"), "D": point.get("D"), "predicted": pred, "interval": [lo, hi]}
    beyond = [f"{k} {point[k] / v.max():.3g}x the largest fitted" for k, v in (("N", n_fit), ("D", d_fit))
              if k in _NEEDS[fit.form] and point[k] > v.max() * 1.001]
    out["extrapolation"] = "; ".join(beyond) or None
    return out


def scaling_report(results_uri: str, budget: float | None = None, out_uri: str | None = None, *,
                   holdout: str | None = None, predict: list[str] | None = None, metric: str = "val_loss",
                   d_key: str = "auto", n_boot: int = 200, seed: int = 0, storage_cfg: Any = None) -> dict[str, Any]:
    """Fit a finished sweep's results, write scaling_fit.{png,json,md} (next to the results unless
    `out_uri`), and return the report: `summary` (print-ready text), `formula`, `params`, `ci`,
    `warnings` (unidentified parameters; for L(D), trials still learning when they ended),
    `still_learning` (trial -> when its best evaluation came), `optimal` (None without a budget, without the joint form or
    with unidentified exponents; `note` says why), `holdout` (the held-out trial: measured, predicted,
    interval, error), `predictions` (one per `predict` point), `isoflop` (approach 2 when the points
    are an isoFLOP design), `points`, the written URIs `png`/`json`/`md`, and `png_local`, a local file
    of the plot (for wandb.Image). `d_key`: which metric is D (see `results.fit_points`)."""
    from e2e_dist.sweep import plot  # matplotlib only when a report is made

    uri = results_file(results_uri)
    rows = load_results(uri, storage_cfg)
    names, n, d, loss, d_used = fit_points(rows, metric, d_key)
    points = [parse_point(p) for p in predict or []]
    form = detect_form(n, d)
    keep = np.ones(len(names), dtype=bool)
    if holdout is not None:
        keep[pick_holdout(holdout, names, n, d, form)] = False
    try:
        fit = fit_scaling(n[keep], d[keep], loss[keep], form, n_boot=n_boot, seed=seed)
    except ScalingError as e:
        raise ScalingError(f"{e} (after holding out {holdout})" if holdout else str(e)) from None
    for p in points:
        missing = [k for k in _NEEDS[fit.form] if k not in p]
        if missing:
            raise ScalingError(f"--predict: {fit.formula} needs {' and '.join(missing)}")
    optimal, note = _optimal(fit, budget)
    # L(D) asks what each amount of data supports: a trial still learning at its end answers what
    # its steps allowed instead (the compute floor), and a law through it describes that compute.
    learning = still_learning(rows, names) if fit.form == "data" else {}
    held = _held_out(fit, names, n, d, loss, keep, learning) if holdout is not None else None
    warnings = _warnings(fit, names, d, learning)
    report: dict[str, Any] = {
        "results": redact(uri), "metric": metric, "d_key": d_used, "formula": fit.formula, "form": fit.form,
        "params": fit.params, "ci": {k: list(v) for k, v in fit.ci.items()}, "ci_level": fit.ci_level,
        "n_points": fit.n_points, "n_boot": fit.n_boot, "seed": seed, "rmse_log": fit.rmse_log,
        "warnings": warnings, "still_learning": learning, "optimal": optimal, "note": note, "holdout": held,
        "predictions": [_predicted(fit, p, n[keep], d[keep]) for p in points],
        "isoflop": isoflop_analysis(n[keep], d[keep], loss[keep]) if fit.form == "joint" else None,
        "points": [{"trial": t, "N": a, "D": b, "loss": c, "fit": float(fit.predict(a, b)), "held_out": not k}
                   for t, a, b, c, k in zip(names, n.tolist(), d.tolist(), loss.tolist(), keep.tolist())],
    }
    report["summary"] = summary_text(report)
    out_dir = out_uri.rstrip("/") if out_uri else (uri.rsplit("/", 1)[0] if "/" in uri else ".")

    def draw(path: Path) -> None:
        plot.plot_fit(fit, n, d, loss, path, held_out=~keep, optimal=optimal, d_label=d_used, metric=metric,
                      still_learning=np.array([t in learning for t in names]))

    _write_report(report, out_dir, draw, storage_cfg)
    return report


def _optimal(fit: Fit, budget: float | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the compute-optimal split at `budget`, or None and why not)."""
    if budget is None:
        return None, None
    if fit.form != "joint":
        return None, f"no compute-optimal split: it needs L(N, D), and this sweep only fits {fit.formula}"
    try:
        return compute_optimal(fit, budget), None
    except ScalingError as e:
        return None, str(e)


def _held_out(fit: Fit, names: list[str], n: np.ndarray, d: np.ndarray, loss: np.ndarray, keep: np.ndarray,
              learning: dict[str, Any]) -> dict[str, Any]:
    """The held-out trial: measured, predicted by the fit of the others, interval, error."""
    i = int(np.flatnonzero(~keep)[0])
    held = {"trial": names[i], "measured": float(loss[i]),
            **_predicted(fit, {"N": float(n[i]), "D": float(d[i])}, n[keep], d[keep])}
    held["error"] = held["predicted"] / held["measured"] - 1
    held["inside"] = bool(held["interval"][0] <= held["measured"] <= held["interval"][1])
    held["still_learning"] = learning.get(held["trial"])
    return held


def _warnings(fit: Fit, names: list[str], d: np.ndarray, learning: dict[str, Any]) -> list[str]:
    warnings = [f"{k} is not identified by these points: {why}" for k, why in fit.unidentified.items()]
    if learning:
        warnings.append(f"{len(learning)} of {len(names)} trials were still learning when they ended (best "
                        f"evaluation in the last fifth of their steps: "
                        + "D = " + ", ".join(fmt(float(d[names.index(t)])) for t in learning)
                        + "): their loss is what their steps allowed, not what their data supports; "
                        "give the trials more steps to measure L(D) there")
    return warnings


def _write_report(report: dict[str, Any], out_dir: str, draw, storage_cfg: Any) -> None:
    """scaling_fit.{png,md,json} into out_dir; their URIs, and png_local (a local copy for W&B), into report."""
    report.update(png=storage.join(out_dir, "scaling_fit.png"), json=storage.join(out_dir, "scaling_fit.json"),
                  md=storage.join(out_dir, "scaling_fit.md"))
    # Render locally (W&B logs a local file), then store the copy next to the results.
    png_local = Path(tempfile.mkdtemp(prefix="e2e-dist-scaling-")) / "scaling_fit.png"
    draw(png_local)
    storage.write_bytes(report["png"], png_local.read_bytes(), storage_cfg)
    if not storage.is_s3(out_dir):  # the stored file is local already: no second copy
        shutil.rmtree(png_local.parent)
        png_local = Path(storage.resolve(report["png"], storage_cfg)[1])
    report["png_local"] = str(png_local)
    storage.write_text(report["md"], summary_markdown(report), storage_cfg)
    storage.write_text(report["json"], json.dumps({k: v for k, v in report.items() if k not in ("summary", "png_local")},
                                                  indent=2), storage_cfg)


# ------------------------------------------------------------------------------------- verb
def scaling_cli(args) -> int:
    """`e2e-dist scaling SWEEP_DIR|results.jsonl [--budget C] [--holdout largest|TRIAL] [--predict N=..,D=..]
    [--endpoint-url U]`: fit, print, plot, and log the plot to W&B (a `<sweep>-scaling` run in the
    sweep's group) when tracking is on."""
    from e2e_dist.config import StorageConfig

    storage_cfg = StorageConfig(path=args.results_uri, endpoint_url=getattr(args, "endpoint_url", None))
    record = _sweep_record(args.results_uri, storage_cfg)
    # The sweep's own target (a data ablation optimizes val_loss_best) unless told otherwise.
    metric = getattr(args, "metric", None) or (record["sweep"].get("metric") if record else None) or "val_loss"
    report = scaling_report(args.results_uri, budget=args.budget, holdout=getattr(args, "holdout", None),
                            predict=getattr(args, "predict", None), metric=metric, storage_cfg=storage_cfg)
    print(report["summary"])
    print(f"plot: {redact(report['png'])}\nsummary: {redact(report['md'])}, {redact(report['json'])}")
    where = log_scaling_to_wandb(args.results_uri, report, storage_cfg, record)
    if where:
        print(f"W&B: {where}")
    return 0


def _spec_uri(results_uri: str) -> str:
    """The sweep.json next to a sweep's results (its spec and base run)."""
    return storage.join(results_file(results_uri).rsplit("/", 1)[0], SPEC_FILE)


def _sweep_record(results_uri: str, storage_cfg) -> dict[str, Any] | None:
    """The sweep's sweep.json, or None (a bare results file)."""
    spec_uri = _spec_uri(results_uri)
    return json.loads(storage.read_text(spec_uri, storage_cfg)) if storage.exists(spec_uri, storage_cfg) else None


def log_scaling_to_wandb(results_uri: str, report: dict[str, Any], storage_cfg, record: dict[str, Any] | None) -> str | None:
    """Log the fit (plot in the summary, parameters, intervals) as the W&B run `<sweep>-scaling`,
    grouped with the sweep's trials and with their tracking settings (from sweep.json, `record`).
    Returns where the run is, or None when the sweep has no sweep.json or tracking is off."""
    from e2e_dist.config import validate_run_config
    from e2e_dist.tracking import Tracker, resolve_mode
    from e2e_dist.tracking.run_location import discard_offline_run

    if record is None:
        return None
    spec_uri = _spec_uri(results_uri)
    sweep_dir = spec_uri.rsplit("/", 1)[0]
    name = record["sweep"]["name"]
    base = dict(record["base"])
    base["name"] = f"{name}-scaling"
    base["tracking"] = {**(base.get("tracking") or {}), "group": name}
    base["storage"] = {**(base.get("storage") or {}), "path": sweep_dir}
    if storage_cfg.endpoint_url:
        base["storage"]["endpoint_url"] = storage_cfg.endpoint_url
    cfg = validate_run_config(base, spec_uri)
    if resolve_mode(cfg) == "disabled":
        return None
    fit = {k: report[k] for k in ("formula", "form", "params", "ci", "ci_level", "n_points", "rmse_log", "d_key",
                                  "metric", "optimal", "note", "warnings", "still_learning", "holdout", "predictions",
                                  "isoflop")}
    if resolve_mode(cfg) == "offline":  # a new fit replaces the last one: one folder, not one per call
        discard_offline_run(cfg)
    tracker = Tracker.start(cfg, rank=0, resume_step=None, extra_config={"scaling": fit})
    with tracker:
        tracker.log_image("scaling/fit", report["png_local"])
        held = report["holdout"]
        tracker.log_summary({f"scaling/{k}": v for k, v in report["params"].items()}
                            | {"scaling/n_points": report["n_points"], "scaling/rmse_log": report["rmse_log"],
                               "scaling/unidentified": len(_flagged(report)),
                               "scaling/still_learning": len(report.get("still_learning") or {})}
                            | ({"scaling/holdout_error": held["error"]} if held else {}))
        return tracker.describe()


# ------------------------------------------------------------------------------------ text
def _flagged(report: dict[str, Any]) -> set[str]:
    """The parameters a warning says are not identified (other warnings name no parameter)."""
    return {w.split(" ", 1)[0] for w in report["warnings"]} & set(report["params"])


def _interval(iv: list[float]) -> str:
    return f"[{fmt(iv[0])}, {fmt(iv[1])}]" if not any(math.isnan(x) for x in iv) else "[no interval]"


def _prediction_line(p: dict[str, Any], metric: str) -> str:
    where = ", ".join(f"{k} = {fmt(p[k])}" for k in ("N", "D") if p.get(k) is not None)
    out = f"predicted {metric} at {where}: {fmt(p['predicted'])} {_interval(p['interval'])}"
    return out + (f" (extrapolating: {p['extrapolation']})" if p.get("extrapolation") else "")


def _holdout_line(h: dict[str, Any], pct: int) -> str:
    inside = f"inside the {pct}% interval" if h["inside"] else f"OUTSIDE the {pct}% interval"
    learning = (f" (it was still learning when it ended, {h['still_learning']}: its loss measures its "
                f"steps, not its data)") if h.get("still_learning") else ""
    return (f"held out {h['trial']}: measured {h['measured']:.4f}, predicted {h['predicted']:.4f} "
            f"{_interval(h['interval'])}, error {h['error']:+.2%}, {inside}{learning}")


def summary_text(report: dict[str, Any]) -> str:
    """Print-ready summary of a report made by `scaling_report`."""
    pct = int(round(report["ci_level"] * 100))
    lines = [f"{report['formula']}  fitted to {report['n_points']} completed trials "
             f"(D = {report['d_key']}, log-RMSE {report['rmse_log']:.2%}; {pct}% profile-t intervals, prediction "
             f"intervals linearised with Student's t)"]
    flagged = _flagged(report)
    for k, v in report["params"].items():
        ci = report["ci"].get(k)
        lines.append(f"  {k:<6}= {fmt(v):>9}" + (f"   {pct}% CI {_interval(ci)}" if ci else "")
                     + ("   NOT IDENTIFIED" if k in flagged else ""))
    lines += [f"warning: {w}" for w in report["warnings"]]
    if flagged:
        lines.append("warning: read nothing into the flagged values; widen the range of the varied size or add trials")
    opt = report.get("optimal")
    if opt:
        lines.append(f"compute-optimal for C = {opt['budget']:.3g} FLOPs (C = 6 N D): N = {fmt(opt['n_opt'])}"
                     + (f" {_interval(opt['n_opt_ci'])}" if "n_opt_ci" in opt else "")
                     + f", D = {fmt(opt['d_opt'])}" + (f" {_interval(opt['d_opt_ci'])}" if "d_opt_ci" in opt else "")
                     + f", predicted {report['metric']} {fmt(opt['loss_opt'])}")
    if report.get("note"):
        lines.append(report["note"])
    if report.get("isoflop"):
        lines += isoflop_lines(report["isoflop"])
    if report.get("holdout"):
        lines.append(_holdout_line(report["holdout"], pct))
    lines += [_prediction_line(p, report["metric"]) for p in report.get("predictions") or []]
    return "\n".join(lines)


def summary_markdown(report: dict[str, Any]) -> str:
    """The summary as markdown: fitted values, checks, the compute-optimal split, every point and its fit."""
    pct = int(round(report["ci_level"] * 100))
    out = [f"# Scaling fit: `{report['formula']}`", "",
           f"Results: `{report['results']}` — {report['n_points']} completed trials fitted, N = non-embedding "
           f"parameters, D = `{report['d_key']}`, loss = `{report['metric']}`. Huber fit in log space; "
           f"{pct}% profile-t intervals (prediction intervals linearised, Student's t); the plot's band from "
           f"{report['n_boot']} bootstrap refits (seed {report['seed']}); "
           f"log-RMSE {report['rmse_log']:.2%}.", "",
           f"| parameter | fit | {pct}% CI | identified |", "|---|---|---|---|"]
    flagged = _flagged(report)
    for k, v in report["params"].items():
        ci = report["ci"].get(k)
        out.append(f"| {k} | {fmt(v)} | " + (_interval(ci) if ci else "—") + f" | {'**no**' if k in flagged else 'yes'} |")
    out += [""] + [f"- **warning**: {w}" for w in report["warnings"]]
    if report.get("optimal"):
        opt = report["optimal"]
        out += ["", f"**Compute-optimal for C = {opt['budget']:.3g} FLOPs** (C = 6·N·D): N = {fmt(opt['n_opt'])}, "
                    f"D = {fmt(opt['d_opt'])}, predicted {report['metric']} {fmt(opt['loss_opt'])}."]
    for extra in ([report.get("note")] + (isoflop_lines(report["isoflop"]) if report.get("isoflop") else [])
                  + ([_holdout_line(report["holdout"], pct)] if report.get("holdout") else [])
                  + [_prediction_line(p, report["metric"]) for p in report.get("predictions") or []]):
        if extra:
            out += ["", extra]
    out += ["", "| trial | N | D | loss | fit |", "|---|---|---|---|---|"]
    learning = report.get("still_learning") or {}
    out += [f"| {p['trial']}{' (held out)' if p['held_out'] else ''}{' (still learning)' if p['trial'] in learning else ''}"
            f" | {fmt(p['N'])} | {fmt(p['D'])} | "
            f"{p['loss']:.4f} | {p['fit']:.4f} |" for p in report["points"]]
    out += ["", "![scaling fit](scaling_fit.png)", ""]
    return "\n".join(out)
