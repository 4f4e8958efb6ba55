"""`e2e-dist cluster check`: what the wire between a running cluster's nodes (and inside each) carries.

Before paying for a long run: one actor per node (pinned to it) starts that node's ranks as plain
processes, one per GPU (NCCL) or one per node (gloo, CPU clusters), and they time all-reduce and
all-gather with torch.distributed, first across all nodes, then inside each node. Figures follow
nccl-tests: algbw = size / time (the slowest rank's), busbw = algbw x 2(n-1)/n for all-reduce and
x (n-1)/n for all-gather, so they compare with the plan's link figures (plan/comm.py), which the
check names and warns below. NCCL's own debug output says which transport it chose (NET/OFI is
EFA through aws-ofi-nccl, NET/IB InfiniBand, NET/Socket TCP: train/rendezvous.py nccl_transport).

Everything binds the nodes' own addresses (the node IP Ray reports): rank 0's store listens on a
socket its node's actor bound there (TCPStore would bind every interface itself), and gloo / NCCL's
bootstrap use that address's interface (rendezvous.collectives_env).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from e2e_dist.errors import UserError

OPS = ("all_reduce", "all_gather")
MARK = "E2E-CHECK "
"""Prefix of a rank's result line (the rest of its output is NCCL's debug log)."""
WARN_BELOW = 0.8
"""Warn when a bus bandwidth is below this share of the plan's figure."""


class CheckError(UserError):
    """The check could not run or a node's ranks failed."""


@dataclass(frozen=True)
class Measurement:
    op: str
    scope: str
    """`across N nodes` or `inside node IP`."""
    ranks: int
    backend: str
    nbytes: int
    seconds: float
    transport: str
    expected_busbw: float | None
    """What the plan assumes for this collective and scope (None: nothing, e.g. inside a CPU node)."""

    @property
    def algbw(self) -> float:
        return self.nbytes / self.seconds

    @property
    def busbw(self) -> float:
        from e2e_dist.plan.comm import bus_factor

        return self.algbw * bus_factor(self.op, self.ranks)

    def line(self) -> str:
        plan = f"plan {self.expected_busbw / 1e9:6.2f} GB/s" if self.expected_busbw else "plan      -     "
        return (f"{self.op:10} {self.scope:26} {self.ranks:3} ranks {self.backend:5} {self.nbytes / 2**20:6.0f} MiB  "
                f"busbw {self.busbw / 1e9:7.2f} GB/s  algbw {self.algbw / 1e9:7.2f} GB/s  {plan}  via {self.transport}")

    @property
    def low(self) -> bool:
        return bool(self.expected_busbw) and self.busbw < WARN_BELOW * self.expected_busbw


# ------------------------------------------------------------------------------- one rank
def _measure(op: str, nbytes: int, iters: int, device: Any, group: Any, size: int) -> float:
    """Seconds per `op` of `nbytes` (the all-reduced tensor / the gathered output) in `group` of
    `size` ranks, the slowest rank's."""
    import torch
    import torch.distributed as dist

    n = max(size, nbytes // 4 // size * size)  # float32 elements, divisible by the group's size
    if op == "all_reduce":
        buf = torch.ones(n, device=device)
        call: Callable[[], Any] = lambda: dist.all_reduce(buf, group=group)
    else:
        out, part = torch.empty(n, device=device), torch.ones(n // size, device=device)
        call = lambda: dist.all_gather_into_tensor(out, part, group=group)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # connections and buffers are set up on first use
        call()
    sync()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    took = torch.tensor([(time.perf_counter() - t0) / iters], device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
    return float(took.item())


def rank_main(spec: dict[str, Any]) -> None:
    """One rank, in a process of its own. All ranks of all nodes form one group over the nodes'
    addresses; the check runs in two subgroups of it: across the nodes (every rank for NCCL, local
    rank 0 of each node for gloo), then inside each node (its ranks; the nodes at once)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from e2e_dist.train.rendezvous import bound_store, collectives_env

    os.environ.update(collectives_env(spec["ip"]))
    listener = socket.socket(fileno=spec["fd"]) if spec.get("fd") is not None else None
    rank, nodes, local = spec["rank"], spec["nodes"], spec["local_ranks"]
    store = bound_store(spec["master"], spec["port"], rank, nodes * local, spec["timeout"], listener)
    nccl = spec["backend"] == "nccl"
    device = torch.device("cuda", spec["local_rank"]) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    dist.init_process_group(spec["backend"], store=store, rank=rank, world_size=nodes * local,
                            timeout=timedelta(seconds=spec["timeout"]), device_id=device if nccl else None)
    across = [r for r in range(nodes * local) if r % local < spec["across_local"]]
    across_group = dist.new_group(across) if nodes > 1 else None  # every rank creates every group
    inside = [dist.new_group(list(range(k * local, (k + 1) * local))) for k in range(nodes)] if local > 1 else []
    found: dict[str, Any] = {"gpu": torch.cuda.get_device_name(device) if nccl else "CPU", "node": rank // local}
    if across_group is not None and rank in across:
        found["across"] = {op: _measure(op, spec["nbytes"], spec["iters"], device, across_group, len(across))
                           for op in OPS}
    dist.barrier()
    if inside:
        found["inside"] = {op: _measure(op, spec["nbytes"], spec["iters"], device, inside[rank // local], local)
                           for op in OPS}
    if rank % local == 0:  # one report per node
        print(MARK + json.dumps(found), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------- one node's actor
class NodeProbe:
    """Lives on one node: binds rank 0's store socket there, starts the node's ranks."""

    def __init__(self) -> None:
        from e2e_dist.train.rendezvous import node_address

        self.ip = node_address()
        self.sock: socket.socket | None = None

    def listen(self) -> tuple[str, int]:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((self.ip, 0))  # the node's own address, never the wildcard
        self.sock.listen(128)
        return self.ip, self.sock.getsockname()[1]

    def run(self, spec: dict[str, Any], node_rank: int, local_ranks: int) -> dict[str, Any]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if spec["backend"] == "nccl" and "NCCL_DEBUG" not in env:
            env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET")  # the transport NCCL chose
        procs = []
        for local in range(local_ranks):
            rank = node_rank * local_ranks + local
            fd = self.sock.fileno() if rank == 0 and self.sock else None
            one = {**spec, "rank": rank, "local_rank": local, "ip": self.ip, "fd": fd}
            procs.append(subprocess.Popen([sys.executable, "-m", "e2e_dist.cluster.check", json.dumps(one)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          pass_fds=(fd,) if fd is not None else ()))
        if self.sock:  # rank 0's process holds the listening socket now
            self.sock.close()
            self.sock = None
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=spec["timeout"])[0])
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate()[0] + f"\n(no result within {spec['timeout']:.0f} s)")
        return {"ip": self.ip, "rcs": [p.returncode for p in procs], "out": "\n".join(outs)}


# ------------------------------------------------------------------------------ the driver
@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    gpus: int


def alive_nodes() -> list[Node]:
    import ray

    return sorted((Node(n["NodeID"], n["NodeManagerAddress"], int(n.get("Resources", {}).get("GPU", 0)))
                   for n in ray.nodes() if n.get("Alive")), key=lambda n: n.ip)


def _actors(nodes: list[Node], backend: str) -> list[Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = ray.remote(NodeProbe)
    return [cls.options(num_cpus=0, num_gpus=n.gpus if backend == "nccl" else 0,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote()
            for n in nodes]


def _run(actors: list[Any], spec: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
    """Every node's ranks, one group over all of them; each node's result."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        master, port = ray.get(actors[0].listen.remote(), timeout=timeout_s)
        spec = {**spec, "master": master, "port": port, "nodes": len(actors)}
        return ray.get([a.run.remote(spec, i, spec["local_ranks"]) for i, a in enumerate(actors)],
                       timeout=timeout_s + 30)
    except GetTimeoutError:
        raise CheckError(f"cluster check: no result within {timeout_s:.0f} s ({spec['backend']}); is a node busy, "
                         f"or a firewall / security group between the nodes?") from None


def _reports(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each node's report (its local rank 0's line), or a CheckError naming the failing node."""
    out = []
    for r in results:
        if any(rc != 0 for rc in r["rcs"]):
            tail = [ln for ln in r["out"].splitlines() if ln.strip()][-1:] or ["(no output)"]
            raise CheckError(f"cluster check: the ranks on {r['ip']} failed (exit {r['rcs']}): {tail[0][:300]}")
        found = [json.loads(ln[len(MARK):]) for ln in r["out"].splitlines() if ln.startswith(MARK)]
        if not found:
            raise CheckError(f"cluster check: the ranks on {r['ip']} reported nothing")
        out.append(found[0])
    return out


def _transport(text: str, *, across: bool, backend: str) -> str:
    from e2e_dist.train.rendezvous import nccl_transport

    if backend != "nccl":
        return "tcp sockets (gloo)"
    if not across:  # a node's log holds the cross-node communicator's lines too
        text = "\n".join(ln for ln in text.splitlines() if "NET/" not in ln and "Using network" not in ln)
    return nccl_transport(text) or "(NCCL said nothing: NCCL_DEBUG set elsewhere?)"


def _expected(op: str, *, gpu: str, gpus: int, nodes: int, interconnect: str | None) -> float | None:
    from e2e_dist.plan.comm import default_interconnect, expected_busbw, link_bandwidths

    if gpu == "CPU" and nodes == 1:
        return None  # the plan has no figure for collectives between processes of one CPU machine
    intra, inter = link_bandwidths(gpu, interconnect or ("tcp" if gpu == "CPU" else default_interconnect(gpu)))
    return expected_busbw(op, gpus_per_node=gpus, nodes=nodes, intra_bytes_s=intra, inter_bytes_s=inter)


def _measurements(nodes: list[Node], results: list[dict[str, Any]], spec: dict[str, Any],
                  interconnect: str | None) -> list[Measurement]:
    reports, backend, local = _reports(results), spec["backend"], spec["local_ranks"]
    gpu, ips = reports[0]["gpu"], [n.ip for n in nodes]
    common = {"backend": backend, "nbytes": spec["nbytes"]}
    found = []
    if len(nodes) > 1:
        text = "\n".join(r["out"] for r in results)
        ranks, per_node = len(nodes) * spec["across_local"], spec["across_local"]
        found += [Measurement(op=op, scope=f"across {len(nodes)} nodes", ranks=ranks, seconds=reports[0]["across"][op],
                              transport=_transport(text, across=True, backend=backend), **common,
                              expected_busbw=_expected(op, gpu=gpu, gpus=per_node, nodes=len(nodes),
                                                       interconnect=interconnect)) for op in OPS]
    for node, report, result in zip(nodes, reports, results) if local > 1 else ():
        label = node.ip if ips.count(node.ip) == 1 else f"{node.ip}/{node.node_id[:6]}"
        found += [Measurement(op=op, scope=f"inside node {label}", ranks=local, seconds=report["inside"][op],
                              transport=_transport(result["out"], across=False, backend=backend), **common,
                              expected_busbw=_expected(op, gpu=gpu, gpus=local, nodes=1, interconnect=interconnect))
                  for op in OPS]
    return found


def check_cluster(*, size_mb: float = 64, iters: int = 5, interconnect: str | None = None, timeout_s: float = 300,
                  out: Callable[[str], None] = print) -> list[Measurement]:
    """Run the check on the cluster this process is connected to; say one line per measurement."""
    t0 = time.monotonic()
    nodes = alive_nodes()
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    chosen, backend = (gpu_nodes, "nccl") if gpu_nodes else (nodes, "gloo")
    # NCCL: every GPU across the nodes and inside each; gloo (CPU): one process per node across,
    # two inside each (over the node's own address)
    per_node = min(n.gpus for n in chosen) if backend == "nccl" else 1
    spec = {"backend": backend, "nbytes": int(size_mb * 2**20), "iters": iters, "timeout": timeout_s,
            "local_ranks": per_node if backend == "nccl" else 2, "across_local": per_node}
    out(f"cluster check: {len(chosen)} node(s) ({', '.join(n.ip for n in chosen)}), {backend}, {per_node} rank(s) "
        f"per node across nodes, {spec['local_ranks']} inside each")
    found = _measurements(chosen, _run(_actors(chosen, backend), spec, timeout_s), spec, interconnect)
    for m in found:
        out(m.line())
    for m in (m for m in found if m.low):
        out(f"warning: {m.op} {m.scope}: {m.busbw / 1e9:.2f} GB/s bus bandwidth, below {WARN_BELOW:.0%} of the "
            f"{m.expected_busbw / 1e9:.2f} GB/s `e2e-dist plan` assumes (plan/comm.py), via {m.transport}")
    out(f"cluster check: {len(found)} measurement(s) in {time.monotonic() - t0:.1f} s")
    return found


def check_cli(args: Any) -> int:
    """`cluster check`: on the cluster at --address (a Ray address, `auto`, or the Jobs API's http URL,
    where the check then runs as a job on the head: all a laptop with `ray dashboard` reaches)."""
    address = args.address
    opts = {"size_mb": args.size_mb, "iters": args.iters, "interconnect": args.interconnect, "timeout_s": args.timeout}
    if address and address.startswith(("http://", "https://")):
        return _as_job(address, opts)
    import ray

    from e2e_dist.train.ray_env import init_ray

    try:
        init_ray(address or "auto")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CheckError(f"cluster check: cannot reach a Ray cluster at {address or 'auto'}: "
                         f"{' '.join(str(e).split())[:200]}") from None
    try:
        check_cluster(**opts)
    finally:
        ray.shutdown()
    return 0


def _as_job(address: str, opts: dict[str, Any]) -> int:
    import io

    from e2e_dist.cluster import jobs

    argv = ["e2e-dist", "cluster", "check", "--address", "auto", "--size-mb", str(opts["size_mb"]),
            "--iters", str(opts["iters"]), "--timeout", str(opts["timeout_s"])]
    argv += ["--interconnect", opts["interconnect"]] if opts["interconnect"] else []
    job = jobs.submit(argv, address=address, working_dir=None, out=io.StringIO())
    state = jobs.wait(job, address, timeout_s=opts["timeout_s"] * 3 + 120, poll_s=0.5)
    lines = jobs.logs(job, address).splitlines()
    for line in filter(is_our_line, lines):
        print(line, flush=True)
    if state != "SUCCEEDED":
        last = next((ln for ln in reversed(lines) if ln.strip()), "(no log)")
        raise CheckError(f"cluster check: job {job} ended {state or 'still running'}: {last.strip()[:300]}")
    return 0


def is_our_line(line: str) -> bool:
    """The check's own output lines (a job's log also holds Ray's)."""
    return line.startswith(("cluster check", "warning: ", *OPS))


if __name__ == "__main__":
    rank_main(json.loads(sys.argv[1]))
