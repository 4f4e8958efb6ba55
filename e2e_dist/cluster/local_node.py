"""One node of a local cluster: a `ray start --block` process with its own directories, its
readiness, the processes it owns, and stopping exactly those (see cluster/local.py for why nodes
are started this way). Used by the cluster launcher (cluster/local.py) and by the autoscaler's
node provider (cluster/local_provider.py), so a node the autoscaler adds is made exactly like one
started by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from e2e_dist import ray_compat
from e2e_dist.cluster.netns import Host
from e2e_dist.errors import UserError

# `ray start --block` prints this once the node is fully up (after it registered with the GCS).
_READY_MARK = "will now block forever"


class LocalClusterError(UserError):
    """A local node failed to start (the message names the node and its log file)."""


@dataclass
class LocalNode:
    """One `ray start --block` process and what identifies the processes it owns."""

    name: str
    temp_dir: Path
    """Ray's --temp-dir of this node (its session dir, logs, sockets); never shared."""
    log_path: Path
    pid: int
    """The node's first process (`ray start --block`; on a separate host the `unshare` above it):
    leader of its own session, so its pid is the group id."""
    ip: str
    ports: dict[str, int] = field(default_factory=dict)
    home: Path | None = None
    """HOME of the node's processes (its own: auth token copy, caches, W&B settings)."""
    netns: str | None = None
    """The node's network namespace (separate-host mode), else None."""
    popen: subprocess.Popen | None = None

    @property
    def pgid(self) -> int:
        return self.pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        import psutil

        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def record(self) -> dict[str, Any]:
        """What another process needs to find and stop this node (JSON)."""
        return {"name": self.name, "temp_dir": str(self.temp_dir), "log_path": str(self.log_path), "pid": self.pid,
                "ip": self.ip, "home": str(self.home) if self.home else None, "netns": self.netns}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "LocalNode":
        return cls(name=rec["name"], temp_dir=Path(rec["temp_dir"]), log_path=Path(rec["log_path"]), pid=rec["pid"],
                   ip=rec["ip"], home=Path(rec["home"]) if rec.get("home") else None, netns=rec.get("netns"))


def ray_start_command(args: list[str], host: Host | None = None) -> list[str]:
    """`ray start ARGS`: on loopback with every advertised address kept on it; in a separate
    host's namespace plain `ray start` (its address is a real one there)."""
    if host is None:
        # Ray would rewrite 127.0.0.1 to the machine's primary address (see the compat function)
        return [sys.executable, *ray_compat.LOOPBACK_RAY_START, "start", *args]
    return host.wrap([sys.executable, "-m", "ray.scripts.scripts", "start", *args])


def node_env(base: dict[str, str], node_dir: Path, host: Host | None, token: str | None) -> dict[str, str]:
    """The environment of one node: its own HOME and TMPDIR (as on a machine of its own), the
    cluster's auth token copied into that HOME, and Ray's cluster switch set for its network."""
    env = dict(base)
    home, tmp = node_dir / "home", node_dir / "tmp"
    for d in (home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    env["HOME"], env["TMPDIR"] = str(home), str(tmp)
    if token is not None:
        (home / ".ray").mkdir(exist_ok=True)
        path = home / ".ray" / "auth_token"
        path.write_text(token)
        path.chmod(0o600)
    # Separate host: Ray must find the node's own address (not 127.0.0.1) in every process; and
    # interface names of this machine mean nothing there (the host has `lo` and `eth0`).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1" if host is not None else "0"
    if host is not None:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env.pop(var, None)
    return env


def launch(name: str, base_dir: Path, build: Callable[[], tuple[list[str], dict[str, int]]], env: dict[str, str],
           *, ip: str, host: Host | None = None, token: str | None = None, timeout_s: float = 120.0,
           attempts: int = 1, wait: bool = True) -> LocalNode:
    """Start one node under `base_dir/<name>/`; with `wait`, return once it reports ready (a second
    try with fresh ports and an empty temp dir if it does not come up).

    Why retry: Ray gives a new raylet a fixed 30 s to register with the GCS, which a loaded
    2-core machine can miss; the node then exits with "timed out during startup".
    """
    node_dir, log_path = base_dir / name, base_dir / f"{name}.log"
    temp_dir = node_dir / "ray"
    for attempt in range(1, attempts + 1):
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_dir.mkdir(parents=True)
        args, ports = build()
        args = [*args, "--block", "--node-ip-address", ip, "--temp-dir", str(temp_dir), "--disable-usage-stats"]
        node_environ = node_env(env, node_dir, host, token)
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(ray_start_command(args, host), env=node_environ, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=node_environ["HOME"])
        node = LocalNode(name=name, temp_dir=temp_dir, log_path=log_path, pid=popen.pid, ip=ip, ports=ports,
                         home=Path(node_environ["HOME"]), netns=host.netns if host else None, popen=popen)
        if not wait:
            return node
        try:
            wait_ready(node, timeout_s)
            return node
        except LocalClusterError:
            if attempt == attempts:
                raise
            shutil.copy(log_path, base_dir / f"{name}.attempt{attempt}.log")
    raise AssertionError("unreachable")


def wait_ready(node: LocalNode, timeout_s: float) -> None:
    """Return once the node reports ready; else stop what it started and raise LocalClusterError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.log_path.exists() and _READY_MARK in node.log_path.read_text(errors="replace"):
            return
        if not node.alive():
            break
        time.sleep(0.25)
    # Not ready: make sure its processes go too (the caller stops the rest).
    why = "exited" if not node.alive() else f"not ready after {timeout_s:.0f}s"
    stop_node(node, timeout_s=10)
    raise LocalClusterError(f"ray node {node.name} {why}; see {node.log_path}: {_last_error_line(node.log_path)}")


def node_pids(node: LocalNode) -> set[int]:
    """Processes in the node's process group, plus any that name its temp dir (Ray may move
    workers into their own process groups) -- never anything else."""
    import psutil

    marker = str(node.temp_dir)
    found: set[int] = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.info["pid"] == os.getpid():
                continue
            if os.getpgid(proc.info["pid"]) == node.pgid or any(marker in a for a in proc.info["cmdline"] or ()):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.add(proc.info["pid"])
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def stop_node(node: LocalNode, timeout_s: float) -> None:
    import psutil

    # 1) Graceful: `ray start --block` ends its own children on SIGTERM. On a separate host the
    #    leader is `unshare` (which ignores SIGTERM) above the host's init: signal the group.
    leader = _signal(node.pid, signal.SIGTERM) if node.alive() else None
    if leader is not None and node.netns:
        try:
            os.killpg(node.pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if leader is not None:
        try:
            leader.wait(timeout=timeout_s)
        except psutil.TimeoutExpired:
            pass
    # 2) Whatever is left of this node (orphans, workers in other groups): TERM, then KILL.
    for sig, wait in ((signal.SIGTERM, timeout_s / 2), (signal.SIGKILL, 5.0)):
        procs = [p for p in (_signal(pid, sig) for pid in node_pids(node)) if p]
        if not procs:
            break
        psutil.wait_procs(procs, timeout=wait)
    if node.popen is not None:
        if node.popen.poll() is None:
            node.popen.kill()
        node.popen.wait(timeout=5)


def _signal(pid: int, sig: int):  # -> psutil.Process | None
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.send_signal(sig)
        return proc
    except psutil.Error:
        return None


def _last_error_line(log_path: Path) -> str:
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "rror" in ln or "ailed" in ln]
    return (errors or lines or ["(empty log)"])[-1][:300]
