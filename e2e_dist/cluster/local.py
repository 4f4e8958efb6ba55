"""Local multi-node Ray clusters on one machine: head + N worker nodes, or an autoscaling cluster.

Every node is a `ray start --block` subprocess in its own session (process group) with its own
directory: Ray temp dir, HOME and TMPDIR, as a machine of its own would have. Two modes:

- loopback (default, any user): every node on 127.0.0.1 (autoscaled nodes on 127.0.0.N), explicit
  ports so nodes sharing an address never race for Ray's defaults;
- separate hosts (`separate_hosts=True`, root): each node in its own network namespace with its
  own address on a private bridge (cluster/netns.py). Nothing is shared but the network. The
  head's dashboard / Jobs API is forwarded to 127.0.0.1 here (as `ray dashboard` tunnels it for a
  real cluster) and `expose(port)` makes a service on this machine's loopback (an S3 server, say)
  reachable from the nodes at the gateway address (cluster/forward.py).

Why each node gets its own temp dir: nodes sharing one share Ray's runtime-env cache, and one
node's cleanup deleted the working dir a job's driver on another still ran in. Why explicit
addresses: Ray otherwise advertises the machine's primary address. Why `--block` in a new
session: the `ray start` process is a process-group leader, cleans up its children on SIGTERM,
and `stop()` touches exactly the processes this object started (never `ray stop`, which kills
every Ray on the host).

With `autoscale=True` no worker nodes are started here: the autoscaler adds and removes them from
`autoscaling_config` through our node provider (cluster/local_provider.py), made the same way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from e2e_dist.cluster.forward import Endpoint, Forwarder
from e2e_dist.cluster.local_autoscale import (
    DEFAULT_AUTOSCALE_CONFIG,
    REPO_ROOT,
    render_autoscale_config,
)
from e2e_dist.cluster.local_node import (
    LocalClusterError,
    LocalNode,
    launch,
    node_pids,
    stop_node,
)
from e2e_dist.cluster.local_ports import node_port_args, pick_worker_port_range
from e2e_dist.cluster.local_provider import read_node_records
from e2e_dist.cluster.netns import GATEWAY_IP, Host, Network, netns_unavailable_reason
from e2e_dist.train.ray_env import LOOPBACK, NODE_DEATH_ENV, free_port

__all__ = [
    "DEFAULT_AUTOSCALE_CONFIG", "REPO_ROOT", "LocalCluster", "LocalClusterError", "LocalNode",
    "pick_worker_port_range", "render_autoscale_config",
]


class LocalCluster:
    """A Ray cluster of `ray start` processes on this machine, started and stopped as one:
    `with LocalCluster(nodes=1, num_cpus_per_node=1) as c: JobSubmissionClient(c.dashboard_url)`.

    `nodes` counts worker nodes (the head comes on top). `home` is where the auth token lives for
    clients on this machine (default: $HOME); each node gets a copy in its own HOME.
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
        separate_hosts: bool = False,
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
        self.home = Path(home) if home else Path.home()
        self.object_store_memory = object_store_memory
        self.extra_env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.start_attempts = max(1, start_attempts)
        self.separate_hosts = separate_hosts
        # Short path: Ray's unix sockets live under the temp dirs (108-byte limit).
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="e2elc-", dir="/tmp"))
        self.nodes: list[LocalNode] = []
        self.network: Network | None = None
        self.head_ip = LOOPBACK
        self._forwarders: list[Forwarder] = []
        self._taken_ranges: list[range] = []
        self._token: str | None = None
        self.gcs_port = 0
        self.dashboard_port = 0
        self._dashboard_forward: Forwarder | None = None
        self._stopped = False

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """GCS address (`ray start --address`, RAY_ADDRESS) as the nodes reach it."""
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard, state API and Ray Jobs API on this machine's loopback (`e2e-dist submit`)."""
        port = self._dashboard_forward.port if self._dashboard_forward else self.dashboard_port
        return f"http://{LOOPBACK}:{port}"

    def expose(self, port: int) -> str:
        """Make 127.0.0.1:`port` of this machine reachable from the nodes; returns the address they
        use (the gateway in separate-host mode, the same loopback address otherwise)."""
        if self.network is None:
            return f"{LOOPBACK}:{port}"
        fwd = Forwarder(Endpoint(GATEWAY_IP, port, self.network.switch), Endpoint(LOOPBACK, port))
        self._forwarders.append(fwd)
        return f"{GATEWAY_IP}:{port}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def node_env(self) -> dict[str, str]:
        """Base environment of every node process (each node then gets its own HOME and TMPDIR)."""
        env = dict(os.environ)
        env.update(self.extra_env)
        env["RAY_AUTH_MODE"] = self.auth_mode
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # A local cluster serves no traffic: skip the 30 s drain Ray 2.60 does on SIGTERM.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        env.pop("RAY_ADDRESS", None)  # never let a node join some other cluster
        # Jobs run `e2e-dist ...` / `python ...`: resolve them in this environment (the venv).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self) -> "LocalCluster":
        """Start the head, then the worker nodes; return once every node reports ready."""
        env = self.node_env()
        try:
            if self.separate_hosts:
                reason = netns_unavailable_reason()
                if reason:
                    raise LocalClusterError(f"separate hosts: {reason}")
                self.network = Network.create(self.base_dir)
            if self.auth_mode == "token":
                self._token = self._ensure_token(env)
            self._start_head(env)
            for i in range(self.num_workers):
                self._start_worker(env, f"worker{i + 1}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure_token(self, env: dict[str, str]) -> str:
        """The token clients here use (`home`/.ray/auth_token), generated if missing."""
        path = self.home / ".ray" / "auth_token"
        if not path.exists():
            # `ray start --head` with RAY_AUTH_MODE=token refuses to start without a token.
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                           env={**env, "HOME": str(self.home)}, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
        return path.read_text().strip()

    def _host(self, name: str) -> Host | None:
        return self.network.add_host(name) if self.network else None

    def _start_head(self, env: dict[str, str]) -> None:
        host = self._host("head")
        self.head_ip = host.ip if host else LOOPBACK
        head_env = dict(env)
        # The autoscaler's metrics server defaults to one fixed port (44217) for every cluster.
        head_env["AUTOSCALER_METRIC_PORT"] = str(free_port())
        # Local nodes start in seconds: decide every second, not every 5 s (what Ray's own
        # single-machine autoscaling clusters use too).
        head_env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        # A lost node is declared dead in ~5 s, not ~15-65 s: until then an elastic run waits for a
        # group of the old size (the GCS reads these; ray_env.NODE_DEATH_ENV says why these values).
        for var, value in NODE_DEATH_ENV.items():
            head_env.setdefault(var, value)

        def build() -> tuple[list[str], dict[str, int]]:
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            args, ports = node_port_args(self._taken_ranges)
            client_port = free_port()  # ephemeral range: outside every worker port range
            args += ["--head", "--num-cpus", str(self.head_num_cpus), "--port", str(self.gcs_port),
                     "--include-dashboard", "true", "--dashboard-host", self.head_ip,
                     "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(client_port)]
            if self.object_store_memory:
                args += ["--object-store-memory", str(self.object_store_memory)]
            if self.autoscale:
                config = render_autoscale_config(
                    self.autoscaling_config, self.base_dir / "autoscaling.yaml", gcs_address=self.address,
                    head_ip=self.head_ip, cluster_dir=self.base_dir,
                    netns_prefix=self.network.prefix if self.network else None,
                    idle_timeout_minutes=self.idle_timeout_minutes)
                args += ["--autoscaling-config", str(config)]
            return args, {**ports, "gcs": self.gcs_port, "dashboard": self.dashboard_port, "ray_client": client_port}

        self.nodes.append(self._launch("head", build, head_env, host))
        if host is not None:  # the Jobs API on this machine's loopback, like `ray dashboard`'s tunnel
            self._dashboard_forward = Forwarder(Endpoint(LOOPBACK, 0), Endpoint(host.ip, self.dashboard_port,
                                                                               host.netns))

    def _start_worker(self, env: dict[str, str], name: str) -> None:
        host = self._host(name)

        def build() -> tuple[list[str], dict[str, int]]:
            args, ports = node_port_args(self._taken_ranges)
            args += ["--address", self.address, "--num-cpus", str(self.num_cpus_per_node)]
            if self.object_store_memory:
                args += ["--object-store-memory", str(self.object_store_memory)]
            return args, ports

        self.nodes.append(self._launch(name, build, env, host))

    def _launch(self, name: str, build: Callable[[], tuple[list[str], dict[str, int]]], env: dict[str, str],
                host: Host | None) -> LocalNode:
        return launch(name, self.base_dir, build, env, ip=host.ip if host else LOOPBACK, host=host,
                      token=self._token, timeout_s=self.start_timeout_s, attempts=self.start_attempts)

    # ------------------------------------------------------------------ capacity coming and going
    def add_worker(self) -> LocalNode:
        """Start one more worker node (a machine joining, as spot capacity returns) and return it
        once it is ready. In separate-host mode it is a new host with an address of its own."""
        name = f"worker{sum(n.name.startswith('worker') for n in self.nodes) + 1}"
        self._start_worker(self.node_env(), name)
        return self.nodes[-1]

    def remove_worker(self, node: LocalNode, timeout_s: float = 20.0) -> None:
        """Stop one worker node's processes (a machine lost, as on a spot reclaim)."""
        if node is self.nodes[0]:
            raise LocalClusterError("remove_worker: that is the head node")
        stop_node(node, timeout_s)

    # ------------------------------------------------------------------ processes and stop
    def autoscaled_nodes(self) -> list[LocalNode]:
        """Nodes the autoscaler started (and has not terminated yet)."""
        return [LocalNode.from_record(r["node"]) for r in read_node_records(self.base_dir).values()]

    def pids(self) -> set[int]:
        """PIDs of every live process this cluster owns (all nodes)."""
        return set().union(*(node_pids(n) for n in [*self.nodes, *self.autoscaled_nodes()]))

    def stop(self, timeout_s: float = 20.0, keep_dirs: bool = False) -> None:
        """Stop exactly what this cluster started: worker nodes, the head (and with it the
        autoscaler), then any node the autoscaler left; then the network and the directories
        (kept with `keep_dirs` or $E2E_DIST_KEEP_CLUSTER_DIRS: the nodes' logs are in them)."""
        if self._stopped:
            return
        self._stopped = True
        for node in reversed(self.nodes):
            stop_node(node, timeout_s)
        for node in self.autoscaled_nodes():
            stop_node(node, timeout_s)
        for fwd in [*self._forwarders, *([self._dashboard_forward] if self._dashboard_forward else [])]:
            fwd.stop()
        if self.network is not None:
            self.network.destroy()
        if self._own_base and not keep_dirs and not os.environ.get("E2E_DIST_KEEP_CLUSTER_DIRS"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def describe(self) -> str:
        """Human-readable addresses (printed by `e2e-dist cluster local`)."""
        kind = "autoscaling cluster" if self.autoscale else f"head + {self.num_workers} worker node(s)"
        where = f"separate hosts on {self.head_ip.rsplit('.', 1)[0]}.0/24" if self.network else LOOPBACK
        lines = [
            f"local Ray cluster: {kind}, {where} (auth: {self.auth_mode})",
            f"  GCS address      : {self.address}   (inside the cluster: RAY_ADDRESS of its jobs)",
            f"  dashboard / jobs : {self.dashboard_url}   (e2e-dist submit --address ..., ray job submit)",
        ]
        for n in self.nodes:
            lines.append(f"  node {n.name:<8}: {n.ip:<11} pid {n.pid}, dir {n.temp_dir.parent}, log {n.log_path}")
        for port in (f.listen.port for f in self._forwarders):
            lines.append(f"  exposed          : 127.0.0.1:{port} here = {GATEWAY_IP}:{port} on the nodes")
        auth = "RAY_AUTH_MODE=token " if self.auth_mode == "token" else ""
        lines.append(f"  watch nodes      : {auth}ray list nodes --address {self.dashboard_url}")
        return "\n".join(lines)
