"""RunState: what a checkpoint carries besides the engine, here the best val loss (val_loss_best) and
the step it was seen at (val_loss_best_step)."""

from __future__ import annotations

import math

from e2e_dist.train.run_state import RunState


def test_best_val_loss_is_the_lowest_evaluation_and_survives_a_resume() -> None:
    state = RunState()
    seen = []
    for step, v in ((10, 2.5), (20, 2.1), (30, math.nan), (40, 2.3), (50, 2.1)):
        state.step = step
        row = {"val_loss": v}
        state.note_eval(row)
        seen.append((row["val_loss_best"], row["val_loss_best_step"]))
    assert seen == [(2.5, 10), (2.1, 20), (2.1, 20), (2.1, 20), (2.1, 20)]  # a tie is no improvement
    restored = RunState.from_client_state(state.client_state(), micro_batch_size=8, world=2)
    assert (restored.best_val_loss, restored.best_val_step) == (2.1, 20)
    restored.step = 60
    row = {"val_loss": 2.2}
    restored.note_eval(row)
    assert (row["val_loss_best"], row["val_loss_best_step"]) == (2.1, 20)
    # A checkpoint written before the fields existed: no best yet, the next evaluation starts it.
    old = {k: v for k, v in state.client_state().items() if k not in ("best_val_loss", "best_val_step")}
    fresh = RunState.from_client_state(old, micro_batch_size=8, world=2)
    row = {"val_loss": 2.4}
    fresh.note_eval(row)
    assert fresh.best_val_loss == 2.4 and row["val_loss_best"] == 2.4 and row["val_loss_best_step"] == 50
    # ... and one with a best but no step (written before the step was kept): no step is made up.
    older = {k: v for k, v in state.client_state().items() if k != "best_val_step"}
    row = {"val_loss": 2.4}
    RunState.from_client_state(older, micro_batch_size=8, world=2).note_eval(row)
    assert row["val_loss_best"] == 2.1 and "val_loss_best_step" not in row
    assert "val_loss_best" not in (empty := {}) and (RunState().note_eval(empty) or empty) == {}
