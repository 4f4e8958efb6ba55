"""torch.distributed setup for Ray Train workers that listens on the node's address only.

Ray Train's own torch backend calls `init_process_group("env://")`; rank 0 then creates torch's
TCPStore, which binds the wildcard address (`*:<port>`, with and without libuv): an
unauthenticated key-value store on every interface of the machine, a laptop's Wi-Fi included.
Here rank 0 binds a listening socket to its node's address (127.0.0.1 for a local run, the
node's cluster address on a cluster: what Ray itself advertises) and hands it to TCPStore
(`master_listen_fd`); the other ranks connect to it and every rank gets the process group from
that store.

gloo (and NCCL's bootstrap) open listeners too: they bind the interface named by
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, else whatever the hostname resolves to (which on a node
of a cluster on one machine is nobody's address). Unless the user set them, both are set to the
interface that carries the node's Ray address.

The backend plugs in through Ray Train's public BackendConfig/Backend interface: a TorchConfig
whose `backend_cls` is ours; `TorchConfig`'s device context is kept.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from datetime import timedelta
from typing import Any

from ray.train.backend import Backend
from ray.train.torch import TorchConfig

log = logging.getLogger(__name__)

_LISTENER: socket.socket | None = None
"""Rank 0's bound, listening socket between the two setup calls (then TCPStore owns it)."""


class BoundStoreTorchConfig(TorchConfig):
    """TorchConfig whose rendezvous listens on the node's address, not on every interface."""

    @property
    def backend_cls(self) -> type[Backend]:
        return BoundStoreTorchBackend


class BoundStoreTorchBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        import ray

        backend = backend_config.backend or "gloo"
        addr, port = worker_group.execute_single(0, listen_for_rendezvous)
        world = len(worker_group)
        ray.get([worker_group.execute_single_async(i, init_process_group, backend=backend, world_rank=i,
                                                   world_size=world,
                                                   master_addr=addr, master_port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(world)])

    def on_shutdown(self, worker_group: Any, backend_config: TorchConfig) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            ray.get(worker_group.execute_async(destroy_process_group), timeout=30)
        except GetTimeoutError:
            log.warning("torch process group shutdown timed out after 30 s")


def node_address() -> str:
    """The address Ray advertises for this worker's node."""
    import ray.util

    return ray.util.get_node_ip_address()


def interface_of(address: str) -> str | None:
    """The network interface that carries `address` (None if none does)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    return None


def listen_for_rendezvous() -> tuple[str, int]:
    """Rank 0: bind a listening socket to this node's address; return (address, port)."""
    global _LISTENER
    addr = node_address()
    _LISTENER = _listen(addr, 0)
    return addr, _LISTENER.getsockname()[1]


IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def collectives_env(address: str) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME naming the interface of `address`, for those the
    user did not set (gloo and NCCL read them when a process group is created). For NCCL that pins
    its bootstrap and its socket transport only: EFA (aws-ofi-nccl) and InfiniBand pick their own
    devices, and which transport NCCL chose is in its debug log (`nccl_transport`, cluster check)."""
    iface = interface_of(address)
    return {} if iface is None else {var: iface for var in IFNAME_VARS if var not in os.environ}


_NCCL_NET = re.compile(r"Using network (\S[^\n]*)|via NET/([A-Za-z][A-Za-z ]*)")
_NCCL_LOCAL = re.compile(r"via (P2P/[A-Za-z]+|SHM)")


def nccl_transport(log: str) -> str | None:
    """The network NCCL chose, from its NCCL_DEBUG=INFO output: NET/OFI (EFA through aws-ofi-nccl,
    which NCCL names "AWS Libfabric" / "Libfabric"), NET/IB or NET/Socket; inside a node only, the
    peer transports (P2P/..., SHM); None without NCCL lines."""
    nets = {(m.group(1) or m.group(2)).strip() for m in _NCCL_NET.finditer(log)}
    if nets:
        names = sorted({"NET/OFI" if "fabric" in n.lower() or "ofi" in n.lower() else f"NET/{n.split()[0]}"
                        for n in nets})
        provider = re.search(r"Selected [Pp]rovider is (\w+)", log)
        return " + ".join(names) + (f" ({provider.group(1)})" if provider and "NET/OFI" in names else "")
    local = sorted(set(_NCCL_LOCAL.findall(log)))
    return " + ".join(local) or None


def init_process_group(*, backend: str, world_rank: int, world_size: int, master_addr: str, master_port: int,
                       timeout_s: float) -> None:
    """Every rank: the store (rank 0 serves it from its bound socket), then the process group."""
    rank = world_rank
    global _LISTENER
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    # What torchrun sets; DeepSpeed reads LOCAL_RANK/RANK/WORLD_SIZE (and MASTER_* for logging).
    os.environ.update(LOCAL_RANK=str(ctx.get_local_rank()), LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
                      NODE_RANK=str(ctx.get_node_rank()), RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    # A Train worker is a process of its own: the setting stays for the group it creates here.
    os.environ.update(collectives_env(node_address()))
    if backend == "nccl":
        # Fail a timed-out collective instead of hanging (what Ray's own torch backend sets).
        if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    listener, _LISTENER = _LISTENER, None
    if rank == 0:
        assert listener is not None, "listen_for_rendezvous() must run on rank 0 first"
    store = bound_store(master_addr, master_port, rank, world_size, timeout_s, listener)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _listen(addr: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(128)
    return sock


def bound_store(addr: str, port: int, rank: int, world_size: int, timeout_s: float,
                listener: socket.socket | None = None):
    """torch's TCPStore: rank 0 serves it from a socket bound to `addr` only (`listener`, or one
    bound to addr:port here), the others connect to addr:port."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(addr, port, world_size, False, timeout=timeout)
    listener = listener or _listen(addr, port)
    port = listener.getsockname()[1]
    # detach: TCPStore owns (and closes) the descriptor from here on.
    return dist.TCPStore(addr, port, world_size, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())


def init_loopback_process_group(backend: str = "gloo", rank: int = 0, world_size: int = 1, port: int = 0,
                                timeout_s: float = 300) -> None:
    """Ranks on this machine only (tests, benchmarks): the store on 127.0.0.1:`port` (rank 0 picks
    a free one when 0 and world_size is 1), gloo/NCCL on the loopback interface."""
    import torch.distributed as dist

    # Only while the group is created: this process (a test session, a benchmark) may later start
    # cluster nodes that inherit its environment, where `lo` would be the wrong interface.
    env = collectives_env("127.0.0.1")
    os.environ.update(env)
    try:
        store = bound_store("127.0.0.1", port, rank, world_size, timeout_s)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    finally:
        for var in env:
            os.environ.pop(var, None)


def destroy_process_group() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
