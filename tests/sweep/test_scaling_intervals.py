"""The fitter's 95% intervals hold their level with the few points a sweep has: planted laws
L(D) = E + B/D^beta with 1% log-normal noise at 4 and 7 data sizes (32 Ki..1 Mi, like the shipped
data ablation), 20 seeded repetitions each; and the interval for a held-out largest trial.

Resampling the points (the fitter's old intervals) held beta 30 times in 40 at 4 points; profile-t
holds it at its nominal rate (38/40 at 4 points, 37/40 at 7: .notes/science.md). 17 of 20 is the
goal; at a true 95% that fails by chance 1.6% of the time, and these seeds are fixed."""

from __future__ import annotations

import numpy as np
import pytest

from e2e_dist.sweep.scaling import fit_scaling, predict_interval

E, BETA = 1.6, 0.57
B = 0.92 * 32768**BETA  # 2.52 at 32 Ki, as the shipped ablation measured
REPS = 20


def planted(points: int, rng: np.random.Generator, noise: float = 0.01):
    d = np.geomspace(32768, 1048576, points)
    return d, (E + B * d**-BETA) * np.exp(rng.normal(0.0, noise, points))


@pytest.mark.parametrize("points", [4, 7])
def test_beta_intervals_cover_a_planted_law_at_their_nominal_rate(points: int) -> None:
    rng = np.random.default_rng(2026 + points)
    held, widths = 0, []
    for _ in range(REPS):
        d, loss = planted(points, rng)
        fit = fit_scaling(np.ones(points), d, loss, "data", n_boot=0)
        lo, hi = fit.ci["beta"]
        held += lo <= BETA <= hi
        widths.append((hi - lo) / 2 / BETA)
        assert lo <= fit.params["beta"] <= hi
    assert held >= 17, f"{held}/{REPS} intervals held the planted beta"
    # Honest, not vacuous: 7 points pin beta down far better than 4 (medians ~30% vs ~110% of beta).
    assert np.median(widths) < (0.6 if points == 7 else 3.0), np.median(widths)


def test_the_held_out_largest_trial_is_inside_its_prediction_interval_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(7)
    held = 0
    for _ in range(REPS):
        d, loss = planted(7, rng)
        fit = fit_scaling(np.ones(6), d[:6], loss[:6], "data", n_boot=0)
        pred, lo, hi = predict_interval(fit, None, d[6])
        assert lo < pred < hi
        held += lo <= loss[6] <= hi
    assert held >= 17, f"{held}/{REPS} prediction intervals held the measured value"
