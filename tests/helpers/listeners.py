"""Which addresses the processes of a run listen on, sampled while it runs (psutil, like `ss -ltnp`)."""

from __future__ import annotations

import ipaddress
import os
import threading

import psutil


def own_process_tree() -> set[int]:
    """This process and every descendant (a private local Ray: GCS, raylet, workers, agents)."""
    me = psutil.Process(os.getpid())
    try:
        return {me.pid, *(p.pid for p in me.children(recursive=True))}
    except psutil.Error:
        return {me.pid}


def listeners(pids: set[int]) -> set[tuple[str, int, int, str]]:
    """(address, port, pid, process title) of every TCP listening socket of `pids`."""
    found = set()
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = " ".join(psutil.Process(conn.pid).cmdline())[:80]  # Ray sets ray::<Actor> titles
            except psutil.Error:
                name = "?"
            found.add((conn.laddr.ip, conn.laddr.port, conn.pid, name))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1 (a dual-stack socket)
    return (mapped or ip).is_loopback


class ListenerSampler(threading.Thread):
    """Every listener of this process tree seen while running (start(), then stop())."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.seen, self._stop_event = interval_s, set(), threading.Event()
        self.samples = 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.seen |= listeners(own_process_tree())
                self.samples += 1
            except psutil.Error:
                pass
            self._stop_event.wait(self.interval_s)

    def stop(self) -> set[tuple[str, int, int, str]]:
        self._stop_event.set()
        self.join(timeout=10)
        return self.seen

    def outside_loopback(self) -> list[tuple[str, int, int, str]]:
        return sorted(x for x in self.seen if not is_loopback(x[0]))
