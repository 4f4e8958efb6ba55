"""`e2e-dist cluster check`: collective bandwidth between and inside a running cluster's nodes.

On the separate-hosts cluster of tests/cluster/test_separate_hosts.py (head + 1 worker node, each
in its own network namespace, gloo over their veth network), through the Jobs API as a laptop
reaches a real cluster: one line per measurement with positive figures, the plan's figure next to
the cross-node ones, the whole check within CHECK_LIMIT_S, and every socket its rank processes
listen on bound to their node's own address (polled in each node's namespace). The parsing of NCCL's debug output
(which transport it chose) and the bus-bandwidth arithmetic are checked without a cluster.
"""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import pytest

from e2e_dist.cli import main
from e2e_dist.cluster.check import Measurement
from e2e_dist.train.rendezvous import nccl_transport
from tests.cluster.test_separate_hosts import hosts  # noqa: F401  (the module's cluster fixture)

CHECK_LIMIT_S = 240.0
"""The check's own time (actors, one process per rank, 4 MiB collectives): 40-90 s measured here
on 2 cores shared with other work (load 15-20); a real node starts its processes in seconds."""
LINE = re.compile(r"(all_reduce|all_gather) +(across 2 nodes|inside node 10\.77\.0\.\d+) +2 ranks gloo +4 MiB  "
                  r"busbw +(\d+\.\d+) GB/s  algbw +(\d+\.\d+) GB/s  plan +(\d+\.\d+ GB/s|- +) +via tcp sockets \(gloo\)")


def _rank_listeners(netns: list[str], found: set[tuple[str, str]], stop: threading.Event) -> None:
    """(namespace, local address) of every listening socket of a check rank process, until `stop`."""
    while not stop.is_set():
        for ns in netns:
            table = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnpH"], capture_output=True, text=True,
                                   check=False).stdout
            for line in table.splitlines():
                for pid in re.findall(r"pid=(\d+)", line):
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_text()
                    except OSError:
                        continue
                    if "e2e_dist.cluster.check" in cmd:
                        found.add((ns, line.split()[3]))
        stop.wait(0.2)


@pytest.mark.slow
def test_check_on_separate_hosts(hosts, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    listening: set[tuple[str, str]] = set()
    stop = threading.Event()
    poller = threading.Thread(target=_rank_listeners, args=([n.netns for n in hosts.nodes], listening, stop))
    poller.start()
    try:
        assert main(["cluster", "check", "--address", hosts.dashboard_url, "--size-mb", "4", "--iters", "3",
                     "--timeout", "180"]) == 0
    finally:
        stop.set()
        poller.join()
    out = capsys.readouterr().out.splitlines()
    ips = sorted(n.ip for n in hosts.nodes)
    # the store and gloo listen on the node's address only (seen on both nodes), never the wildcard
    own = {n.netns: n.ip for n in hosts.nodes}
    assert listening and {ns for ns, _ in listening} == set(own), listening
    assert all(addr.rsplit(":", 1)[0] == own[ns] for ns, addr in listening), listening
    assert out[0] == f"cluster check: 2 node(s) ({', '.join(ips)}), gloo, 1 rank(s) per node across nodes, 2 inside each"
    rows = [m.groups() for m in map(LINE.fullmatch, out) if m]
    assert len(rows) == 6, out  # (all-reduce, all-gather) x (across the nodes, inside each of the 2)
    assert {r[1] for r in rows} == {"across 2 nodes", *(f"inside node {ip}" for ip in ips)}
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), rows
    # two ranks: all-reduce busbw = algbw, all-gather busbw = algbw / 2 (nccl-tests' factors)
    for op, _, bus, alg, _ in rows:
        assert float(bus) == pytest.approx(float(alg) * (1 if op == "all_reduce" else 0.5), abs=0.011)
    # the plan's figure (TCP between nodes) next to the cross-node rows, none inside a CPU node
    assert all((r[4] == "5.00 GB/s") == (r[1] == "across 2 nodes") for r in rows), rows
    took = re.fullmatch(r"cluster check: 6 measurement\(s\) in (\d+\.\d) s", out[-1])
    assert took and float(took.group(1)) < CHECK_LIMIT_S, out[-1]
    print(f"cluster check took {took.group(1)} s:\n" + "\n".join(out))


def test_nccl_transport_from_its_debug_output() -> None:
    efa = ("ip-10-0-0-1:1:2 [0] NCCL INFO NET/OFI Selected Provider is efa (found 4 nics)\n"
           "ip-10-0-0-1:1:2 [0] NCCL INFO Channel 00/0 : 8[0] -> 0[0] [send] via NET/AWS Libfabric/0/GDRDMA\n"
           "ip-10-0-0-1:1:2 [1] NCCL INFO Channel 00 : 9[1] -> 8[0] via P2P/IPC/read")
    assert nccl_transport(efa) == "NET/OFI (efa)"
    assert nccl_transport("NCCL INFO Using network Socket\nNCCL INFO Channel 00/0 : 0[0] -> 1[0] [send] "
                          "via NET/Socket/0") == "NET/Socket"
    assert nccl_transport("NCCL INFO Using network IB\nx via NET/IB/0/GDRDMA") == "NET/IB"
    assert nccl_transport("NCCL INFO Channel 00 : 1[1] -> 0[0] via P2P/CUMEM/read") == "P2P/CUMEM"
    assert nccl_transport("gloo only") is None


def test_bus_bandwidth_is_nccl_tests_definition() -> None:
    ar = Measurement(op="all_reduce", scope="across 2 nodes", ranks=16, backend="nccl", nbytes=2**30,
                     seconds=0.035, transport="NET/OFI (efa)", expected_busbw=57.5e9)
    assert ar.algbw == pytest.approx(2**30 / 0.035) and ar.busbw == pytest.approx(ar.algbw * 2 * 15 / 16)
    ag = Measurement(op="all_gather", scope="inside node x", ranks=8, backend="nccl", nbytes=2**30, seconds=0.01,
                     transport="P2P/CUMEM", expected_busbw=None)
    assert ag.busbw == pytest.approx(ag.algbw * 7 / 8) and not ag.low
    slow = Measurement(op="all_reduce", scope="across 2 nodes", ranks=16, backend="nccl", nbytes=2**30, seconds=0.5,
                       transport="NET/Socket", expected_busbw=57.5e9)
    assert slow.low and "NET/Socket" in slow.line()
