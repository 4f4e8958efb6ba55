"""Where a run is: what every checkpoint carries besides the engine, and what a resume restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class RunState:
    step: int = 0
    """Optimizer steps taken (0 = a fresh start; checkpoints are taken after a step, so none has 0)."""
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "consumed": 0})
    """The train stream's position (BatchStream.state): epoch and micro-batches consumed in it."""
    units_seen: int = 0
    """Tokens / samples seen by all ranks so far."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The newest metrics row (its "step" says when it was logged)."""
    restored_row: dict[str, float] = field(default_factory=dict)
    """The row a restored checkpoint carried (W&B backfill after a hard kill, Tracker.backfill)."""

    @property
    def resumed_from(self) -> int | None:
        """The restored checkpoint's step, or None for a fresh start."""
        return self.step or None

    def client_state(self) -> dict[str, Any]:
        """What DeepSpeed saves next to the engine (`client_state`). The row logged at this very step
        travels with it, so a restart can backfill W&B (see Tracker.backfill)."""
        row = {} if self.metrics.get("step") != self.step else {
            k: v for k, v in self.metrics.items() if k != "step" and isinstance(v, (int, float))}
        return {"step": self.step, "data": dict(self.data), "units_seen": self.units_seen, "logged": row}

    @classmethod
    def from_client_state(cls, state: dict[str, Any]) -> "RunState":
        return cls(step=state["step"], data=dict(state["data"]), units_seen=state.get("units_seen", 0),
                   restored_row=dict(state.get("logged") or {}))
