"""The scheduler and per-trial resources sections of a sweep file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from e2e_dist.config import Section


class SchedulerSpec(Section):
    type: Literal["asha", "none"] = "none"
    """Trial scheduler: `asha` stops poor trials early (Ray ASHAScheduler); `none` runs all to the end."""
    max_t: int | None = Field(None, ge=1)
    """ASHA: the longest a trial runs, in `time_attr` units (required for asha)."""
    grace_period: int = Field(1, ge=1)
    """ASHA: a trial is never stopped before this many `time_attr` units."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA: 1/reduction_factor of the trials pass each rung."""
    time_attr: str = "training_iteration"
    """Result field that measures progress (training_iteration = number of reports)."""

    @model_validator(mode="after")
    def _asha_bounds(self) -> "SchedulerSpec":
        if self.type == "asha":
            if self.max_t is None:
                raise ValueError("asha needs max_t")
            if self.grace_period > self.max_t:
                raise ValueError(f"grace_period={self.grace_period} > max_t={self.max_t}")
        return self


class ResourcesSpec(Section):
    num_workers: int | None = Field(None, ge=1)
    """Ray Train workers per trial (sets trainer.num_workers; None keeps the base's)."""
    cpus_per_worker: float | None = Field(None, gt=0)
    """CPUs reserved per worker (sets trainer.cpus_per_worker)."""
    use_gpu: bool | None = None
    """One GPU per worker (sets trainer.use_gpu; None keeps the base's)."""
    driver_cpus: float = Field(0.01, gt=0)
    """CPUs of each trial's driver (the function that runs the TorchTrainer). Small but not 0:
    Ray refuses 0, and a whole CPU per driver starves the workers on small machines."""
