"""Local multi-node Ray clusters on one machine: head + N worker nodes, or the fake autoscaler.

Every node is a `ray start --block` subprocess in its own session (process group), with its own
`--temp-dir`, explicit ports and `--node-ip-address 127.0.0.1`. Why each of those:

- own temp dir: nodes sharing one break the first `working_dir` job (the driver's cwd is
  deleted under it), and the temp dir names the processes we own when stopping;
- explicit ports: two nodes on one address must not race for Ray's defaults (client server
  10001, dashboard agent 52365, ...), and the client-server port must lie outside the worker
  port range (10002-19999 by default); each node gets its own worker port range;
- 127.0.0.1: Ray otherwise advertises the machine's primary address;
- `--block` in a new session: the `ray start` process is a process-group leader, cleans up its
  children on SIGTERM, and Ray's reaper kills the group if it dies. `stop()` therefore touches
  exactly the processes this object started (never `ray stop`, which kills every Ray on the host).

The fake autoscaling cluster (`autoscale=True`, config in cluster/local_autoscale.py): its worker
nodes are started by the autoscaler (monitor) process in the head's process group and temp dir.

Split by concern: one node's process (cluster/local_node.py), worker port blocks
(cluster/local_ports.py), the autoscaler config (cluster/local_autoscale.py); all importable from
here as before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from e2e_dist.cluster.local_autoscale import DEFAULT_AUTOSCALE_CONFIG, REPO_ROOT, render_autoscale_config
from e2e_dist.cluster.local_node import (
    LocalClusterError,
    LocalNode,
    node_pids,
    ray_start_command,
    stop_node,
    wait_ready,
)
from e2e_dist.cluster.local_ports import pick_worker_port_range
from e2e_dist.train.ray_env import LOOPBACK, free_port

__all__ = [
    "DEFAULT_AUTOSCALE_CONFIG", "REPO_ROOT", "LocalCluster", "LocalClusterError", "LocalNode",
    "pick_worker_port_range", "ray_start_command", "render_autoscale_config",
]


class LocalCluster:
    """A Ray cluster of `ray start` processes on 127.0.0.1, started and stopped as one:
    `with LocalCluster(nodes=1, num_cpus_per_node=1) as c: JobSubmissionClient(c.dashboard_url)`.

    `nodes` counts worker nodes (the head comes on top); with `autoscale=True` no worker nodes
    are started by us: the fake autoscaler adds and removes them from `autoscaling_config`.
    """

    def __init__(
        self,
        nodes: int = 1,
        num_cpus_per_node: int = 1,
        *,
        head_num_cpus: int | None = None,
        autoscale: bool = False,
        autoscaling_config: str | Path | None = None,
        idle_timeout_minutes: float | None = None,
        auth_mode: str = "disabled",
        home: str | Path | None = None,
        base_dir: str | Path | None = None,
        object_store_memory: int | None = None,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 120.0,
        start_attempts: int = 2,
    ) -> None:
        if nodes < 0 or num_cpus_per_node < 0:
            raise LocalClusterError(f"nodes={nodes} and num_cpus_per_node={num_cpus_per_node} must be >= 0")
        if auth_mode not in ("disabled", "token"):
            raise LocalClusterError(f"auth_mode={auth_mode!r}: use 'disabled' or 'token'")
        self.num_workers = 0 if autoscale else nodes
        self.num_cpus_per_node = num_cpus_per_node
        self.head_num_cpus = num_cpus_per_node if head_num_cpus is None else head_num_cpus
        self.autoscale = autoscale
        self.autoscaling_config = Path(autoscaling_config or DEFAULT_AUTOSCALE_CONFIG)
        self.idle_timeout_minutes = idle_timeout_minutes
        self.auth_mode = auth_mode
        self.home = Path(home) if home else None
        self.object_store_memory = object_store_memory
        self.extra_env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.start_attempts = max(1, start_attempts)
        # Short path: Ray's unix sockets live under the temp dirs (108-byte limit).
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="e2elc-", dir="/tmp"))
        self.nodes: list[LocalNode] = []
        self._taken_ranges: list[range] = []
        self.gcs_port = 0
        self.dashboard_port = 0
        self._stopped = False

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """GCS address (`ray.init(address=...)`, `ray start --address`)."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard, state API and Ray Jobs API (`JobSubmissionClient`, `ray job submit`)."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def node_env(self) -> dict[str, str]:
        """Environment of every node process: explicit auth mode, optional private HOME."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env["RAY_AUTH_MODE"] = self.auth_mode
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # A local cluster serves no traffic: skip the 30 s drain Ray 2.60 does on SIGTERM.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        if self.home:
            self.home.mkdir(parents=True, exist_ok=True)
            env["HOME"] = str(self.home)
        env.pop("RAY_ADDRESS", None)  # never let a node join some other cluster
        # Jobs run `e2e-dist ...` / `python ...`: resolve them in this environment (the venv).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> "LocalCluster":
        """Start the head, then the worker nodes; return once every node reports ready."""
        env = self.node_env()
        if self.auth_mode == "token":
            self._ensure_token(env)
        try:
            self._start_head(env)
            for i in range(self.num_workers):
                self._start_worker(env, i + 1)
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure_token(self, env: dict[str, str]) -> None:
        # `ray start --head` with RAY_AUTH_MODE=token refuses to start without a token.
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def _common_args(self, name: str, num_cpus: int) -> tuple[list[str], dict[str, int]]:
        workers = pick_worker_port_range(self._taken_ranges)
        self._taken_ranges.append(workers)  # (a retried node's old block stays reserved: harmless)
        ports = {
            "node_manager": free_port(), "object_manager": free_port(), "metrics_export": free_port(),
            "dashboard_agent_listen": free_port(), "dashboard_agent_grpc": free_port(),
            "runtime_env_agent": free_port(), "min_worker": workers.start, "max_worker": workers.stop - 1,
        }
        temp_dir = self.base_dir / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "--block", "--node-ip-address", LOOPBACK, "--temp-dir", str(temp_dir),
            "--num-cpus", str(num_cpus), "--disable-usage-stats",
            "--node-manager-port", str(ports["node_manager"]),
            "--object-manager-port", str(ports["object_manager"]),
            "--metrics-export-port", str(ports["metrics_export"]),
            "--dashboard-agent-listen-port", str(ports["dashboard_agent_listen"]),
            "--dashboard-agent-grpc-port", str(ports["dashboard_agent_grpc"]),
            "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
            "--min-worker-port", str(ports["min_worker"]), "--max-worker-port", str(ports["max_worker"]),
        ]
        if self.object_store_memory:
            args += ["--object-store-memory", str(self.object_store_memory)]
        return args, ports

    def _head_args(self, env: dict[str, str]) -> tuple[list[str], dict[str, str], dict[str, int]]:
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        args, ports = self._common_args("head", self.head_num_cpus)
        client_port = free_port()  # ephemeral range: outside every worker port range
        args += [
            "--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
            "--dashboard-host", LOOPBACK, "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(client_port),
        ]
        ports.update(gcs=self.gcs_port, dashboard=self.dashboard_port, ray_client=client_port)
        head_env = dict(env)
        if self.autoscale:
            config = render_autoscale_config(
                self.autoscaling_config, self.gcs_port, self.base_dir / "autoscaling.yaml",
                idle_timeout_minutes=self.idle_timeout_minutes)
            args += ["--autoscaling-config", str(config)]
            # The fake provider (in the autoscaler process) starts worker nodes at Ray's
            # get_node_ip_address(): the loopback address, see ray_start_command().
            head_env["RAY_FAKE_CLUSTER"] = "1"
        # The autoscaler's metrics server defaults to one fixed port (44217) for every cluster.
        head_env["AUTOSCALER_METRIC_PORT"] = str(free_port())
        return args, head_env, ports

    def _start_head(self, env: dict[str, str]) -> None:
        self.nodes.append(self._launch("head", lambda: self._head_args(env)))

    def _start_worker(self, env: dict[str, str], index: int) -> None:
        name = f"worker{index}"

        def build() -> tuple[list[str], dict[str, str], dict[str, int]]:
            args, ports = self._common_args(name, self.num_cpus_per_node)
            return [*args, "--address", self.address], env, ports

        self.nodes.append(self._launch(name, build))

    def _launch(self, name: str, build: Callable[[], tuple[list[str], dict[str, str], dict[str, int]]]) -> LocalNode:
        """Start one node; a second try (fresh ports, empty temp dir) if the first fails to come up.

        Why retry: Ray gives a new raylet a fixed 30 s to register with the GCS, which a loaded
        2-core machine can miss; the node then exits with "timed out during startup".
        """
        temp_dir, log_path = self.base_dir / name, self.base_dir / f"{name}.log"
        for attempt in range(1, self.start_attempts + 1):
            shutil.rmtree(temp_dir, ignore_errors=True)
            args, env, ports = build()
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(ray_start_command(args), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            node = LocalNode(name=name, temp_dir=temp_dir, log_path=log_path, popen=popen, ports=ports)
            try:
                wait_ready(node, self.start_timeout_s)
                return node
            except LocalClusterError:
                if attempt == self.start_attempts:
                    raise
                shutil.copy(log_path, self.base_dir / f"{name}.attempt{attempt}.log")
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ processes and stop
    def pids(self) -> set[int]:
        """PIDs of every live process this cluster owns (all nodes)."""
        return set().union(*(node_pids(n) for n in self.nodes)) if self.nodes else set()

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop exactly what this cluster started: worker nodes first, then the head."""
        if self._stopped:
            return
        self._stopped = True
        for node in reversed(self.nodes):
            stop_node(node, timeout_s)
        if self._own_base and not os.environ.get("E2E_DIST_KEEP_CLUSTER_DIRS"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def describe(self) -> str:
        """Human-readable addresses (printed by `e2e-dist cluster local`)."""
        kind = "fake autoscaling cluster" if self.autoscale else f"head + {self.num_workers} worker node(s)"
        lines = [
            f"local Ray cluster: {kind} on {LOOPBACK} (auth: {self.auth_mode})",
            f"  GCS address      : {self.address}   (ray.init(address=...), RAY_ADDRESS)",
            f"  dashboard / jobs : {self.dashboard_url}   (e2e-dist submit --address ..., ray job submit)",
        ]
        for n in self.nodes:
            lines.append(f"  node {n.name:<8}: pid {n.popen.pid}, temp dir {n.temp_dir}, log {n.log_path}")
        auth = "RAY_AUTH_MODE=token " if self.auth_mode == "token" else ""
        lines.append(f"  watch nodes      : {auth}ray list nodes --address {self.dashboard_url}")
        return "\n".join(lines)
