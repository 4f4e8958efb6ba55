"""torch's rendezvous store and gloo on one address only (e2e_dist/train/rendezvous.py), in this process."""

from __future__ import annotations

import os

import psutil
import torch.distributed as dist

from e2e_dist.train.rendezvous import bound_store, collectives_env, interface_of
from tests.helpers.listeners import is_loopback


def _listening_ports() -> dict[int, str]:
    return {c.laddr.port: c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid == os.getpid()}


def test_store_listens_on_its_address_only() -> None:
    plain = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)  # what torch does by itself
    ours = bound_store("127.0.0.1", 0, 0, 1, timeout_s=30)
    ports = _listening_ports()
    assert not is_loopback(ports[plain.port])  # the wildcard address: why the bound socket exists
    assert ports[ours.port] == "127.0.0.1"
    client = bound_store("127.0.0.1", ours.port, 1, 2, timeout_s=30)  # another rank connects to it
    client.set("k", "v")
    assert ours.get("k") == b"v"


def test_gloo_and_nccl_are_pointed_at_the_interface_of_the_address(monkeypatch) -> None:
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(var, raising=False)
    assert interface_of("127.0.0.1") == "lo"
    assert collectives_env("127.0.0.1") == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's choice wins
    assert collectives_env("127.0.0.1") == {"NCCL_SOCKET_IFNAME": "lo"}
    assert collectives_env("198.51.100.7") == {}  # an address no interface here carries: nothing to set


def test_a_loopback_group_leaves_no_interface_setting_behind(ds_process_group) -> None:
    """This process may start cluster nodes later (they inherit its environment), where `lo` would
    make gloo advertise 127.0.0.1 to other hosts: seen as a 2-host run timing out in connectFullMesh."""
    assert dist.is_initialized()
    assert "GLOO_SOCKET_IFNAME" not in os.environ and "NCCL_SOCKET_IFNAME" not in os.environ
