"""Scaling-law fitter: recovery of planted laws, bootstrap intervals, refusals, the results table and
the written report (PNG / JSON / markdown)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

# conftest gives each session a fresh HOME; keep matplotlib's font cache in the repo's ignored .cache
# so it is built once, not per session (seconds on a loaded 2-core machine).
os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parents[2] / ".cache" / "matplotlib"))

from e2e_dist import storage  # noqa: E402
from e2e_dist.errors import UserError  # noqa: E402
from e2e_dist.sweep.scaling import (
    ScalingError,
    compute_optimal,
    fit_points,
    fit_scaling,
    load_results,
    scaling_report,
)

# A byte-level LM's plausible law: entropy floor E ~0.8 nats/byte, exponents like Chinchilla's.
TRUE = {"E": 0.8, "A": 38.0, "alpha": 0.35, "B": 95.0, "beta": 0.3}


def law(n, d, p=TRUE):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


def joint_points(k: int = 12, seed: int = 0, noise: float = 0.01):
    """k x k grid, N 1e4..1e7, D 1e6..1e9, multiplicative Gaussian noise of 1%."""
    rng = np.random.default_rng(seed)
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e4, 1e7, k), np.geomspace(1e6, 1e9, k)))
    return n, d, law(n, d) * (1 + noise * rng.standard_normal(n.size))


def data_points(k: int = 60, seed: int = 0, noise: float = 0.01):
    """One model (the A/N term folded into E), k data sizes over 1e6..1e9, 1% noise."""
    rng = np.random.default_rng(seed)
    d = np.geomspace(1e6, 1e9, k)
    return np.full(k, 3e5), d, (TRUE["E"] + TRUE["B"] / d ** TRUE["beta"]) * (1 + noise * rng.standard_normal(k))


def test_joint_fit_recovers_planted_law_with_covering_intervals() -> None:
    fit = fit_scaling(*joint_points(), n_boot=200, seed=0)
    assert fit.form == "joint" and fit.n_points == 144 and fit.n_boot == 200
    for k in ("E", "alpha", "beta"):
        assert abs(fit.params[k] / TRUE[k] - 1) < 0.05, (k, fit.params[k])
    for k, v in TRUE.items():
        lo, hi = fit.ci[k]
        assert lo <= v <= hi, (k, fit.ci[k])
        assert lo <= fit.params[k] <= hi
    assert 0.005 < fit.rmse_log < 0.015  # the planted 1% noise, seen in log space


def test_data_fit_recovers_planted_law_with_covering_intervals() -> None:
    fit = fit_scaling(*data_points(), n_boot=200, seed=0)
    assert fit.form == "data" and set(fit.params) == {"E", "B", "beta"}
    for k in ("E", "beta"):
        assert abs(fit.params[k] / TRUE[k] - 1) < 0.05, (k, fit.params[k])
    for k in ("E", "B", "beta"):
        assert fit.ci[k][0] <= TRUE[k] <= fit.ci[k][1], (k, fit.ci[k])


def test_noise_free_points_are_fitted_exactly_and_bootstrap_is_seeded() -> None:
    n, d, loss = joint_points(k=5, noise=0.0)
    fit = fit_scaling(n, d, loss, n_boot=20, seed=1)
    for k, v in TRUE.items():
        assert fit.params[k] == pytest.approx(v, rel=1e-3)
    n, d, loss = joint_points(k=5)
    a, b, c = (fit_scaling(n, d, loss, n_boot=30, seed=s).ci for s in (7, 7, 8))
    assert a == b and a != c


def test_params_form_and_wide_intervals_from_few_points() -> None:
    n = np.geomspace(1e4, 1e7, 6)
    fit = fit_scaling(n, np.full(6, 1e8), TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"], n_boot=20)
    assert fit.form == "params" and fit.params["alpha"] == pytest.approx(0.35, rel=1e-3)


def test_compute_optimal_matches_numerical_minimum_on_the_budget_line() -> None:
    fit = fit_scaling(*joint_points(k=6), n_boot=50)
    budget = 1e17
    opt = compute_optimal(fit, budget)
    assert 6 * opt["n_opt"] * opt["d_opt"] == pytest.approx(budget)
    res = minimize_scalar(lambda ln: float(fit.predict(np.exp(ln), budget / 6 / np.exp(ln))),
                          bounds=(np.log(1e3), np.log(1e14)), method="bounded", options={"xatol": 1e-10})
    assert opt["n_opt"] == pytest.approx(np.exp(res.x), rel=1e-3)
    assert opt["loss_opt"] == pytest.approx(res.fun, rel=1e-6)
    assert opt["n_opt_ci"][0] <= opt["n_opt"] <= opt["n_opt_ci"][1]
    with pytest.raises(ScalingError, match="positive number of FLOPs"):
        compute_optimal(fit, -1.0)
    with pytest.raises(ScalingError, match="needs the joint fit"):
        compute_optimal(fit_scaling(*data_points(k=8), n_boot=0), budget)


@pytest.mark.parametrize("points,expected", [
    ((np.geomspace(1e4, 1e6, 5), np.geomspace(1e6, 1e8, 5)), "5 free parameters: needs at least 6 finished trials, got 5"),
    ((np.full(3, 1e5), np.geomspace(1e6, 1e8, 3)), "3 free parameters: needs at least 4 finished trials, got 3"),
    ((np.full(6, 1e5), np.array([1e6, 1e6, 1e6, 1e7, 1e7, 1e7])), "needs at least 3 distinct D (data sizes), got 2"),
    ((np.array([1e4, 1e5] * 4), np.geomspace(1e6, 1e8, 8)), "needs at least 3 distinct N (model sizes), got 2"),
    ((np.full(6, 1e5), np.full(6, 1e7)), "all trials have the same N and D"),
    ((np.array([]), np.array([])), "no finished trials"),
])
def test_too_few_points_is_refused_with_one_line(points, expected) -> None:
    n, d = points
    with pytest.raises(UserError) as err:
        fit_scaling(n, d, law(n, d) if len(n) else [], n_boot=0)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ScalingError, match="loss must be finite and > 0"):
        fit_scaling([1e4, 1e5, 1e6, 1e7], [1e6] * 4, [2.0, float("nan"), 1.5, 1.2])


# ----------------------------------------------------------------------------- results / report
def write_results(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def grid_rows(k: int = 4, seed: int = 0) -> list[dict]:
    n, d, loss = joint_points(k=k, seed=seed)
    rows = [{"trial": f"g-t{i:03d}-abcdef", "status": "completed", "params": {"i": i},
             "metrics": {"val_loss": float(l), "n_params_non_embedding": int(a), "tokens_seen": int(b),
                         "train_tokens": 4_000_000_000}}
            for i, (a, b, l) in enumerate(zip(n, d, loss))]
    # A trial ASHA stopped early and one that failed: neither enters the fit.
    rows.append({"trial": "g-t099-000000", "status": "stopped", "params": {}, "metrics": {"val_loss": 9.0}})
    rows.append({"trial": "g-t100-000000", "status": "error", "params": {}, "metrics": {}})
    return rows


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_png_json_md_next_to_results(tmp_path: Path) -> None:
    sweep = write_results(tmp_path / "runs" / "g", grid_rows())
    report = scaling_report(str(sweep), budget=1e18, n_boot=50)
    assert report["form"] == "joint" and report["n_points"] == 16 and report["d_key"] == "tokens_seen"
    png = (sweep / "scaling_fit.png").read_bytes()
    w, h = png_size(png)
    assert w > 800 and h > 400 and len(png) > 20_000  # two panels with points and curves, not a blank
    assert report["png"] == str(sweep / "scaling_fit.png") and report["png_local"] == str(sweep.resolve() / "scaling_fit.png")
    saved = json.loads((sweep / "scaling_fit.json").read_text())
    assert saved["params"] == pytest.approx(report["params"]) and len(saved["points"]) == 16
    assert saved["optimal"]["budget"] == 1e18 and saved["optimal"]["n_opt"] > 0
    md = (sweep / "scaling_fit.md").read_text()
    assert "| alpha |" in md and "Compute-optimal" in md and "g-t015-abcdef" in md and "g-t099" not in md
    for line in ("alpha", "beta", "compute-optimal for C = 1e+18"):
        assert line in report["summary"]


def test_report_data_ablation_uses_subset_size_and_custom_out(tmp_path: Path) -> None:
    n, d, loss = data_points(k=6)
    rows = [{"trial": f"a-t{i:03d}-abcdef", "status": "completed", "params": {"data.fraction": f},
             "metrics": {"val_loss": float(l), "n_params_non_embedding": 394496, "tokens_seen": 614400,
                         "train_tokens": int(b)}}
            for i, (f, b, l) in enumerate(zip([1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1], d, loss))]
    sweep = write_results(tmp_path / "a", rows)
    report = scaling_report(str(sweep / "results.jsonl"), budget=1e18, out_uri=str(tmp_path / "out"), n_boot=20)
    # Same steps for every trial: tokens_seen is constant, so D is the training subset's size.
    assert report["form"] == "data" and report["d_key"] == "train_tokens"
    assert report["optimal"] is None and "needs L(N, D)" in report["note"]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"scaling_fit.png", "scaling_fit.json", "scaling_fit.md"}
    assert png_size((tmp_path / "out" / "scaling_fit.png").read_bytes())[0] > 500


@pytest.mark.parametrize("content,expected", [
    ('{"trial": "t", "status": "completed", "params": {}, "metrics": {}}\nnot json\n', "line 2: not valid JSON"),
    ('{"trial": "t", "status": "completed", "metrics": {}}\n', "line 1: params missing or not a dict"),
    ('{"trial": "t", "status": "TERMINATED", "params": {}, "metrics": {}}\n', "status 'TERMINATED' is not one of"),
    ("[1, 2]\n", "line 1: expected an object"),
])
def test_bad_results_lines_are_one_clear_line(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "results.jsonl").write_text(content)
    with pytest.raises(ScalingError) as err:
        load_results(str(tmp_path))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_results_missing_fields_and_files(tmp_path: Path) -> None:
    with pytest.raises(ScalingError, match="results not found"):
        load_results(str(tmp_path / "nope"))
    rows = grid_rows(k=3)
    del rows[1]["metrics"]["n_params_non_embedding"]
    with pytest.raises(ScalingError, match="trial g-t001-abcdef: metrics.n_params_non_embedding missing"):
        fit_points(load_results(str(write_results(tmp_path / "m", rows))))
    rows = [r for r in grid_rows(k=3) if r["status"] == "completed"]
    for r in rows:
        del r["metrics"]["tokens_seen"], r["metrics"]["train_tokens"]
    with pytest.raises(ScalingError, match="none of tokens_seen, samples_seen"):
        fit_points(load_results(str(write_results(tmp_path / "d", rows))))
    only_failed = [r for r in grid_rows(k=3) if r["status"] != "completed"]
    with pytest.raises(ScalingError, match="no completed trials among 2"):
        fit_points(load_results(str(write_results(tmp_path / "f", only_failed))))


def test_report_from_and_to_s3(s3_bucket: str) -> None:
    """Results in a bucket (moto over HTTP, endpoint from AWS_ENDPOINT_URL): the report lands next to them."""
    sweep = f"{s3_bucket}/runs/g"
    storage.write_text(f"{sweep}/results.jsonl", "".join(json.dumps(r) + "\n" for r in grid_rows()))
    report = scaling_report(sweep, n_boot=10)
    assert report["png"] == f"{sweep}/scaling_fit.png" and report["n_points"] == 16
    stored = storage.read_bytes(report["png"])
    assert stored == Path(report["png_local"]).read_bytes() and png_size(stored)[0] > 800
    assert json.loads(storage.read_text(report["json"]))["params"] == pytest.approx(report["params"])
    assert "| alpha |" in storage.read_text(report["md"])
    with pytest.raises(ScalingError, match=f"results not found: {s3_bucket}/nope/results.jsonl"):
        load_results(f"{s3_bucket}/nope")
