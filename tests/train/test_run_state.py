"""RunState: what a checkpoint carries besides the engine, here the best val loss (val_loss_best)."""

from __future__ import annotations

import math

from e2e_dist.train.run_state import RunState


def test_best_val_loss_is_the_lowest_evaluation_and_survives_a_resume() -> None:
    state = RunState()
    seen = []
    for v in (2.5, 2.1, math.nan, 2.3):
        row = {"val_loss": v}
        state.note_eval(row)
        seen.append(row["val_loss_best"])
    assert seen == [2.5, 2.1, 2.1, 2.1]
    state.step = 40
    restored = RunState.from_client_state(state.client_state(), micro_batch_size=8, world=2)
    assert restored.best_val_loss == 2.1
    row = {"val_loss": 2.2}
    restored.note_eval(row)
    assert row["val_loss_best"] == 2.1
    # A checkpoint written before the field existed: no best yet, the next evaluation starts it.
    old = {k: v for k, v in state.client_state().items() if k != "best_val_loss"}
    fresh = RunState.from_client_state(old, micro_batch_size=8, world=2)
    row = {"val_loss": 2.4}
    fresh.note_eval(row)
    assert fresh.best_val_loss == 2.4 and row["val_loss_best"] == 2.4
    assert "val_loss_best" not in (empty := {}) and (RunState().note_eval(empty) or empty) == {}
