"""Driver side of one run: checks, Ray, datasets, TorchTrainer, and the summary at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from e2e_dist.config import RunConfig, dump_yaml
from e2e_dist.checkpoint.layout import CommittedCheckpoint
from e2e_dist.errors import UserError
from e2e_dist.train.timeline import Timeline

log = logging.getLogger("e2e_dist.launcher")


@dataclass(kw_only=True)
class RunSummary:
    name: str
    run_uri: str
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last reported metrics (the final checkpoint's report)."""
    checkpoint_uri: str | None = None
    """The newest committed checkpoint after the run."""
    wandb_dir: str | None = None
    """This run's W&B folder on this machine (None when rank 0 wrote it on another node)."""
    wandb_copy: str | None = None
    """Its copy next to the run in storage (`<run>/wandb/<folder>`; s3:// runs)."""
    data_stats: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    log_path: str | None = None
    """The run's log file (everything the libraries printed), when this process wrote one."""


def prepare_run_dir(cfg: RunConfig, *, resume: bool | None) -> CommittedCheckpoint | None:
    """Check storage and find the newest committed checkpoint (the run's one look before it starts);
    writes nothing (`record_run` does, once every check has passed). resume: True = continue
    (something must be committed), False = a new run (nothing may be), None = continue if there is
    something (a sweep trial run again)."""
    from e2e_dist import checkpoint as ckpt
    from e2e_dist import storage
    from e2e_dist.checkpoint import universal

    storage.check_access(cfg.storage.path, cfg.storage)
    found, skipped = ckpt.find_latest_committed(cfg.run_uri, cfg.storage)
    if resume is True and found is None:
        why = f" ({'; '.join(skipped)})" if skipped else ""
        raise UserError(f"--resume: no committed checkpoint under {cfg.run_uri}{why}")
    if resume is False and found is not None:
        raise UserError(f"run {cfg.name!r} already has checkpoints at {cfg.run_uri}: pass --resume to continue it, "
                        f"or --set name=<new name>")
    if found is not None:
        # A layout no resume can load (ZeRO-0 <-> ZeRO-1..3) is refused here, before Ray starts.
        saved = universal.layout_of(found.manifest)
        universal.needs_universal(saved, universal.run_layout(cfg.deepspeed, saved.world_size), found.step)
    return found


def record_run(cfg: RunConfig) -> None:
    """What a run writes before training, once its storage, checkpoints and data all checked out:
    the config, and no stale Ray Train snapshot. (A run refused for bad input leaves an earlier
    run of the same name as it was.)"""
    from e2e_dist import storage

    # Ray Train's run snapshot lists every checkpoint ever reported; our keep-N pruning deletes old
    # ones, and Ray 2.60 then refuses to start the run. Resume reads storage itself
    # (checkpoint.restore_latest), so the snapshot is not needed.
    storage.delete_file(storage.join(cfg.run_uri, "checkpoint_manager_snapshot.json"), cfg.storage)
    storage.write_text(storage.join(cfg.run_uri, "config.yaml"), dump_yaml(cfg), cfg.storage)


def build_trainer(cfg: RunConfig, *, train, val, collate, progress_actor=None, callbacks=None,
                  data_stats: dict[str, float] | None = None, fault: str | None = None,
                  timeline_t0: float | None = None, trial_stop=None):
    """The TorchTrainer for one run; also used by each sweep trial's driver. train: the train split
    (a SampleSet: each rank reads its own samples, train/batches.py); val: the validation selection.
    timeline_t0: the driver's start (wall clock), against which rank 0 marks its start-up phases.
    trial_stop: a sweep trial's TrialStop (sweep/early_stop.py), which rank 0 watches."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from e2e_dist import storage
    from e2e_dist.train import elastic
    from e2e_dist.train.faults import fault_marker_dir
    from e2e_dist.train.loop import train_loop_per_worker
    from e2e_dist.train.ray_env import local_runtime_env_vars
    from e2e_dist.train.rendezvous import BoundStoreTorchConfig

    t = cfg.trainer
    use_gpu = t.use_gpu if t.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    backend = t.backend if t.backend != "auto" else ("nccl" if use_gpu else "gloo")
    loop_config = {"run": cfg.model_dump(mode="json"), "train": train, "val": val, "collate": collate,
                   "progress_actor": progress_actor, "timeline_t0": timeline_t0, "trial_stop": trial_stop,
                   "fault": fault, "fault_dir": fault_marker_dir(cfg.run_uri),
                   "data_stats": dict(data_stats or {})}
    run_config = ray.train.RunConfig(
        name=cfg.name,
        failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        # keep-N is ours (checkpoint.py deletes only after a newer commit): Ray keeps everything.
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
        worker_runtime_env={"env_vars": local_runtime_env_vars()},
        # an elastic run re-reads the live nodes before each restart (train/elastic.py)
        callbacks=[*(callbacks or []), *elastic.callbacks(t.elastic)],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        **storage.ray_storage_kwargs(cfg.storage.path, cfg.storage),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # rank 0's rendezvous store listens on its node's address only (train/rendezvous.py)
        torch_config=BoundStoreTorchConfig(backend=backend),
        # [min, max] -> Ray Train's elastic group: starts with what it gets, restarts smaller after a
        # lost node, grows back when a check finds capacity; resume reshards (train/resume.py).
        scaling_config=ray.train.ScalingConfig(num_workers=t.worker_range if t.elastic else t.num_workers,
                                               elastic_resize_monitor_interval_s=t.resize_check_s,
                                               use_gpu=use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=run_config,
    )


class RunFailed(UserError):
    """A run's Train fit failed; the message is one line: the root cause, then what to do now."""

    def __init__(self, name: str, root: str, what_now: str = "") -> None:
        self.name, self.root_cause, self.what_now = name, root, what_now
        super().__init__(f"run {name!r} failed: {root}" + (f"; {what_now}" if what_now else ""))

    def __reduce__(self):  # Tune ships a trial's error to the driver: rebuild it from its fields
        return (RunFailed, (self.name, self.root_cause, self.what_now))


def what_now(cfg: RunConfig) -> str:
    """After a failed fit: where the run can continue from, and how."""
    from e2e_dist import checkpoint as ckpt

    retries = "" if cfg.trainer.max_failures else " (trainer.max_failures > 0 restarts it by itself)"
    try:
        found, _ = ckpt.find_latest_committed(cfg.run_uri, cfg.storage)
    except Exception:  # noqa: BLE001 - storage gone too: the root cause says enough
        return ""
    if found is None:
        return f"no checkpoint was committed{retries}"
    return (f"its newest committed checkpoint is step {found.step}: the same command with --resume continues "
            f"from it{retries}")


def fit_run(cfg: RunConfig, *, resume: bool | None, address: str | None = None,
            progress: Literal["live", "quiet"] | None = None, callbacks=None, fault: str | None = None,
            t0: float | None = None, trial_stop=None, shared_data=None) -> RunSummary:
    """One run, from a validated config to a finished Ray Train fit: the one path of `e2e-dist train`
    and of every sweep trial. resume: see prepare_run_dir. address: the Ray cluster (None: the one
    this process is connected to, else a private local instance). progress: the workers report
    to a display actor, "live" also renders it on this console (None: no display, as in sweep
    trials, which have the sweep's table). fault: E2E_DIST_FAULT for drills (default: this process's environment).
    t0: when the run's clock starts (default: this process's start, so the CLI's imports count; a
    sweep trial passes its own). trial_stop: a sweep trial's TrialStop (its workers watch it).
    shared_data: a sweep's SharedData actor, which prepares each distinct data config once.
    Raises UserError before anything starts, RunFailed (the root cause in one line) after."""
    from e2e_dist import console
    from e2e_dist.data.registry import check_data

    timeline = Timeline(t0=t0) if t0 is not None else Timeline()
    check_data(cfg.data, cfg.storage)  # bad data paths: one line before Ray starts or anything is written
    prepare_run_dir(cfg, resume=resume)
    # A run of its own (not a sweep trial, whose sweep keeps the log) writes what libraries print to
    # its log file; the console keeps our lines.
    run_log = console.RunLog(console.default_log_path(cfg.run_uri, cfg.name)) if progress else None
    with run_log or contextlib.nullcontext():
        if run_log:
            log.info("log file: %s", run_log.path)
        timeline.mark("config checked")
        summary = _fit(cfg, address, progress, callbacks, fault, timeline, trial_stop, shared_data)
    summary.log_path = str(run_log.path) if run_log else None
    return summary


def _fit(cfg: RunConfig, address: str | None, progress, callbacks, fault: str | None, timeline: Timeline,
         trial_stop=None, shared_data=None) -> RunSummary:
    from e2e_dist import storage
    from e2e_dist.checkpoint import checkpoint_dir_name
    from e2e_dist.tracking.run_location import wandb_run_dir, wandb_stored_dir
    from e2e_dist.train import elastic
    from e2e_dist.train.progress import ProgressDisplay
    from e2e_dist.train.ray_env import init_ray

    init_ray(address)  # an open RunLog takes over Ray's worker output here (console.ray_started)
    timeline.mark("Ray up")
    if shared_data is not None:  # a sweep trial: prepared once per distinct data config (sweep/shared_data.py)
        from e2e_dist.sweep.shared_data import prepared_for

        data = prepared_for(shared_data, cfg)
    else:
        data = prepare_data(cfg, timeline)
    timeline.mark("data ready")
    record_run(cfg)
    display_cm = (ProgressDisplay(cfg.name, quiet=progress == "quiet", ckpt_every=cfg.trainer.ckpt_every,
                                  total=cfg.trainer.max_steps)
                  if progress else contextlib.nullcontext())
    with display_cm as display:
        trainer = build_trainer(cfg, train=data.train, val=data.val, collate=data.collate,
                                progress_actor=display.actor if display else None, callbacks=callbacks,
                                data_stats=data.stats,
                                fault=fault if fault is not None else os.environ.get("E2E_DIST_FAULT"),
                                timeline_t0=timeline.t0, trial_stop=trial_stop)
        timeline.mark("trainer started")
        try:
            # an elastic run's short worker-group start timeout, which Train's controller copies (train/elastic.py)
            with elastic.fit_env(cfg.trainer.elastic):
                result = trainer.fit()
            timeline.mark("fit returned")
        except Exception as e:  # Ray wraps worker errors; surface the root cause's one line
            timeline.mark("fit returned")
            timeline.log(f"run {cfg.name!r} timeline (failed)")
            raise RunFailed(cfg.name, root_cause(e), what_now(cfg)) from e
    metrics = dict(result.metrics or {})
    timeline.add_reported(metrics)
    timeline.log(f"run {cfg.name!r} timeline")
    metrics.update({k: v for k, v in timeline.metrics().items() if k not in metrics})
    # The final checkpoint is saved synchronously: a fit that returned has committed it.
    final = storage.join(cfg.run_uri, checkpoint_dir_name(metrics["step"])) if "step" in metrics else None
    return RunSummary(name=cfg.name, run_uri=cfg.run_uri, metrics=metrics, checkpoint_uri=final,
                      wandb_dir=wandb_run_dir(cfg), wandb_copy=wandb_stored_dir(cfg),
                      data_stats=dict(data.stats), wall_s=time.time() - timeline.t0)


@dataclass(kw_only=True)
class PreparedData:
    """A run's data as its workers get it (what a sweep shares between trials of one data config)."""

    train: Any
    """The train SampleSet: read by each rank, or in the object store (data.cache_mb)."""
    val: Any
    """The validation selection, in the object store (read in the background)."""
    collate: Any
    stats: dict[str, float] = field(default_factory=dict)


def prepare_data(cfg: RunConfig, timeline: Timeline | None = None) -> PreparedData:
    """The data source's splits (data/registry.py), then what the workers get of them."""
    from e2e_dist.data.registry import build_data

    bundle = build_data(cfg.data, cfg.model, cfg.storage)
    if timeline is not None:
        timeline.mark("data planned")
    train, val = prepare_splits(bundle, cfg)
    return PreparedData(train=train, val=val, collate=bundle.collate, stats=dict(bundle.stats))


def prepare_splits(bundle, cfg: RunConfig):
    """(train, val) as the workers get them. Validation: the fixed selection every evaluation scores
    (trainer.eval_samples spread over the split), read once into the object store in the background
    while Train starts its workers, and never more of the split. Train: a set worth it whose decoded size is under data.cache_mb is read and
    decoded once too, so every epoch gathers from memory; any other is read by each rank, its
    samples only."""
    from e2e_dist.console import FILE_ONLY
    from e2e_dist.data.order import eval_selection

    t0 = time.perf_counter()
    val = bundle.val.read_in_background(eval_selection(bundle.val.n, cfg.trainer.eval_samples))
    train = bundle.train.shared()
    if train.keep_in_memory(cfg.data.cache_mb):
        train = train.materialize()
    log.info("data: train %d samples in %d blocks (%s), val selection %d of %d samples (read in the background); prepared in %.1f s",
             train.n, train.blocks, "in memory" if train.materialized else "read by each rank", val.n, bundle.val.n,
             time.perf_counter() - t0, extra=FILE_ONLY)
    return train, val


def run_training(cfg: RunConfig, *, resume: bool = False, address: str | None = None, quiet: bool = False) -> RunSummary:
    """`e2e-dist train`: one run end to end, with a live progress display unless quiet."""
    return fit_run(cfg, resume=resume, address=address, progress="quiet" if quiet else "live")


def root_cause(e: BaseException) -> str:
    """`Type: last line` of the innermost cause (Ray wraps a worker's error several times)."""
    while e.__cause__ is not None:
        e = e.__cause__
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500]
