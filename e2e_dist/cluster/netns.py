"""Separate hosts on one machine: Linux network (and PID) namespaces joined by a private bridge.

Why: nodes of a real cluster share nothing but the network. Ray processes of nodes that share one
network stack and one temp dir meet in ways real machines never do (one node's runtime-env agent
deleting a working dir the head still uses; every node advertising 127.0.0.1). Here each host is
a network namespace with its own address, and the hosts of one cluster meet on a bridge inside a
"switch" namespace of their own:

    <prefix>-sw    bridge br0 with 10.77.0.1/24: the gateway (where services of this machine's
                   loopback are exposed to the hosts, see cluster/forward.py)
    <prefix>-h<N>  eth0 = 10.77.0.<N>/24, lo up, default route via the gateway, and a resolver
                   of its own (/etc/netns/<prefix>-h<N>/resolv.conf: no name server)

Nothing is added to the machine's own (root) namespace: no interface, no address, no route. The
hosts cannot reach anything but each other and what is explicitly exposed at the gateway. The
same subnet in every cluster is fine: each cluster's switch is a separate network.

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2's `ip`. Addresses are handed out through
a small JSON file under the cluster's directory, locked with flock, because two processes add
hosts: the cluster launcher and the autoscaler's node provider (cluster/local_provider.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from e2e_dist.errors import UserError

SUBNET_PREFIX = "10.77.0"
GATEWAY_IP = f"{SUBNET_PREFIX}.1"
_FIRST_HOST, _LAST_HOST = 2, 254
_CLONE_NEWNET = 0x40000000


class NetnsError(UserError):
    """A namespace or link could not be created (the message names the command)."""


def netns_unavailable_reason() -> str | None:
    """Why separate hosts cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run as root or use the loopback mode"
    if not shutil.which("ip"):
        return "iproute2's `ip` is missing: apt-get install iproute2"
    probe = f"e2e-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()[:300]}")


# PID 1 of a host: starts the command, reaps orphans (what an init does) and exits with the
# command's exit code. It handles no signal, so as a namespace's first process it ignores SIGTERM:
# stopping a host signals its process group (cluster/local_node.py stop_node), where `unshare`
# ignores SIGTERM too and the command gets it once, as a `ray start` of a machine would.
_INIT = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:])\n"
    "while True:\n"
    "    pid, status = os.wait()\n"
    "    if pid == child.pid:\n"
    "        sys.exit(os.waitstatus_to_exitcode(status))\n"
)


@dataclass(frozen=True)
class Host:
    """One separate host: a network namespace with one address on the cluster's bridge."""

    name: str
    netns: str
    ip: str
    index: int

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run on this host: inside its network namespace and in a PID namespace of its own
        (it sees only its host's processes, as on a machine of its own: Ray finds "the" local
        cluster by scanning the process table), under a small init (_INIT). When the init ends,
        the kernel ends everything left in that PID namespace."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--mount-proc",
                "--kill-child=SIGTERM", sys.executable, "-c", _INIT, *argv]


class AddressBook:
    """Host name -> index, shared by the processes of one cluster (JSON file + flock)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            book = json.loads(self.path.read_text()) if self.path.exists() else {}
            yield book
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(book, sort_keys=True))
            os.replace(tmp, self.path)

    def allocate(self, name: str) -> int:
        with self._locked() as book:
            if name in book:
                return book[name]
            used = set(book.values())
            free = next((i for i in range(_FIRST_HOST, _LAST_HOST + 1) if i not in used), None)
            if free is None:
                raise NetnsError(f"no free address left in {SUBNET_PREFIX}.0/24 for host {name}")
            book[name] = free
            return free

    def release(self, name: str) -> None:
        with self._locked() as book:
            book.pop(name, None)

    def entries(self) -> dict[str, int]:
        with self._locked() as book:
            return dict(book)


class Network:
    """The bridge and hosts of one cluster. `prefix` names its namespaces (short: interface names
    derive from host indices, never from it)."""

    def __init__(self, prefix: str, state_dir: Path) -> None:
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.book = AddressBook(Path(state_dir) / "hosts.json")

    @classmethod
    def create(cls, state_dir: Path) -> "Network":
        net = cls(f"e2e{uuid.uuid4().hex[:6]}", state_dir)
        _ip("netns", "add", net.switch)
        try:
            _ip("-n", net.switch, "link", "set", "lo", "up")
            _ip("-n", net.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", net.switch, "addr", "add", f"{GATEWAY_IP}/24", "dev", "br0")
            _ip("-n", net.switch, "link", "set", "br0", "up")
        except NetnsError:
            net.destroy()
            raise
        return net

    def host(self, name: str) -> Host:
        index = self.book.allocate(name)
        return Host(name=name, netns=f"{self.prefix}-h{index}", ip=f"{SUBNET_PREFIX}.{index}", index=index)

    def add_host(self, name: str) -> Host:
        """A new namespace wired to the bridge, with its address and a default route."""
        h = self.host(name)
        veth = f"v{h.index}"
        try:
            _ip("netns", "add", h.netns)
            _ip("-n", self.switch, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            _ip("-n", self.switch, "link", "set", veth, "master", "br0")
            _ip("-n", self.switch, "link", "set", veth, "up")
            _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            # A default route makes "which address would I use to reach the world?" (how Ray
            # finds a node's own address) answer eth0's address; the gateway forwards nothing.
            _ip("-n", h.netns, "route", "add", "default", "via", GATEWAY_IP)
            _write_resolv_conf(h.netns)
        except (NetnsError, OSError):
            self.remove_host(h)
            raise
        return h

    def remove_host(self, h: Host) -> None:
        """Delete the namespace (its veth pair goes with it) and free the address."""
        subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
        subprocess.run(["ip", "-n", self.switch, "link", "del", f"v{h.index}"], capture_output=True)
        shutil.rmtree(NETNS_ETC / h.netns, ignore_errors=True)
        self.book.release(h.name)

    def destroy(self) -> None:
        for name, index in self.book.entries().items():
            self.remove_host(Host(name=name, netns=f"{self.prefix}-h{index}", ip="", index=index))
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)


NETNS_ETC = Path("/etc/netns")
"""`ip netns exec NS` bind-mounts the files of /etc/netns/NS/ over those of /etc (iproute2)."""


def _write_resolv_conf(netns: str) -> None:
    """The host's resolver asks a name server on its own loopback, where nothing listens: a lookup
    fails at once (refused). With the machine's resolv.conf its queries went out through the
    gateway, which forwards nothing, and every lookup waited out the resolver's timeout: torch's
    TCPStore looks up the name of its address, so every Train worker group took 10 s longer to
    start (measured: 10.0 s -> 0.0 s). Real machines get an answer (a name or none) from their DNS."""
    (NETNS_ETC / netns).mkdir(parents=True, exist_ok=True)
    (NETNS_ETC / netns / "resolv.conf").write_text("nameserver 127.0.0.1\n")


def socket_in_netns(netns: str | None, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in `netns` (None: this process's namespace).

    A socket belongs to the namespace its creating thread was in: switch this thread into the
    namespace (setns is per thread), create it, switch back. Binding, listening and connecting
    then happen in that namespace whichever thread does them.
    """
    if netns is None:
        return socket.socket(family, socket.SOCK_STREAM)
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except OSError:
        os.close(own)
        raise NetnsError(f"network namespace {netns} does not exist") from None
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise NetnsError(f"setns into {netns} failed: {os.strerror(ctypes.get_errno())}")
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:  # never leave a thread in the wrong namespace
                raise NetnsError(f"setns back from {netns} failed: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(own)
        os.close(target)
