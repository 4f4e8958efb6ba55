"""Graceful early stopping of sweep trials (used by runner.py and table.py).

Left alone, a trial the scheduler (ASHA) stops is killed mid-run: Tune ends its
actor, Ray ends the Train controller and workers it owns, and the W&B run never gets its exit record
(W&B shows it crashed). Instead:
1. the sweep driver, told by Tune that the trial is complete (`SweepBook.on_end`, before Tune asks
   the trial to stop), records the stop on the sweep's `StopBoard` actor;
2. Tune calls the trial actor's `cleanup` (`SweepTrial` in runner.py), which waits, up to
   $E2E_DIST_TRIAL_STOP_GRACE_S (300 s), for the trial's driver to return;
3. rank 0 of the trial polls the board every 2 s (`train/stop_watch.py`); its next logging step
   shares the news with every rank (in the metrics all-reduce) and becomes a report;
   at that report (`StopAtNextReport`, in every worker) rank 0 finishes the W&B run
   with `stopped_early: 1`, `stopped_at_step`, `stop_decision_step` and `stopped_by` in its summary
   (exit code 0); the report, and the checkpoint it may carry, goes through; then the workers wait;
4. the controller, receiving that report (`ReportUnlessStopped`), does not forward it to Tune and
   aborts the Train run as Ray does on Ctrl+C (`TrainController.abort`): workers shut down, the
   placement group removed; `fit()` raises, the driver returns, the actor ends.
So a stopped trial trains on to its next logging step (seconds; Tune's own function API stops a
trial only at a report, which would be its next evaluation or checkpoint), and its newest committed
checkpoint is complete. Its row in results.jsonl keeps the result the scheduler judged. A trial that does not reach a report in time,
and every trial that Ctrl+C interrupts (Tune requests no stop for those), is ended as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from e2e_dist import ray_compat

STOP_GRACE_ENV = "E2E_DIST_TRIAL_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 300.0
"""How long a trial the scheduler stopped may take to reach its next report and end there (below
Tune's TUNE_FORCE_TRIAL_CLEANUP_S, 600 s, after which Tune kills a stopping trial's actor)."""

log = logging.getLogger("e2e_dist.sweep")


# Why this is needed (ray 2.60; see the module docstring for the flow): Tune stops a trial with
# `Trainable.stop` -> `FunctionTrainable.cleanup` -> `_TrainSession.finish(timeout=0)`, which only sets
# a stop event that the V2 integration never reads (results come from TuneReportCallback's queue,
# pulled by the actor's main thread, not reported by the trial's thread), then drops the actor:
# Ray ends it and, with it, the Train controller it owns and the controller's workers. Train V2 has
# no way to ask a training function to return: its only abort (`TrainController.abort`, what
# `DataParallelTrainer._register_sigint_handler` runs on Ctrl+C, in a main thread only) runs
# `RayTrainWorker.shutdown` and then `ray.kill`s every worker, after at most 5 s
# (`worker_group/state.py: _shutdown_workers`). So the training loop's `tracker.finish()` never
# runs; a worker-side hook at a report (`TrainContextCallback.on_report`) ends the W&B run instead.
class StopBoard:
    """A Ray actor (one per sweep session, owned by the sweep driver): which trials the scheduler
    stopped, and how far each one's graceful end got."""

    def __init__(self) -> None:
        self.trials: dict[str, dict[str, Any]] = {}

    def begin(self, trial_id: str) -> None:
        """A trial's driver starts (again): nothing requested yet."""
        self.trials[trial_id] = {"stop": None, "acked": False, "done": False}

    def request(self, trial_id: str, step: int | None, by: str) -> None:
        """The scheduler stopped the trial after its result at `step`."""
        self.trials.setdefault(trial_id, {"acked": False, "done": False})["stop"] = {"step": step, "by": by,
                                                                                    "at": time.time()}

    def requested(self, trial_id: str) -> dict[str, Any] | None:
        return self.trials.get(trial_id, {}).get("stop")

    def ack(self, trial_id: str, step: int | None) -> None:
        """Rank 0 finished the trial's W&B run (at `step`) and its workers stop after this report."""
        self.trials[trial_id]["acked"] = True
        self.trials[trial_id]["stopped_at"] = step

    def acked(self, trial_id: str) -> bool:
        return bool(self.trials.get(trial_id, {}).get("acked"))

    def done(self, trial_id: str) -> None:
        """The trial's driver returned."""
        self.trials.setdefault(trial_id, {"stop": None, "acked": False})["done"] = True

    def stopping(self) -> list[str]:
        """Trials stopped by the scheduler whose driver has not returned yet."""
        return sorted(t for t, s in self.trials.items() if s.get("stop") is not None and not s.get("done"))


def start_board():
    import ray

    from e2e_dist.train.ray_env import on_this_node

    # on the sweep driver's node: a board Ray put on a worker node would die with it, and with it
    # every trial's stop (trials and their Train controllers read it)
    return ray.remote(num_cpus=0)(StopBoard).options(**on_this_node()).remote()


@dataclass
class TrialStop:
    """What a trial's driver, its Train controller and its workers share about the trial's stop."""

    board: Any
    trial_id: str
    returned: threading.Event = field(default_factory=threading.Event, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # the callbacks ship to the controller and workers
        return {"board": self.board, "trial_id": self.trial_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.board, self.trial_id, self.returned = state["board"], state["trial_id"], threading.Event()

    def requested(self) -> dict[str, Any] | None:
        import ray

        return ray.get(self.board.requested.remote(self.trial_id), timeout=60)

    def finished(self) -> None:
        self.returned.set()
        with contextlib.suppress(Exception):  # the board is gone once the sweep ended
            self.board.done.remote(self.trial_id)


_ACTIVE_TRIAL: list[TrialStop | None] = [None]
"""The trial whose driver runs in this process (a trial actor runs one: reuse_actors=False)."""


def begin_trial(board: Any, trial_id: str) -> TrialStop:
    """In the trial's driver, as it starts: a fresh entry on the board, and the trial this process runs."""
    import ray

    ray.get(board.begin.remote(trial_id))
    trial = _ACTIVE_TRIAL[0] = TrialStop(board, trial_id)
    return trial


def stop_grace_s() -> float:
    return float(os.environ.get(STOP_GRACE_ENV) or DEFAULT_STOP_GRACE_S)


class StopAtNextReport(ray_compat.train_context_callback_base()):
    """Runs in every Train worker, around each `ray.train.report` of the loop (`on_report`).

    Once the scheduler stopped the trial, rank 0 says so at the next report (all ranks then agree,
    through Ray Train's `broadcast_from_rank_zero`); rank 0 finishes the W&B run there, as stopped
    (`Tracker.finish_stopped`), and acknowledges on the board. The report itself goes through (its
    checkpoint, if it carries one, is uploaded and committed), then every rank's training thread
    waits for the end: the controller aborts the run when it receives this report
    (`ReportUnlessStopped`) and Ray Train shuts the workers down. Waiting, instead of training on,
    means no new step, W&B row or checkpoint upload that the shutdown would cut in half."""

    def __init__(self, stop: TrialStop) -> None:
        self.stop = stop

    @contextlib.contextmanager
    def on_report(self):
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        decision = self._requested() if rank == 0 else None
        if world > 1:  # every rank must take the same path: they all report, and all wait, or none
            from ray.train.collective import broadcast_from_rank_zero

            decision = broadcast_from_rank_zero(decision)
        stopping = False
        if decision is not None:
            stopping = self._finish_and_ack(decision) if rank == 0 else False
            if world > 1:
                stopping = broadcast_from_rank_zero(stopping)
        yield
        if stopping:
            threading.Event().wait()  # until Ray Train shuts this worker down (ReportUnlessStopped)

    def _requested(self) -> dict[str, Any] | None:
        try:
            return self.stop.requested()
        except Exception as e:  # noqa: BLE001 - the stop is best effort: never fail training for it
            log.warning("trial %s: could not read the sweep's stop board (%s)", self.stop.trial_id, e)
            return None

    def _finish_and_ack(self, decision: dict[str, Any]) -> bool:
        """Rank 0: finish the W&B run as stopped, tell the controller. False: go on as if not stopped
        (the trial is then ended the old way, when Tune ends its actor)."""
        import ray

        from e2e_dist.tracking import finish_open_runs_stopped

        try:
            step = finish_open_runs_stopped(stopped_by=decision["by"], stop_decision_step=decision["step"])
        except Exception as e:  # noqa: BLE001 - still end the run as planned; W&B says what it could
            log.warning("trial %s: W&B finish as stopped failed (%s)", self.stop.trial_id, e)
            step = None
        try:
            ray.get(self.stop.board.ack.remote(self.stop.trial_id, step), timeout=60)
        except Exception as e:  # noqa: BLE001
            log.warning("trial %s: could not acknowledge its stop (%s)", self.stop.trial_id, e)
            return False
        return True


class ReportUnlessStopped(TuneReportCallback):
    """Runs in the trial's Train controller: forwards each report to Tune (TuneReportCallback) until
    the report at which rank 0 finished the stopped trial's W&B run; that one is not forwarded (Tune
    already ended the trial) and the run is aborted the way Ray aborts one on Ctrl+C
    (`TrainController.abort`: workers shut down, placement group removed)."""

    def __init__(self, stop: TrialStop) -> None:
        super().__init__()
        self.stop = stop
        self._aborting = False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        import ray

        if self._aborting:
            return
        try:
            acked = ray.get(self.stop.board.acked.remote(self.stop.trial_id), timeout=60)
        except Exception:  # noqa: BLE001 - no board: report as TuneReportCallback does
            acked = False
        if acked:
            self._aborting = True
            ray_compat.abort_current_train_run()  # runs once this poll returns
            return
        super().after_report(run_context, metrics, checkpoint)


def await_graceful_stop() -> None:
    """In `Trainable.cleanup` (Tune ends the trial): if the scheduler stopped this trial while its
    driver still runs, give it until its next report to end (bounded by `stop_grace_s`). Any
    other end (the trial returned or failed; Ctrl+C, which requests nothing) returns at once."""
    trial = _ACTIVE_TRIAL[0]
    if trial is None or trial.returned.is_set():
        return
    try:
        if trial.requested() is None:
            return
    except Exception:  # noqa: BLE001 - no board: the old behaviour (the trial is ended at once)
        return
    if not trial.returned.wait(stop_grace_s()):
        log.warning("trial %s did not reach a report within %s s of its stop: ending it now (its W&B run "
                    "is left unfinished)", trial.trial_id, stop_grace_s())
