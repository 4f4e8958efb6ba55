"""Connecting to (or starting) Ray the same way everywhere: CLI, tests, benchmarks.

Why explicit everything: Ray advertises the machine's primary address unless told otherwise,
`address="auto"` picks a random cluster when two share a machine, and Ray 2.60 turns token auth
on by itself once `~/.ray/auth_token` exists. So a local instance binds 127.0.0.1, gets its own
temp dir and ports, and the auth mode is always set explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

from e2e_dist import console, ray_compat

LOOPBACK = "127.0.0.1"
WORKER_SETUP_HOOK = "e2e_dist.train.ray_env.setup_worker_process"
"""Ray's worker_process_setup_hook for every worker process of our jobs (see setup_worker_process)."""

# A single-node Ray on Linux advertises the machine's primary address, even with
# _node_ip_address="127.0.0.1" (Ray maps loopback back to the "reachable" address). This switch,
# read when Ray is imported, keeps a local instance on loopback. Set it before `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

NODE_DEATH_ENV = {
    # How soon a cluster's head calls a lost node dead. Its GCS health-checks every raylet with
    # these settings, read from the environment of the head's `ray start` (cluster/local.py sets
    # them on the heads we start; cluster/README.md says what a real cluster's head needs). Until
    # the node is dead, Train's elastic policy still counts it and tries a group of the old size
    # (train/elastic.py). Ray 2.60's defaults (3 s apart, 10 s timeout, dead after 5 failures in a
    # row) took 14.8 s for a killed node (connections refused) and 64.9 s for one gone from the
    # network (each check waits out its timeout); these take 5.1 s and 19.5 s (measured on the
    # separate-hosts cluster). A live node is declared dead only after 5 checks in a row went
    # unanswered (15+ s of silence). A raylet stopped with SIGTERM (a spot reclaim's notice, a node
    # stopped by hand) says goodbye and is dead at once either way. Not set on a private local
    # instance (init_ray): one node, nothing to lose but itself.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
}


TRAIN_CONTROLLER_ENV = {
    # Train V2's controller polls its workers this often (Ray's default: every 2 s), and each poll
    # is when it learns that the group started, a report arrived or the function returned: up to
    # 2 s added at a run's start and again at its end, per trial in a sweep. A poll is one small
    # RPC per worker; a worker that misses polls is called hung only after 10 min either way.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""Set in the driver (Train copies it to the controller it starts) and in the job's workers (a
sweep trial's actor starts its own Train controller)."""


def on_this_node() -> dict:
    """`.options(**on_this_node())`: hard affinity to this process's node, for a driver's helper
    actors (the progress display's, a sweep's stop board). Ray places a 0-CPU actor on whichever
    node it likes, and one placed on a node that is later lost dies with it (seen: the progress
    lines of an elastic run stopped for good after a node loss, and the driver said nothing). The
    driver's node lives as long as the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                  soft=False)}


def setup_worker_process() -> None:
    """Runs at the start of every Ray worker process of a run or sweep (the job's
    worker_process_setup_hook): SIGTERM takes a just-in-time checkpoint instead of killing the
    process (train/preemption.py), and our log records are tagged for the driver's console
    (console.py), in Ray Data's decode tasks too."""
    from e2e_dist.console import tag_our_lines
    from e2e_dist.train.preemption import install_sigterm_handler

    install_sigterm_handler()
    tag_our_lines()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass(kw_only=True)
class LocalRayOptions:
    num_cpus: int | None = None
    """CPUs the local instance offers (default: all)."""
    temp_dir: str | None = None
    """Ray's session/log directory (default: ./.cache/ray under the cwd, kept short for sockets)."""
    dashboard: bool = True
    """Train V2's placement-group cleaner and the state API need the dashboard; keep it on."""
    dashboard_port: int | None = None
    gcs_port: int | None = None


def local_runtime_env_vars() -> dict[str, str]:
    """Env vars every worker needs so DeepSpeed and friends behave the same as on the driver."""
    # Not HOME or PYTHONPATH: on a cluster those of the driver's node are wrong on the others.
    keep = ("TORCH_EXTENSIONS_DIR", "WANDB_MODE", "WANDB_DIR", "AWS_ENDPOINT_URL", "AWS_REGION",
            "AWS_DEFAULT_REGION", "E2E_DIST_CACHE")
    return {k: os.environ[k] for k in keep if k in os.environ}


def _cluster_runtime_env(address: str) -> dict | None:
    """runtime_env for a driver joining an existing cluster: the SIGTERM setup hook, if needed.

    Ray runs `worker_process_setup_hook` only from the job-level runtime_env, which a driver sets
    in ray.init. In a submitted job (`ray job submit`, `e2e-dist submit`) the job supervisor hands
    the driver the job's runtime_env in RAY_JOB_CONFIG_JSON_ENV_VAR, and ray.init merges ours into
    it key by key (ray/_private/worker.py init -> ray/runtime_env/runtime_env.py
    _merge_runtime_env): a key set on both sides is a conflict (an error, or ours replaces the
    job's under RAY_OVERRIDE_JOB_RUNTIME_ENV=1). So the hook is added only where the job has none:
    `e2e-dist submit` already puts it there, and a user's own hook is kept. Ray Client (ray://)
    never turns the hook into the workers' env var (its server marks the job `_client_job`, and
    ray.init skips upload_worker_process_setup_hook_if_needed), so there it would be a no-op.
    """
    if address.startswith("ray://"):
        return None
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job_config:  # a driver joining by address: no job runtime_env to merge with
        return {"worker_process_setup_hook": WORKER_SETUP_HOOK, "env_vars": dict(TRAIN_CONTROLLER_ENV)}
    try:
        job_hook = (json.loads(job_config).get("runtime_env") or {}).get("worker_process_setup_hook")
    except (ValueError, AttributeError):
        return None  # not what Ray writes: leave the merge to Ray alone
    if job_hook:
        if job_hook != WORKER_SETUP_HOOK:
            logging.getLogger("e2e_dist.launcher").warning(
                "the job's runtime_env sets worker_process_setup_hook=%s: SIGTERM will not take "
                "a just-in-time checkpoint (that needs %s)", job_hook, WORKER_SETUP_HOOK)
        return None
    return {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def _set_driver_env() -> None:
    """Ray's and Train's settings for this driver (kept where the caller set them already)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train V2's PreemptionWatcher (an actor per worker group that polls node drain state and
    # stores it for the training function to read) is not read by our loop: preemption reaches us
    # as SIGTERM (train/preemption.py). Ray 2.60 creates it restartable with actor handles as
    # arguments, which its core worker reports as an E-level line on every healthy run. Train
    # propagates this variable to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    for k, v in TRAIN_CONTROLLER_ENV.items():
        os.environ.setdefault(k, v)
    # Repeated worker lines are folded, which keeps the progress display readable.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data's progress bars are noise in CI logs and our own display.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def init_ray(address: str | None = None, opts: LocalRayOptions | None = None) -> None:
    """Connect to `address` (ray://, host:port; `auto`: the cluster `e2e-dist cluster local` keeps
    up on this machine, cluster/local_record.py) or, when None, start a private local instance.

    Inside a Ray job (`e2e-dist submit`, `ray job submit`) RAY_ADDRESS names the cluster: use it.
    No-op when Ray is already initialized in this process (tests share one instance).
    """
    import ray

    if ray.is_initialized():
        return
    _set_driver_env()
    # Ray Data may have read its settings at import already (the loop module imports it), and
    # datasets take their context from the driver: apply ours there now.
    quiet_library_logs()
    from e2e_dist.cluster.local_record import resolve_address

    address = resolve_address(address) or os.environ.get("RAY_ADDRESS")
    if address:
        if address.split("://")[-1].startswith("127."):  # a loopback cluster (`cluster local`): stay on loopback,
            ray_compat.disable_multinode_switch()        # where Ray would rewrite 127.0.0.1 to the primary address
        # The job's own runtime_env (working dir, env vars) applies; ours adds only the SIGTERM
        # hook, and only where Ray merges it without conflict and runs it (see below).
        ray.init(address=address, log_to_driver=True, runtime_env=_cluster_runtime_env(address), **_logging_kwargs())
        console.ray_started()
        pin_shared_actors_here()
        return
    # Actors that use the state API (Train V2's placement-group cleaner) find "the" cluster by
    # RAY_ADDRESS; with several clusters on one machine, auto-detection fails.
    # SIGTERM -> just-in-time checkpoint (train/preemption.py). Ray runs the setup hook only from
    # the job-level runtime_env, not from an actor's.
    runtime_env = {"env_vars": {}, "worker_process_setup_hook": WORKER_SETUP_HOOK}
    opts = opts or LocalRayOptions()
    temp_dir = opts.temp_dir or str(Path(".cache/ray").resolve())
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    gcs_port = opts.gcs_port or int(os.environ.get("RAY_GCS_SERVER_PORT") or free_port())
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    runtime_env["env_vars"]["RAY_ADDRESS"] = f"{LOOPBACK}:{gcs_port}"
    # ray may have been imported before this module could set the switch above (library use)
    ray_compat.disable_multinode_switch()
    ray.init(
        address="local",
        num_cpus=opts.num_cpus,
        include_dashboard=opts.dashboard,
        dashboard_host=LOOPBACK,
        dashboard_port=opts.dashboard_port or free_port(),
        **ray_compat.local_init_kwargs(node_ip=LOOPBACK, temp_dir=temp_dir),
        runtime_env=runtime_env,
        log_to_driver=True,
        **_logging_kwargs(),
    )
    console.ray_started()


def _logging_kwargs() -> dict:
    """ray.init's logging: left alone while a run's log file is open (Ray's records then reach it
    through the root logger; Ray's own setup would put a console handler back before the run can
    take it away), else Ray's console handler at WARNING."""
    if console.run_log_open():
        return {"configure_logging": False}
    return {"configure_logging": True, "logging_level": "WARNING"}


def pin_shared_actors_here() -> None:
    """Create Ray's cluster-wide detached helper actors on this (the driver's) node if they do not
    exist yet: Ray Data's / Train V2's autoscaling coordinator and Ray Data's stats actor.

    Why: Ray creates each on first use as a *detached* actor with hard affinity to the node of
    whoever used it first. In a sweep that is a trial on an autoscaled worker node, and a node
    hosting an actor is never idle: seen here, the node stayed up for good after the sweep ended
    (on AWS, a GPU node billed until someone notices). Jobs run their driver on the head, which
    never scales down anyway.
    """
    for pin, what in ((ray_compat.pin_autoscaling_coordinator_here, "AutoscalingCoordinator"),
                      (ray_compat.pin_data_stats_actor_here, "Ray Data stats actor")):
        try:
            pin()
        except ray_compat.RayCompatError as e:  # the run itself is unaffected: say what is lost
            logging.getLogger("e2e_dist.launcher").warning(
                "could not pre-create Ray's %s on this node: idle worker nodes may not scale down after a "
                "sweep (%s)", what, e)


class _DropProgressBarNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


_PROGRESS_BAR_NOTICE = _DropProgressBarNotice()  # one instance: adding it to a handler again is a no-op


def quiet_library_logs() -> None:
    """Keep libraries' INFO chatter (Ray Data plans, Ray Train's echo of every report with all its
    metrics) off the console, where it drowns our progress lines; Ray Data's log file keeps all.

    Called by the driver (init_ray) and by every training worker (the loop)."""
    for name in ("ray.train", "ray.tune", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls torch collectives under their deprecated names (a warning per rank).
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    import ray.data

    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1") == "1":
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        ray_compat.quiet_ray_loggers()
    except ray_compat.RayCompatError as e:  # only the console gets noisier
        logging.getLogger("e2e_dist.launcher").warning("%s", e)
    for handler in logging.getLogger("ray.data").handlers:
        handler.addFilter(_PROGRESS_BAR_NOTICE)
