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
from e2e_dist.sweep.results import fit_points, load_results  # noqa: E402
from e2e_dist.sweep.scaling import ScalingError, compute_optimal, fit_scaling, predict_interval  # noqa: E402
from e2e_dist.sweep.scaling_report import scaling_report  # noqa: E402

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
    a, b, c = (fit_scaling(n, d, loss, n_boot=30, seed=s) for s in (7, 7, 8))
    # The intervals (profile-t) do not resample; the bootstrap behind the plot's band is seeded.
    assert a.ci == c.ci and np.array_equal(a.boot, b.boot) and not np.array_equal(a.boot, c.boot)


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


# ------------------------------------------------------------------ what the fit does not know
# The shipped data ablation's first design, as measured: flat, not even monotone (issue 14).
FLAT_D = [40_600, 81_200, 162_000, 325_000, 650_000]
FLAT_LOSS = [2.664, 2.606, 2.573, 2.605, 2.576]


def data_rows(d, loss, n=394_496) -> list[dict]:
    return [{"trial": f"a-t{i:03d}-abcdef", "status": "completed", "params": {"i": i},
             "metrics": {"val_loss": float(v), "n_params_non_embedding": n, "tokens_seen": int(b)}}
            for i, (b, v) in enumerate(zip(d, loss))]


def test_a_flat_ablation_is_flagged_and_says_so_everywhere(tmp_path: Path) -> None:
    fit = fit_scaling(np.full(5, 394_496), FLAT_D, FLAT_LOSS, n_boot=60)
    assert "beta" in fit.unidentified and "E" in fit.unidentified, fit.unidentified
    report = scaling_report(str(write_results(tmp_path / "flat", data_rows(FLAT_D, FLAT_LOSS))), n_boot=60)
    assert any(w.startswith("beta is not identified") for w in report["warnings"]), report["warnings"]
    assert "NOT IDENTIFIED" in report["summary"] and "warning: beta is not identified" in report["summary"]
    saved = json.loads((tmp_path / "flat" / "scaling_fit.json").read_text())
    assert saved["warnings"] == report["warnings"]
    assert "| beta |" in (md := (tmp_path / "flat" / "scaling_fit.md").read_text()) and "**no**" in md


def test_a_well_sampled_law_has_no_warnings() -> None:
    assert fit_scaling(*joint_points(k=8), n_boot=40).unidentified == {}
    assert fit_scaling(*data_points(k=30), n_boot=40).unidentified == {}


def test_no_compute_optimal_split_from_unidentified_exponents(tmp_path: Path) -> None:
    """Model sizes over three decades but D over a factor 1.2: beta is free, and so is the split."""
    rng = np.random.default_rng(3)
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e4, 1e7, 6), [1.0e8, 1.1e8, 1.2e8]))
    loss = law(n, d) * (1 + 0.01 * rng.standard_normal(n.size))
    fit = fit_scaling(n, d, loss, n_boot=40)
    assert "beta" in fit.unidentified and "alpha" not in fit.unidentified, fit.unidentified
    with pytest.raises(ScalingError, match="do not identify beta"):
        compute_optimal(fit, 1e18)
    rows = [{"trial": f"b-t{i:03d}-abcdef", "status": "completed", "params": {},
             "metrics": {"val_loss": float(v), "n_params_non_embedding": int(a), "tokens_seen": int(b)}}
            for i, (a, b, v) in enumerate(zip(n, d, loss))]
    report = scaling_report(str(write_results(tmp_path / "b", rows)), budget=1e18, n_boot=40)
    assert report["optimal"] is None and "do not identify beta" in report["note"]
    assert "compute-optimal for" not in report["summary"] and "do not identify beta" in report["summary"]


# The shipped data ablation as measured (BENCHMARKS.md section 9): 1040 steps each, best evaluation
# kept, and the step of that best evaluation (read from the trials' W&B histories).
SHIPPED_D = [32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576, 2_097_152]
SHIPPED_LOSS = [2.522, 2.286, 2.003, 1.899, 1.776, 1.693, 1.706]
SHIPPED_BEST_STEP = [200, 400, 700, 1000, 1040, 1040, 1040]


def test_trials_still_learning_at_their_end_are_named_in_an_l_of_d_fit(tmp_path: Path) -> None:
    """A trial whose best evaluation came in the last fifth of its steps measured its compute, not
    its data: the report says which (text, JSON, markdown, plot title), and so does a held-out one."""
    rows = data_rows(SHIPPED_D, SHIPPED_LOSS)
    for row, best in zip(rows, SHIPPED_BEST_STEP):
        row["metrics"].update(val_loss_best_step=best, step=1040)
    del rows[0]["metrics"]["val_loss_best_step"]  # results of before the field: not judged
    sweep = write_results(tmp_path / "s", rows)
    report = scaling_report(str(sweep), holdout="largest", n_boot=40)
    assert report["still_learning"] == {r["trial"]: f"best evaluation at step {b} of 1040"
                                        for r, b in zip(rows[3:], SHIPPED_BEST_STEP[3:])}
    (caution,) = [w for w in report["warnings"] if "still learning" in w]
    assert caution.startswith("4 of 7 trials were still learning when they ended") and "D = 2.62e+05" in caution
    assert f"warning: {caution}" in report["summary"]
    assert report["holdout"]["still_learning"] == "best evaluation at step 1040 of 1040"
    assert "it was still learning when it ended" in report["summary"].splitlines()[-1]
    saved = json.loads((sweep / "scaling_fit.json").read_text())
    assert saved["still_learning"] == report["still_learning"] and caution in saved["warnings"]
    assert "a-t003-abcdef (still learning)" in (sweep / "scaling_fit.md").read_text()
    # The flagged-values advice belongs to flagged parameters only.
    flagged = [w for w in report["warnings"] if "is not identified" in w]
    assert ("read nothing into the flagged values" in report["summary"]) == bool(flagged)

    # Trials that found their best early (all but the last here) are not named; nor is anything
    # in a law of N (a model-size sweep asks another question).
    for row in rows:
        row["metrics"]["val_loss_best_step"] = 600
    rows[-1]["metrics"]["val_loss_best_step"] = 1040
    one = scaling_report(str(write_results(tmp_path / "one", rows)), n_boot=0)
    assert list(one["still_learning"]) == [rows[-1]["trial"]] and "1 of 7 trials" in one["summary"]
    sizes = [dict(r, metrics={**r["metrics"], "n_params_non_embedding": 10_000 * 2 ** i, "tokens_seen": 2_000_000})
             for i, r in enumerate(rows)]
    assert scaling_report(str(write_results(tmp_path / "n", sizes)), n_boot=0)["still_learning"] == {}


# ------------------------------------------------------------------------ held out, predicted
def test_holdout_largest_is_predicted_from_the_others(tmp_path: Path) -> None:
    d = np.geomspace(1e6, 1e8, 8)
    loss = (TRUE["E"] + TRUE["B"] / d ** TRUE["beta"]) * (1 + 0.003 * np.random.default_rng(0).standard_normal(8))
    sweep = write_results(tmp_path / "h", data_rows(d, loss))
    report = scaling_report(str(sweep), holdout="largest", n_boot=60)
    held = report["holdout"]
    assert report["n_points"] == 7 and held["trial"] == "a-t007-abcdef" and held["measured"] == pytest.approx(loss[-1])
    assert abs(held["error"]) < 0.02 and held["inside"] and held["interval"][0] < held["predicted"] < held["interval"][1]
    assert held["extrapolation"] == "D 1.93x the largest fitted"
    assert f"held out a-t007-abcdef: measured {loss[-1]:.4f}" in report["summary"]
    assert [p["held_out"] for p in report["points"]] == [False] * 7 + [True]
    assert "a-t007-abcdef (held out)" in (sweep / "scaling_fit.md").read_text()
    by_name = scaling_report(str(sweep), holdout="a-t003-abcdef", n_boot=20)["holdout"]
    assert by_name["trial"] == "a-t003-abcdef" and by_name["extrapolation"] is None
    with pytest.raises(ScalingError, match="--holdout 'nope': not a completed trial"):
        scaling_report(str(sweep), holdout="nope", n_boot=0)
    few = write_results(tmp_path / "few", data_rows(d[:4], loss[:4]))
    with pytest.raises(ScalingError, match=r"needs at least 4 finished trials, got 3 \(after holding out largest\)"):
        scaling_report(str(few), holdout="largest", n_boot=0)


def test_predict_points_with_intervals_and_bad_points(tmp_path: Path) -> None:
    sweep = write_results(tmp_path / "g", grid_rows(k=4))
    report = scaling_report(str(sweep), predict=["N=1e6,D=1e8", "n=2e7,d=2e9"], n_boot=60)
    inside, beyond = report["predictions"]
    assert inside["predicted"] == pytest.approx(float(law(1e6, 1e8)), rel=0.03)
    assert inside["interval"][0] < inside["predicted"] < inside["interval"][1] and inside["extrapolation"] is None
    assert beyond["extrapolation"] == "N 2x the largest fitted; D 2x the largest fitted"
    assert "predicted val_loss at N = 1.00e+06, D = 1.00e+08:" in report["summary"]
    lo, hi = predict_interval(fit_scaling(*joint_points(k=6), n_boot=50), 1e5, 1e7)[1:]
    assert lo < hi
    for bad, expected in [("N=1e6", "needs D"), ("N=x,D=1e8", "N='x' is not a number"), ("N=-1,D=1e8", "positive"),
                          ("P=3", "expected N=<parameters>,D=<tokens or samples>")]:
        with pytest.raises(ScalingError, match=expected):
            scaling_report(str(sweep), predict=[bad], n_boot=0)


# -------------------------------------------------------------------------------- isoFLOP
def test_isoflop_minima_follow_the_planted_law() -> None:
    """Approach 2 on exact points of the planted law: each budget's minimum lands near the closed-form
    optimum (a parabola in log N is the local shape of the valley), and grows with the budget."""
    from e2e_dist.sweep.isoflop import isoflop_analysis

    truth = fit_scaling(*joint_points(k=5, noise=0.0), n_boot=0)
    ns, ds = [], []
    for c in (1e16, 1e17, 1e18):
        n_opt = compute_optimal(truth, c)["n_opt"]
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            ns.append(n_opt * f)
            ds.append(c / 6 / (n_opt * f))
    n, d = np.array(ns), np.array(ds)
    iso = isoflop_analysis(n, d, law(n, d))
    assert [round(m["budget"] / c, 6) for m, c in zip(iso["budgets"], (1e16, 1e17, 1e18))] == [1.0] * 3
    for m, c in zip(iso["budgets"], (1e16, 1e17, 1e18)):
        assert m["n_opt"] == pytest.approx(compute_optimal(truth, c)["n_opt"], rel=0.15)
    closed = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert iso["increasing"] and iso["exponent"] == pytest.approx(closed, abs=0.05)
    # Sizes all on one side of the valley: no minimum is claimed.
    lopsided = isoflop_analysis(n * 30, d / 30, law(n * 30, d / 30))
    assert all(m["n_opt"] is None and "not bracketed" in m["note"] for m in lopsided["budgets"])
    assert isoflop_analysis(n[:5], d[:5], law(n[:5], d[:5])) is None  # one budget is no design


def test_the_plot_says_its_units_and_its_tick_labels_do_not_overlap() -> None:
    """A data ablation over 3e4..4e4 tokens (under a decade): matplotlib's own log axis labels the
    minor ticks there until "3x10^4 4x10^4" collide; ours labels 1-2-5 per decade, in our format."""
    from e2e_dist.sweep.plot import fit_figure, tick_labels_overlap

    d = np.linspace(3e4, 4.6e4, 8)
    n = np.full(8, 3e5)
    loss = TRUE["E"] + TRUE["B"] / d ** TRUE["beta"]
    fit = fit_scaling(n, d, loss, n_boot=20, seed=0)
    fig = fit_figure(fit, n, d, loss, d_label="train_tokens", metric="val_loss")
    assert tick_labels_overlap(fig) == []
    ax = fig.axes[0]
    assert ax.get_xlabel() == "D: train_tokens (tokens)" and ax.get_ylabel() == "val_loss (nats)"
    joint = fit_scaling(*joint_points(6), n_boot=20, seed=0)
    fig = fit_figure(joint, *joint_points(6), d_label="tokens_seen", metric="val_bpb")
    assert tick_labels_overlap(fig) == [] and fig.axes[0].get_ylabel() == "val_bpb (bits per byte)"
