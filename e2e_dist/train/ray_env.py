"""Connecting to (or starting) Ray the same way everywhere: CLI, tests, benchmarks.

Why explicit everything: Ray advertises the machine's primary address unless told otherwise,
`address="auto"` picks a random cluster when two share a machine, and Ray 2.60 turns token auth
on by itself once `~/.ray/auth_token` exists. So a local instance binds 127.0.0.1, gets its own
temp dir and ports, and the auth mode is always set explicitly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
SIGTERM_SETUP_HOOK = "e2e_dist.train.preemption.install_sigterm_handler"

# A single-node Ray on Linux advertises the machine's primary address, even with
# _node_ip_address="127.0.0.1" (Ray maps loopback back to the "reachable" address). This switch,
# read when Ray is imported, keeps a local instance on loopback. Set it before `import ray`.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


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


def init_ray(address: str | None = None, opts: LocalRayOptions | None = None) -> None:
    """Connect to `address` (ray://, host:port) or, when None, start a private local instance.

    Inside a Ray job (`e2e-dist submit`, `ray job submit`) RAY_ADDRESS names the cluster: use it.
    No-op when Ray is already initialized in this process (tests share one instance).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Repeated worker lines are folded, which keeps the progress display readable.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data's progress bars are noise in CI logs and our own display.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # The job's own runtime_env (working dir, env vars) applies; passing another one here
        # makes Ray refuse to merge them.
        ray.init(address=address, log_to_driver=True)
        return
    # Actors that use the state API (Train V2's placement-group cleaner) find "the" cluster by
    # RAY_ADDRESS; with several clusters on one machine, auto-detection fails.
    # SIGTERM -> just-in-time checkpoint (train/preemption.py). Ray runs the setup hook only from
    # the job-level runtime_env, not from an actor's.
    runtime_env = {"env_vars": {}, "worker_process_setup_hook": SIGTERM_SETUP_HOOK}
    opts = opts or LocalRayOptions()
    temp_dir = opts.temp_dir or str(Path(".cache/ray").resolve())
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    gcs_port = opts.gcs_port or int(os.environ.get("RAY_GCS_SERVER_PORT") or free_port())
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    runtime_env["env_vars"]["RAY_ADDRESS"] = f"{LOOPBACK}:{gcs_port}"
    if ray._private.ray_constants.ENABLE_RAY_CLUSTER:
        # ray was imported before this module could set the switch above (library use): apply it.
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address="local",
        num_cpus=opts.num_cpus,
        include_dashboard=opts.dashboard,
        dashboard_host=LOOPBACK,
        dashboard_port=opts.dashboard_port or free_port(),
        _node_ip_address=LOOPBACK,
        _temp_dir=temp_dir,
        runtime_env=runtime_env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
