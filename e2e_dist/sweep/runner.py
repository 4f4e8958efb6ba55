"""`e2e-dist sweep` and `e2e-dist scaling`: a Ray Tune Tuner whose trials are our DeepSpeed runs.

Each Tune trial runs `trial_driver`, a function that builds the trial's RunConfig, its datasets and
a TorchTrainer (the same `build_trainer` as `e2e-dist train`) and fits it. Why a function and not
`Tuner(trainer, param_space={"train_loop_config": ...})`: that form fails under Ray Train V2
("Improper 'run'"). Train reports reach Tune through `TuneReportCallback`; the driver holds
`driver_cpus` (0.01 by default: Ray refuses 0) and the Train workers hold the rest, so two trials
of one 0.99-CPU worker each fit a 2-CPU machine.

Layout of a sweep at `<storage.path>/<name>/`:
    sweep.json       the validated sweep (a resume must match it)
    results.jsonl    one row per finished trial (schema: e2e_dist/sweep/scaling.py)
    _tune/           Tune's experiment state (what `--resume` restores) and per-trial result logs
    <trial name>/    each trial's run dir: checkpoints, config.yaml, W&B files (local storage)

A trial's W&B run id derives from its unique run name and its place, so no two trials share a
run (unlike ray#28919 / ray#33084, where reused actors or a shared W&B process mixed trials).

Early stopping: a trial the scheduler (ASHA) stops ends at its next report with its W&B run finished
as stopped and its checkpoints committed (e2e_dist/sweep/early_stop.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from typing import Any, Iterator

from ray.tune.integration.ray_train import TuneReportCallback

from e2e_dist import storage
from e2e_dist.config import RunConfig, redact
from e2e_dist.errors import ConfigError, UserError
from e2e_dist.sweep import shared_data
from e2e_dist.sweep.results import SPEC_FILE
from e2e_dist.sweep.early_stop import (ReportUnlessStopped, StopAtNextReport, await_graceful_stop, begin_trial,
                                       start_board, stop_grace_s)
from e2e_dist.sweep.spec import SweepSpec, flatten_params, load_sweep
from e2e_dist.sweep.table import SweepBook, SweepCallback, register_book, trial_index

TUNE_DIR = "_tune"
WORKER_START_TIMEOUT_S = "900"
"""Train worker groups of a sweep wait for CPUs that other trials still hold (Ray's default is 60 s)."""
log = logging.getLogger("e2e_dist.sweep")


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before every trial finished (Ctrl+C): finished rows are written."""

    def __init__(self, rows: list[dict[str, Any]], unfinished: list[str]) -> None:
        super().__init__(f"{len(unfinished)} trial(s) unfinished")
        self.rows, self.unfinished = rows, unfinished


# ------------------------------------------------------------------------------ the trial driver
def trial_run_config(spec: SweepSpec, params: dict[str, Any], trial_id: str) -> RunConfig:
    """The RunConfig of one Tune trial: `spec.run_config_for` plus the swept values as W&B tags
    (they are in the W&B config too, under their sections; tags make them visible in run lists)."""
    cfg = spec.run_config_for(params, index=trial_index(spec, trial_id))
    tags = [f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
            for k, v in flatten_params(params).items()]
    cfg.tracking.tags = list(dict.fromkeys([*cfg.tracking.tags, *(t[:64] for t in tags)]))
    return cfg


def trial_driver(config: dict[str, Any], spec: SweepSpec, board: Any = None, fault: str | None = None) -> None:
    """One Tune trial (runs in the trial's actor): the same `fit_run` as `e2e-dist train`,
    continuing the trial's newest committed checkpoint when Tune runs it again (`--resume`).

    With a `board` (run_sweep always passes one), a trial the scheduler stops ends gracefully at
    its next report (see "Early stopping" in the module docstring); fit() then raises Ray's abort,
    and the trial returns normally. fault: the sweep command's E2E_DIST_FAULT (drills)."""
    from ray import tune

    from e2e_dist.console import tag_our_lines
    from e2e_dist.train.launcher import RunFailed, fit_run

    t0 = time.time()  # the trial's clock (its actor's process may be older: Ray pools them)
    tag_our_lines()
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_run_config(spec, config, trial_id)
    _pin_cluster_address()
    shared = shared_data.lookup(spec.sweep_uri)
    stop = None
    if board is not None:
        stop = begin_trial(board, trial_id)
    callbacks = [TuneReportCallback()] if stop is None else [ReportUnlessStopped(stop), StopAtNextReport(stop)]
    try:
        # "" (not None): the trial's drill is the sweep command's, never this actor's environment
        fit_run(cfg, resume=None, callbacks=callbacks, fault=fault or "", t0=t0, trial_stop=stop, shared_data=shared)
    except RunFailed as e:  # the trial's error file ends with the root cause
        decision = stop.requested() if stop is not None else None
        if decision is not None:
            # fit() returns once Train has shut the workers down and removed their placement group
            log.info("trial %s: stopped by the scheduler; its workers were released %.1f s after the decision",
                     cfg.name, time.time() - decision.get("at", time.time()))
            log.debug("trial %s: the aborted Train run said: %s", cfg.name, e.root_cause)
            return
        raise
    finally:
        if stop is not None:
            stop.finished()


def _pin_cluster_address() -> None:
    """Let this trial's Train controller and its placement-group cleaner find *this* Ray cluster.

    When Tune ends a trial's actor without a graceful stop (Ctrl+C; a stopped trial that reached no
    report in time), the Train controller it owns dies with it; the worker placement group (scoped
    to the job, not the controller) is then freed only by Train's detached PlacementGroupCleaner,
    which asks the state API whether the controller is alive. Without RAY_ADDRESS that API
    auto-detects the cluster and fails when the machine runs several Ray instances ("Found multiple
    active Ray instances", seen with ray 2.60): the group leaks its CPUs and the sweep deadlocks
    once leaks fill the machine. Train V2 copies the variables in its ENV_VARS_TO_PROPAGATE from
    here to the controller, whose children (the cleaner) inherit its runtime env.
    """
    import ray

    from e2e_dist import ray_compat

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    ray_compat.propagate_env_to_train_controller("RAY_ADDRESS")


# ---------------------------------------------------------------------------------- the Tuner
def _tune_location(spec: SweepSpec) -> tuple[str, Any]:
    """(experiment path as Tune takes it, pyarrow filesystem or None) of `<sweep>/_tune`."""
    kwargs = storage.ray_storage_kwargs(spec.sweep_uri, spec.base_config.storage)
    return kwargs["storage_path"].rstrip("/") + "/" + TUNE_DIR, kwargs.get("storage_filesystem")


def _scheduler(spec: SweepSpec):
    s = spec.scheduler
    if s.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t is not cut at its last report; every
    # trial that ASHA does not stop runs to trainer.max_steps (its final checkpoint and W&B finish).
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _trial_namer(spec: SweepSpec):
    def name(trial) -> str:  # Tune's trial name and folder: our run name (short, unique)
        return spec.run_config_for(dict(trial.config), index=trial_index(spec, trial.trial_id)).name

    return name


def _trainable(spec: SweepSpec, board: Any = None):
    """The trial driver as a Tune trainable: Tune's own wrapper of the function, whose `cleanup`
    (Tune's hook for a stopping trainable) first lets a scheduler-stopped trial end gracefully.
    Same trainable name as the bare function ("trial_driver"), so `Tuner.restore` accepts either."""
    from ray import tune

    from e2e_dist import ray_compat

    # A fault drill given to the sweep command reaches its trials (their actors do not see our env).
    driver = tune.with_parameters(trial_driver, spec=spec, board=board, fault=os.environ.get("E2E_DIST_FAULT"))

    class SweepTrial(ray_compat.function_trainable_class(driver)):
        def cleanup(self) -> None:
            await_graceful_stop()
            super().cleanup()

    return tune.with_resources(SweepTrial, {"cpu": spec.resources_per_trial.driver_cpus})


def build_tuner(spec: SweepSpec, *, resume: bool, callback_key: str, board: Any = None):
    """A new Tuner for the sweep, or the interrupted one restored from `<sweep>/_tune`. `board`:
    a `StopBoard` actor, for graceful early stops (without one a stopped trial is just ended)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path, fs = _tune_location(spec)
    if resume:
        # Finished trials stay finished; interrupted and errored ones run again, and their loop
        # continues from the newest committed checkpoint of their run dir.
        return tune.Tuner.restore(path, _trainable(spec, board), resume_unfinished=True, resume_errored=True,
                                  restart_errored=False, param_space=spec.tune_param_space(),
                                  storage_filesystem=fs)
    namer = _trial_namer(spec)
    tune_config = tune.TuneConfig(
        metric=spec.metric, mode=spec.mode, scheduler=_scheduler(spec), num_samples=spec.num_samples,
        search_alg=BasicVariantGenerator(max_concurrent=spec.max_concurrent_trials or 0, random_state=spec.seed),
        reuse_actors=False,  # a fresh actor per trial: no W&B or Train state leaks between trials
        trial_name_creator=namer, trial_dirname_creator=namer)
    run_config = tune.RunConfig(
        name=TUNE_DIR, storage_path=path.rsplit("/", 1)[0], storage_filesystem=fs,
        callbacks=[SweepCallback(callback_key)], verbose=0,  # our table replaces Tune's console output
        failure_config=tune.FailureConfig(max_failures=0))
    return tune.Tuner(_trainable(spec, board), param_space=spec.tune_param_space(), tune_config=tune_config,
                      run_config=run_config)


# ------------------------------------------------------------------------------ state on disk
def _spec_record(spec: SweepSpec) -> dict[str, Any]:
    """What a resume must find unchanged: the sweep fields and the resolved base config (of its
    storage only the path: an endpoint or region is how to reach it, and may change)."""
    base = json.loads(json.dumps(spec.base_data(), default=str))
    base["storage"] = {"path": base.get("storage", {}).get("path")}
    return redact({"sweep": spec.model_dump(mode="json", exclude={"storage"}), "base": base})


def prepare_sweep_dir(spec: SweepSpec, *, resume: bool) -> None:
    """Refuse to clobber a sweep, to resume one that never started, or to resume a changed one."""
    cfg = spec.base_config.storage
    storage.check_access(spec.sweep_uri, cfg)
    started = storage.exists(storage.join(spec.sweep_uri, TUNE_DIR, "tuner.pkl"), cfg)
    spec_uri = storage.join(spec.sweep_uri, SPEC_FILE)
    if resume and not started:
        raise UserError(f"--resume: no sweep state under {redact(spec.sweep_uri)}/{TUNE_DIR} (start it without --resume)")
    if not resume and (started or storage.exists(spec.results_uri, cfg)):
        raise UserError(f"sweep {spec.name!r} already exists at {redact(spec.sweep_uri)}: pass --resume to continue "
                        f"it, or --set name=<new name>")
    record = _spec_record(spec)
    if resume and storage.exists(spec_uri, cfg):
        before = json.loads(storage.read_text(spec_uri, cfg))
        if (diff := _first_difference(before, record)) is not None:
            raise ConfigError(f"--resume: the sweep changed since it started ({diff}); "
                              f"run the changed sweep under a new name (--set name=...)")
    if not resume:
        storage.write_text(spec_uri, json.dumps(record, indent=1, sort_keys=True), cfg)


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if (d := _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))) is not None:
                return d
        return None
    return None if a == b else f"{where}: {a!r} -> {b!r}"


# ------------------------------------------------------------------------------------- run
def run_sweep(spec: SweepSpec, *, resume: bool = False, address: str | None = None,
              live: bool | None = None, out=None) -> list[dict[str, Any]]:
    """Run (or `resume`) a sweep to the end; return the rows written to results.jsonl.

    Shows a live table of trials (a TTY; one line per event otherwise) and a final table sorted
    by the target metric. Raises SweepInterrupted (a KeyboardInterrupt) after Ctrl+C, once the
    finished trials' rows are written, and UserError on bad input.
    """
    from e2e_dist import console

    spec = spec.with_absolute_paths()
    prepare_sweep_dir(spec, resume=resume)
    # What Ray, Tune and the trials' libraries print goes to the sweep's log file; of the trials' own
    # lines the console shows warnings (the table says what each trial does).
    with console.RunLog(console.default_log_path(spec.sweep_uri, spec.name), worker_level=logging.WARNING) as run_log:
        return _run_sweep(spec, resume, address, live, out, run_log.path)


def _run_sweep(spec: SweepSpec, resume: bool, address: str | None, live: bool | None, out, log_path) -> list[dict[str, Any]]:
    from e2e_dist import console
    from e2e_dist.train.ray_env import init_ray

    init_ray(address)  # keeps the dashboard on: Train V2 frees finished trials' placement groups through it

    import ray

    out = out or sys.stdout
    board = start_board()
    shared = shared_data.start(spec.sweep_uri)  # each distinct data config prepared once, for every trial
    book = SweepBook(spec, live=live, out=out, board=board, stop_grace_s=stop_grace_s())
    key = spec.sweep_uri
    register_book(key, book)
    try:
        with _sweep_env():
            tuner = build_tuner(spec, resume=resume, callback_key=key, board=board)
            print(f"sweep {spec.name}: {spec.num_trials()} trial(s), results in {redact(spec.sweep_uri)}"
                  + (" (resumed)" if resume else "") + f"\nlog file: {log_path}", file=out, flush=True)
            # Tune prints its own setup box and hints (TensorBoard, results folder): to the log file
            with contextlib.redirect_stdout(console.library_stream()):
                tuner.fit()
        if not book.experiment_ended:  # defensive: Tune always calls on_experiment_end
            raise RuntimeError("Ray Tune returned without ending the experiment")
        rows = book.write_results()
    finally:
        book.stop_live()
        register_book(key, None)
        with contextlib.suppress(Exception):
            log.info("sweep %s: data prepared %s", spec.name, ray.get(shared.counts.remote(), timeout=10),
                     extra=console.FILE_ONLY)
        ray.kill(board)
        ray.kill(shared)
    _print_final(book, out, log_path)
    left = trials_left(spec, len(rows), [r.name for r in book.unfinished_rows()])
    if left:
        raise SweepInterrupted(rows, left)
    return rows


def trials_left(spec: SweepSpec, finished: int, unfinished: list[str]) -> list[str]:
    """What a sweep still owes after Tune returned: the trials it started and did not finish, and
    the ones it never created. Ctrl+C between two trials leaves nothing unfinished that Tune knows
    of (after SIGINT its fit returns normally, whenever the signal came): only the plan tells."""
    not_started = max(spec.num_trials() - finished - len(unfinished), 0)
    return [*unfinished, *(f"(not started {i + 1})" for i in range(not_started))]


@contextlib.contextmanager
def _sweep_env() -> Iterator[None]:
    """Environment of the Tune driver while the sweep runs (restored after: tests share a process).

    Tune copies these to every trial's actor (class_cache.ENV_VARS_TO_PROPAGATE) and Train V2 on to
    the controller: the trial driver keeps the command's working directory instead of Tune's trial
    folder, and a worker group may wait for CPUs that a finishing trial still holds (Ray's 60 s
    default fails such trials on a busy 2-CPU machine). Between evaluations the loop also reports
    at checkpoints, without val_loss: ASHA skips such results, Tune's strict check would fail them.
    """
    wanted = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": WORKER_START_TIMEOUT_S,
              "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    saved = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        os.environ.setdefault(k, v)  # a value the user set wins
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _print_final(book: SweepBook, out, log_path) -> None:
    from rich.console import Console

    console = Console(file=out, width=max(120, Console(file=out).width))
    console.print(book.table("final"))
    print(f"results: {redact(book.spec.results_uri)}\nlog file: {log_path}", file=out, flush=True)


# ------------------------------------------------------------------------------------- CLI
def run_sweep_cli(args) -> int:
    """`e2e-dist sweep FILE [--set k=v ...] [--resume] [--address A]`: 0 when every trial finished
    without error, 1 when some failed, 130 when interrupted (finished rows are written)."""
    spec = load_sweep(args.sweep_file, args.overrides)
    try:
        rows = run_sweep(spec, resume=args.resume, address=args.address)
    except SweepInterrupted as e:
        again = shlex.join(["e2e-dist", "sweep", args.sweep_file, *(f"--set={o}" for o in args.overrides),
                            *(["--address", args.address] if args.address else []), "--resume"])
        print(f"sweep interrupted: {len(e.rows)} trial(s) finished, {len(e.unfinished)} unfinished. "
              f"Continue with:\n  {again}", file=sys.stderr)
        return 130
    failed = [r["trial"] for r in rows if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} trial(s) failed: {', '.join(failed)} (their errors are in results.jsonl; "
              f"`--resume` retries them)", file=sys.stderr)
        return 1
    return 0
