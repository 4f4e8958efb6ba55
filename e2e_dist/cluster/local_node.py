"""One node of a local cluster: a `ray start --block` process, its readiness, the processes it
owns, and stopping exactly those (see cluster/local.py for why nodes are started this way)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    log_path: Path
    popen: subprocess.Popen
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pgid(self) -> int:
        # start_new_session=True: the group id is the leader's pid, valid even after it exits.
        return self.popen.pid


# `ray start --node-ip-address 127.0.0.1` is rewritten by Ray to the machine's primary address
# (services.resolve_ip_for_localhost), and so is `--address 127.0.0.1:PORT`. This launcher runs
# Ray's own `ray start` CLI with that one rewrite disabled, and exports
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to the node's children *after* Ray is imported here: in
# those processes (autoscaler, job drivers, workers) Ray's get_node_ip_address() then answers the
# loopback address too, while this process keeps multi-node `ray start` allowed.
_LOOPBACK_RAY_START = (
    "import os, sys\n"
    # multi-node `ray start` must be allowed in this process even if our caller turned it off
    "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '1'\n"
    "import ray._private.services as services\n"
    "from ray.scripts.scripts import main\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "sys.exit(main())\n"
)


def ray_start_command(args: list[str]) -> list[str]:
    """`ray start ARGS` that keeps every advertised address on 127.0.0.1."""
    return [sys.executable, "-c", _LOOPBACK_RAY_START, "start", *args]


def wait_ready(node: LocalNode, timeout_s: float) -> None:
    """Return once the node reports ready; else stop what it started and raise LocalClusterError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
        if _READY_MARK in text:
            return
        if node.popen.poll() is not None:
            break
        time.sleep(0.25)
    # Not ready: make sure its processes go too (the caller stops the rest).
    why = "exited" if node.popen.poll() is not None else f"not ready after {timeout_s:.0f}s"
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

    # 1) Graceful: `ray start --block` kills its own children on SIGTERM.
    if node.popen.poll() is None:
        node.popen.send_signal(signal.SIGTERM)
        try:
            node.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # 2) Whatever is left of this node (orphans, autoscaler-started fake nodes): TERM, then KILL.
    for sig, wait in ((signal.SIGTERM, timeout_s / 2), (signal.SIGKILL, 5.0)):
        procs = [p for p in (_signal(pid, sig) for pid in node_pids(node)) if p]
        if not procs:
            break
        psutil.wait_procs(procs, timeout=wait)
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
