"""The per-worker training function that Ray Train's TorchTrainer runs on every rank.

build -> restore -> for each step: train, then the hooks the schedule says are due (log, evaluate,
checkpoint, preempt) -> final checkpoint + sample. The function gets the validated RunConfig as a
plain dict (Ray pickles it) and never parses YAML or talks to storage itself: e2e_dist.checkpoint
and e2e_dist.tracking own those. `Worker` holds what one rank built; `RunState` is where the run
is, and exactly what a checkpoint carries besides the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from e2e_dist.config import RunConfig
from e2e_dist.console import tag_our_lines
from e2e_dist.train import compile_cache, preemption
from e2e_dist.train.batches import BatchStream, stream_for
from e2e_dist.train.build import Built, build_engine
from e2e_dist.train.checkpointer import Checkpointer
from e2e_dist.train.deepspeed_config import resolve_precision
from e2e_dist.train.evaluate import evaluate, final_sample
from e2e_dist.train.faults import maybe_inject_fault
from e2e_dist.train.flops import peak_flops
from e2e_dist.train.metrics import MetricWindow, read_counters
from e2e_dist.train.ray_env import quiet_library_logs
from e2e_dist.train.resume import Restore, choose, restore
from e2e_dist.train.run_state import RunState
from e2e_dist.train.schedule import Schedule
from e2e_dist.train.stop_watch import StopWatch
from e2e_dist.train.timeline import Timeline, worker_timeline

log = logging.getLogger("e2e_dist.train")


class PreemptedError(RuntimeError):
    """Raised on every rank after the just-in-time checkpoint; Ray Train restarts the group."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    timeline = worker_timeline(loop_config.get("timeline_t0"))
    timeline.mark("training function entered")
    cfg = RunConfig.model_validate(loop_config["run"])
    tag_our_lines()
    quiet_library_logs()
    w = Worker.start(cfg, loop_config, timeline)
    state = w.restore()
    checkpointer = Checkpointer(cfg, w.engine, rank=w.rank, world=w.world)
    schedule = Schedule(cfg.trainer)
    stop_watch = StopWatch(loop_config.get("trial_stop"), w.rank)  # a sweep trial the scheduler may stop
    for step in schedule.steps(after=state.step):
        w.train_step(state)
        if w.timeline.mark_once("first step"):
            w.share_compiled_kernels()
            if w.rank == 0:  # every report from here on says what the start cost (a stopped trial's row too)
                w.base_metrics.update(w.timeline.metrics())
        maybe_inject_fault(loop_config.get("fault"), loop_config.get("fault_dir", ""), cfg.name, step, w.rank)
        due = schedule.due(step)
        # SIGTERM on any rank is noticed at a logging step, inside the metrics all-reduce (no extra
        # collective on the hot path); the last step ends the run anyway.
        preempted = False
        if due.log:
            preempted = w.reduce_interval(state, checkpointer.stall_s, stop_watch.requested) and not due.last
        if due.eval:
            state.metrics.update(w.evaluate())
            state.note_eval(state.metrics, min_delta=cfg.trainer.early_stop_min_delta)
        if due.log or due.eval:
            w.publish(state)
        if preempted:
            checkpointer.save(state, {**w.base_metrics, **state.metrics, "preempted": 1}, final=True)
            w.tracker.finish(exit_code=1)
            raise PreemptedError(f"preempted (SIGTERM) at step {step}: checkpoint committed, a restart resumes from it")
        if due.eval and w.plateaued(state):
            break  # early stop: the final checkpoint below reports this evaluation
        if due.checkpoint:
            checkpointer.save(state, {**w.base_metrics, **state.metrics}, final=False)
            w.tracker.copy_to_storage()  # s3:// runs: W&B files next to the run, should this node go
        elif due.report or w.take_trial_stop():  # a stopped sweep trial ends at a report (sweep/early_stop.py)
            ray.train.report({**w.base_metrics, **state.metrics})
    final = w.final_metrics(state)
    checkpointer.save(state, final, final=True)
    w.finish(state, final)
    checkpointer.close()
    stop_watch.close()
    w.stream.close()


@dataclass(kw_only=True)
class Worker:
    """What one rank built for its run: engine, data streams, metrics, W&B and the progress sink."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    built: Built
    loop_config: dict[str, Any]
    plan: Restore
    """The checkpoint this rank restores (chosen before the engine is built: a resharded one needs
    an engine that loads DeepSpeed's universal form)."""
    timeline: Timeline
    """This rank's start-up marks against the driver's start (rank 0's reach the run's log file)."""
    tracker: Any = None
    progress: Any = None
    stream: BatchStream | None = None
    window: MetricWindow | None = None
    base_metrics: dict[str, Any] | None = None
    once: dict[str, Any] | None = None
    """Logged with the next row only: the resize event of a resumed run that changed world size."""
    trial_stop_agreed: bool = False
    """Set at a logging step when rank 0 was told the sweep trial is stopped; taken by the next report."""
    eval_cache: dict[str, Any] = field(default_factory=dict)
    """This rank's share of the validation selection, read at the first evaluation."""

    @property
    def engine(self) -> Any:
        return self.built.engine

    @property
    def grad_accum(self) -> int:
        return self.cfg.trainer.grad_accum_at(self.world)

    @classmethod
    def start(cls, cfg: RunConfig, loop_config: dict[str, Any], timeline: Timeline) -> "Worker":
        import ray.train

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        world, rank = ctx.get_world_size(), ctx.get_world_rank()
        plan = choose(cfg, rank=rank, world=world, node_rank=ctx.get_node_rank(), local_rank=ctx.get_local_rank())
        built = build_engine(cfg, device=device, world=world, load_universal=plan.load_universal)
        timeline.mark("engine built")
        return cls(cfg=cfg, rank=rank, world=world, device=device, loop_config=loop_config, plan=plan,
                   built=built, timeline=timeline)

    def restore(self) -> RunState:
        """The newest committed checkpoint into the engine; then W&B, the data stream and metrics
        start from where it left off."""
        import ray.train

        from e2e_dist.tracking import Tracker
        from e2e_dist.train.progress import ProgressSink

        ctx, cfg, b, t = ray.train.get_context(), self.cfg, self.built, self.cfg.trainer
        state = restore(self.engine, self.plan, cfg, rank=self.rank, world=self.world, local_rank=ctx.get_local_rank(),
                        node_rank=ctx.get_node_rank())
        self.timeline.mark("checkpoint restored")
        sizes = {"n_params": b.n_params, "n_params_non_embedding": b.n_params_non_embedding,
                 "flops_per_step": b.flops_per_step}
        self.tracker = Tracker.start(cfg, rank=self.rank, resume_step=state.resumed_from,
                                     extra_config={**sizes, "world_size": self.world})
        self.timeline.mark("W&B started")
        src = self.plan.source_layout
        if src is not None and src.world_size != self.world:
            self.once = {"resize/from_world_size": src.world_size, "resize/to_world_size": self.world}
        if state.resumed_from is not None:
            self.tracker.backfill(state.logged_rows)
            if self.rank == 0:
                resized = f" on {self.world} workers (was {src.world_size})" if self.once else ""
                log.info("resumed from the committed checkpoint of step %d%s; %s", state.resumed_from, resized,
                         self.plan.traffic())
        self.progress = ProgressSink.connect(self.loop_config.get("progress_actor"), self.rank)
        self.stream = stream_for(self.loop_config["train"], cfg, collate=self.loop_config["collate"], device=self.device,
                                 rank=self.rank, world=self.world, grad_accum=self.grad_accum, position=state.data)
        state.data = self.stream.state()
        self.window = MetricWindow(self.device, b.flops_per_step, peak_flops(self.device), self.world)
        self.base_metrics = {
            **sizes, "precision": resolve_precision(cfg, self.device.type == "cuda"),
            "zero_stage": cfg.deepspeed.zero_stage, "world_size": self.world, "run_name": cfg.name,
            # which speed options really took effect (benchmarks and tests read these back)
            "compiled": bool(self.engine.is_compiled), "grad_accum": self.grad_accum,
            "activation_checkpointing": t.activation_checkpointing,
            # what the data subset holds (train_tokens, ...): sweeps and scaling fits need each run's data size
            **{k: v for k, v in self.loop_config.get("data_stats", {}).items() if isinstance(v, (int, float))},
            # what this start's restore downloaded, per node (the run summary prints it)
            **(self.plan.metrics() if state.resumed_from is not None else {})}
        self.engine.train()
        return state

    def train_step(self, state: RunState) -> None:
        """One optimizer step: grad_accum micro-batches (DeepSpeed updates on the boundary)."""
        model = self.built.model
        for _ in range(self.grad_accum):
            batch = self.stream.next()
            self.timeline.mark_once("first batch")
            loss = self.engine(batch)
            self.engine.backward(loss)
            self.engine.step()
            n = model.units_in(batch)
            self.window.add_micro(loss, n)
            state.units_seen += n * self.world
        self.window.end_step()
        state.step += 1
        state.data = self.stream.state()

    def reduce_interval(self, state: RunState, stall_s: float, trial_stop_requested: bool = False) -> bool:
        """The interval's metrics, reduced across ranks, as the newest row; whether any rank got
        SIGTERM. Every rank also learns whether rank 0 was told its sweep trial is stopped."""
        unit = self.built.model.unit_name
        interval, any_preempt, self.trial_stop_agreed = self.window.flush(
            unit, preempt_requested=preemption.requested(), stop_requested=trial_stop_requested)
        state.metrics = {**interval, "lr": self.built.scheduler.get_last_lr()[0], "step": state.step,
                         f"{unit}_seen": state.units_seen, "epoch": state.data["epoch"], "world_size": self.world,
                         **read_counters(self.stream.counters, self.device)}
        if stall_s:
            state.metrics["ckpt_stall_s"] = stall_s
        return any_preempt

    def share_compiled_kernels(self) -> None:
        """After the first compiled step: rank 0 of a run that found no shared torch.compile cache
        saves one (train/compile_cache.py); the bytes either way go to the run's metrics."""
        if not self.engine.is_compiled:
            return
        loaded = self.built.compile_cache_loaded
        saved = compile_cache.save(self.cfg, self.device) if self.rank == 0 and not loaded else 0
        self.base_metrics.update({"compile_cache/loaded_bytes": loaded, "compile_cache/saved_bytes": saved})

    def take_trial_stop(self) -> bool:
        """Once, on every rank alike: the scheduler stopped this sweep trial (agreed at a logging step)."""
        agreed, self.trial_stop_agreed = self.trial_stop_agreed, False
        return agreed

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.engine, self.built.model, self.loop_config["val"], self.cfg.trainer.micro_batch_size,
                        self.loop_config["collate"], self.device, self.rank, self.world, cache=self.eval_cache)

    def publish(self, state: RunState) -> None:
        """The newest row to W&B (at this step) and to the driver's progress display."""
        row = {**{k: v for k, v in state.metrics.items() if k != "step"}, **(self.once or {})}
        self.tracker.log(row, step=state.step, commit=True)
        state.remember_row(row, state.step)
        self.once = None
        self.progress.update(state.step, self.cfg.trainer.max_steps, state.metrics)

    def plateaued(self, state: RunState) -> bool:
        """Early stop due: trainer.early_stop_patience evaluations in a row without a gain. Every
        rank decides the same (the val metrics are all-reduced), so all leave the loop together."""
        t = self.cfg.trainer
        if t.early_stop_patience is None or state.evals_without_gain < t.early_stop_patience or state.step >= t.max_steps:
            return False
        if self.rank == 0:
            log.info("early stop at step %d of at most %d: %d evaluations without a val loss %g below %.4f; best "
                     "%.4f at step %s", state.step, t.max_steps, state.evals_without_gain, t.early_stop_min_delta,
                     state.gain_loss, state.best_val_loss, state.best_val_step)
        return True

    def final_metrics(self, state: RunState) -> dict[str, Any]:
        """What the last report carries (the run's summary), with a generated sample for text models."""
        unit = self.built.model.unit_name
        final = {**self.base_metrics, **state.metrics, "step": state.step, f"{unit}_seen": state.units_seen,
                 "stop_reason": "max_steps" if state.step >= self.cfg.trainer.max_steps else "val_loss_plateau"}
        if self.rank == 0:
            final.update(self.timeline.metrics())
        final["sample"] = final_sample(self.engine, self.built.model, self.rank, self.cfg)
        self.tracker.log_summary({k: v for k, v in final.items() if isinstance(v, (int, float, str))})
        return final

    def finish(self, state: RunState, final: dict[str, Any]) -> None:
        self.progress.update(state.step, self.cfg.trainer.max_steps, final, done=True)
        self.tracker.finish()
