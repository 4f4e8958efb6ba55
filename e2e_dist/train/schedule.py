"""Which hooks a step runs: logging, evaluation, checkpointing, a metrics-only report."""

from __future__ import annotations

from dataclasses import dataclass

from e2e_dist.config import TrainerConfig


@dataclass(frozen=True)
class Due:
    log: bool
    """Reduce and log the interval's metrics (also where a SIGTERM is noticed, on every rank)."""
    eval: bool
    checkpoint: bool
    """A periodic checkpoint (the final one is taken after the loop)."""
    report: bool
    """A metrics-only `ray.train.report` (feeds Tune schedulers between checkpoints)."""
    last: bool


class Schedule:
    def __init__(self, trainer: TrainerConfig) -> None:
        self.t = trainer

    def steps(self, after: int) -> range:
        """The steps still to take after step `after` (numbered from 1)."""
        return range(after + 1, self.t.max_steps + 1)

    def due(self, step: int) -> Due:
        t = self.t
        last = step == t.max_steps
        evaluate = step % t.eval_every == 0 or last
        checkpoint = step % t.ckpt_every == 0 and not last
        return Due(log=step % t.log_every == 0 or last, eval=evaluate, checkpoint=checkpoint,
                   report=evaluate and not checkpoint and not last, last=last)
