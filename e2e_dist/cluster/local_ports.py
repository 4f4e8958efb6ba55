"""Worker port ranges for the nodes of a local cluster: one private block of free ports per node."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from e2e_dist.cluster.local_node import LocalClusterError
from e2e_dist.train.ray_env import LOOPBACK, free_port

# Worker port ranges live below Linux's ephemeral range (32768+, where free_port() and Ray's
# random ports come from) and above Ray's default range (10002-19999) other instances use.
_WORKER_PORT_LO, _WORKER_PORT_HI, _WORKER_PORTS_PER_NODE = 20000, 32000, 100


def _ports_free(ports: range) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_worker_port_range(taken: list[range], size: int = _WORKER_PORTS_PER_NODE) -> range:
    """A block of `size` free ports above Ray's default range and below the ephemeral range."""
    hi = min(_WORKER_PORT_HI, max(_ephemeral_low(), _WORKER_PORT_LO + 10 * size))
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(_WORKER_PORT_LO, hi - size)
        block = range(lo, lo + size)
        if not any(block.start < t.stop and t.start < block.stop for t in taken) and _ports_free(block):
            return block
    raise LocalClusterError(f"no free block of {size} worker ports in {_WORKER_PORT_LO}-{hi}")


def node_port_args(taken: list[range]) -> tuple[list[str], dict[str, int]]:
    """`ray start` port flags for one node: every port explicit (two nodes on one address must not
    race for Ray's fixed defaults such as the dashboard agent's 52365) and a private worker port
    block. Appends the block to `taken`."""
    workers = pick_worker_port_range(taken)
    taken.append(workers)  # (a retried node's old block stays reserved: harmless)
    ports = {
        "node_manager": free_port(), "object_manager": free_port(), "metrics_export": free_port(),
        "dashboard_agent_listen": free_port(), "dashboard_agent_grpc": free_port(),
        "runtime_env_agent": free_port(), "min_worker": workers.start, "max_worker": workers.stop - 1,
    }
    # Each key is its flag's name: node_manager -> --node-manager-port.
    return [a for name, port in ports.items() for a in (f"--{name.replace('_', '-')}-port", str(port))], ports
