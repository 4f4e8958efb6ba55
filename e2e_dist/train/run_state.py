"""Where a run is: what every checkpoint carries besides the engine, and what a resume restores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ROWS_CARRIED = 16
"""W&B rows a checkpoint carries (a few hundred bytes each)."""


@dataclass(kw_only=True)
class RunState:
    step: int = 0
    """Optimizer steps taken (0 = a fresh start; checkpoints are taken after a step, so none has 0)."""
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "samples": 0})
    """The train stream's position (BatchStream.state): epoch, examples of it consumed by all ranks
    together (the same number at any world size), and the order's window size (data.shuffle_blocks
    as the run began: a resume continues the same order)."""
    units_seen: int = 0
    """Tokens / samples seen by all ranks so far."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The newest metrics row (its "step" says when it was logged)."""
    logged_rows: list[dict[str, Any]] = field(default_factory=list)
    """The newest ROWS_CARRIED rows handed to W&B (each with its "step"). Checkpoints carry them: W&B
    loses what it had not flushed when rank 0 is killed, and a restart that resumes from the
    checkpoint does not redo those steps, so it logs them again from here (Tracker.backfill). More
    than one: rank 0 can be killed again before the backfilled rows are flushed."""
    best_val_loss: float | None = None
    """The lowest val loss of any evaluation so far, reported as `val_loss_best` (what early
    stopping would keep: a data ablation's small subsets overfit long before the last step)."""
    best_val_step: int | None = None
    """The step of that evaluation, reported as `val_loss_best_step`: a best found late in the run
    means the run was still learning when it ended (its loss measures its steps, not its data)."""
    gain_loss: float | None = None
    """The val loss the early-stop patience counts from: the last evaluation that came in more than
    trainer.early_stop_min_delta below the previous such loss (val_loss_best may be lower by less)."""
    evals_without_gain: int = 0
    """Evaluations since `gain_loss` was set; the run stops when it reaches early_stop_patience."""

    @property
    def resumed_from(self) -> int | None:
        """The restored checkpoint's step, or None for a fresh start."""
        return self.step or None

    def remember_row(self, row: dict[str, Any], step: int) -> None:
        """A row just handed to W&B (its numbers), for the next checkpoints to carry."""
        self.logged_rows = [*self.logged_rows, {"step": step, **{k: v for k, v in row.items()
                                                                  if isinstance(v, (int, float))}}][-ROWS_CARRIED:]

    def note_eval(self, metrics: dict[str, Any], min_delta: float = 0.0) -> None:
        """After an evaluation: update the best val loss and its step, and add them to `metrics` as
        val_loss_best and val_loss_best_step; count the evaluation toward the early-stop patience
        unless it beat `gain_loss` by more than `min_delta`."""
        v = metrics.get("val_loss")
        if isinstance(v, (int, float)) and math.isfinite(v) and (self.gain_loss is None or v < self.gain_loss - min_delta):
            self.gain_loss, self.evals_without_gain = v, 0
        else:  # a NaN evaluation is no improvement either
            self.evals_without_gain += 1
        if isinstance(v, (int, float)) and math.isfinite(v) and (self.best_val_loss is None or v < self.best_val_loss):
            self.best_val_loss, self.best_val_step = v, self.step
        if self.best_val_loss is not None:
            metrics["val_loss_best"] = self.best_val_loss
            if self.best_val_step is not None:
                metrics["val_loss_best_step"] = self.best_val_step

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed saves next to the engine (`client_state`), the recent W&B rows included."""
        rows = [r for r in self.logged_rows if r["step"] <= self.step]
        return {"step": self.step, "data": dict(self.data), "units_seen": self.units_seen, "logged_rows": rows,
                "best_val_loss": self.best_val_loss, "best_val_step": self.best_val_step,
                "gain_loss": self.gain_loss, "evals_without_gain": self.evals_without_gain}

    @classmethod
    def from_client_state(cls, state: dict[str, Any], *, micro_batch_size: int, world: int) -> "RunState":
        data = dict(state["data"])
        if "samples" not in data:
            # Checkpoints before the world-size-free position counted one rank's micro-batches of
            # a split stream; as a global position that is at most one round off.
            data = {"epoch": data["epoch"], "samples": data.get("consumed", 0) * micro_batch_size * world}
        rows = state.get("logged_rows")
        if rows is None:  # written before several rows were carried: the one row of its own step
            rows = [{"step": state["step"], **state["logged"]}] if state.get("logged") else []
        return cls(step=state["step"], data=data, units_seen=state.get("units_seen", 0), logged_rows=list(rows),
                   best_val_loss=state.get("best_val_loss"), best_val_step=state.get("best_val_step"),
                   gain_loss=state.get("gain_loss"), evals_without_gain=state.get("evals_without_gain", 0))
