"""TCP forwarding between network namespaces, in this process's threads.

What `ray dashboard cluster.yaml` does with an SSH tunnel for a real cluster, done for the
separate hosts of cluster/netns.py: the head's dashboard / Jobs API (inside the head's namespace)
appears on 127.0.0.1 of this machine, and a service on this machine's loopback (say an S3 server)
appears at the gateway address the hosts can reach. Each side's socket is created in its own
namespace (netns.socket_in_netns), so nothing ever listens outside the two given addresses.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from e2e_dist.cluster.netns import socket_in_netns


@dataclass(frozen=True)
class Endpoint:
    """An address in a network namespace (None: this process's own)."""

    host: str
    port: int
    netns: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f" (netns {self.netns})" if self.netns else "")


class Forwarder:
    """Listen at `listen` (port 0: any free one) and relay each connection to `target`."""

    def __init__(self, listen: Endpoint, target: Endpoint) -> None:
        self.target = target
        self._server = socket_in_netns(listen.netns)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((listen.host, listen.port))
        self._server.listen(64)
        self.listen = Endpoint(listen.host, self._server.getsockname()[1], listen.netns)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"forward-{self.listen.port}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.listen.port

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket_in_netns(self.target.netns)
        try:
            upstream.settimeout(10)
            upstream.connect((self.target.host, self.target.port))
            upstream.settimeout(None)
        except OSError:
            client.close()
            upstream.close()
            return
        with self._lock:
            self._open.update((client, upstream))
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        try:  # pass the end of the stream on (HTTP/1.1 half-close), then let the other pump finish
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
