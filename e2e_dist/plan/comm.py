"""What one optimizer step sends, from DeepSpeed's own schedule, and how long that takes on each link.

Volumes are nccl-tests' "size" per rank (an all-reduce's tensor, an all-gather's gathered output, a
reduce-scatter's unscattered input), read off the installed DeepSpeed 0.19.8 and checked by counting
what its engines really call on 2 gloo ranks (tests/plan/test_comm_volume.py: ZeRO 1-3 x grad
accumulation 1 and 4, exact to the byte but for 8-byte norm scalars):

- ZeRO-0: the engine all-reduces the gradients once per optimizer step, at the accumulation
  boundary (engine.allreduce_gradients -> buffered_allreduce_fallback).
- ZeRO-1: the same single gradient reduction (allreduce_gradients calls optimizer.reduce_gradients
  at the boundary only; with overlap_comm the hooks' reduce_ready_partitions_and_remove_grads checks
  the boundary too), then one all-gather of the updated 16-bit parameters (all_gather_dp_groups).
  DeepSpeed 0.19.8 reduces a bucket with a whole all-reduce, not a reduce-scatter
  (use_multi_rank_bucket_allreduce defaults on; average_tensor -> allreduce_and_scatter).
- ZeRO-2: that all-reduce on *every micro-step* (partition_gradients: the hooks reduce each bucket
  as it fills, and allreduce_gradients runs the epilogue on every backward), then the all-gather.
- ZeRO-3: on every micro-step, all-gathers of the parameters in forward and again in backward for
  those released in between, and a reduce-scatter of all gradients; once per step an all-gather of
  the persistent (small) parameters (stage3 _post_step). Parameters of at most
  stage3_param_persistence_threshold elements stay gathered. After a module's forward its
  parameters are kept until backward when fewer than stage3_max_reuse_distance elements are used
  in between (partitioned_param_coordinator __params_to_release), and kept anyway when the whole
  model fits in one prefetch window (the prefetcher then marks every later use).

Time: hierarchical collectives (NCCL's rings/trees across nodes behave like this for large
messages): a collective of S bytes over K nodes of G GPUs costs S x f(G) / intra + S x f(K) / inter,
f = 2(n-1)/n for all-reduce and (n-1)/n for all-gather / reduce-scatter, intra the per-GPU bus
bandwidth inside a node (nccl-tests' busbw) and inter the node's network bandwidth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Per-GPU all-reduce bus bandwidth inside one node (nccl-tests busbw, 1 GiB messages), bytes/s.
NVLINK_BYTES_S: list[tuple[str, float]] = [
    # A100 SXM + NVSwitch (NVLink3, 600 GB/s per GPU): 230.8 GB/s measured on one p4d.24xlarge,
    # NVIDIA/nccl issue 527 (nccl-tests all_reduce_perf, 1 GiB).
    ("A100", 230e9),
    # NVLink4 (900 GB/s per GPU) and NVLink5 (1800 GB/s): the A100's measured 230/600 scaled, not measured here.
    ("H200", 345e9), ("GH200", 345e9), ("H100", 345e9), ("B200", 690e9),
]
PCIE_PEER_BYTES_S = 10e9
"""Cards without NVLink (A10G, L4, ...): collectives cross PCIe and the host."""

# A node's network bandwidth by interconnect, bytes/s: 80% (EFA) / 90% (InfiniBand) of line rate.
NODE_NETWORK_BYTES_S: dict[str, list[tuple[str, float]]] = {
    # p4d.24xlarge: 4 EFA x 100 Gbit/s = 50 GB/s; p5/p5e.48xlarge: 32 x 100 Gbit/s = 400 GB/s;
    # p6-b200.48xlarge: 3200 Gbit/s (AWS EC2 user guide, "Maximize network bandwidth ... with EFA").
    # 2 x p4d: the model gives 57 GB/s all-reduce busbw, nccl issue 527 measured 57.2 GB/s.
    "efa": [("A100", 40e9), ("H200", 320e9), ("H100", 320e9), ("B200", 320e9), ("", 10e9)],
    # DGX-style: 8 x 200 Gbit/s HDR (A100), 8 x 400 Gbit/s NDR (H100/H200/B200).
    "ib": [("A100", 180e9), ("H200", 360e9), ("H100", 360e9), ("B200", 360e9), ("", 22e9)],
    # NCCL's socket transport over one ENA / Ethernet interface: ~4.7 GB/s all-reduce busbw between
    # two p3dn (100 Gbit/s), NVIDIA/nccl issue 398; the same one 100 Gbit/s interface on p4d/p5 without EFA.
    "tcp": [("", 5e9)],
}
INTERCONNECTS = tuple(NODE_NETWORK_BYTES_S)
EFA_GPUS = ("A100", "H100", "H200", "B200")
"""Cards of AWS's EFA instance types (p4d, p5, p5e, p6): `plan --nodes K` assumes EFA for them."""

PERSISTENCE = 1e5
"""stage3_param_persistence_threshold as train/deepspeed_config.py sets it."""
MAX_REUSE = 1e9
"""stage3_max_reuse_distance: DeepSpeed's default."""
PREFETCH = 5e7
"""stage3_prefetch_bucket_size as train/deepspeed_config.py sets it."""


def default_interconnect(gpu: str) -> str:
    return "efa" if any(k.lower() in gpu.lower() for k in EFA_GPUS) else "tcp"


def link_bandwidths(gpu: str, interconnect: str) -> tuple[float, float]:
    """(per-GPU bus bandwidth inside a node, the node's network bandwidth) for `gpu` on `interconnect`."""
    if interconnect not in NODE_NETWORK_BYTES_S:
        raise ValueError(f"--interconnect {interconnect!r}: one of {', '.join(INTERCONNECTS)}")
    name = gpu.lower()
    intra = next((bw for key, bw in NVLINK_BYTES_S if key.lower() in name), PCIE_PEER_BYTES_S)
    inter = next(bw for key, bw in NODE_NETWORK_BYTES_S[interconnect] if key.lower() in name)
    return intra, inter


@dataclass(frozen=True)
class Collective:
    op: str
    """all_reduce | all_gather | reduce_scatter"""
    nbytes: float
    """Payload per rank and optimizer step, all calls together (nccl-tests' size)."""
    what: str


Trace = tuple[tuple[tuple[int, int], ...], ...]
"""Modules in forward order, each as its own parameters (id, elements): ZeRO-3's module trace."""


def model_trace(model) -> Trace:
    """The modules of `model` that hold parameters, in registration order (our models' forward
    order), with their own parameters; a tied parameter appears under each module that holds it."""
    ids: dict[int, int] = {}
    out = []
    for m in model.modules():
        own = [(ids.setdefault(id(p), len(ids)), p.numel()) for p in m.parameters(recurse=False)]
        if own:
            out.append(tuple(own))
    return tuple(out)


def _distinct(trace: Trace) -> dict[int, int]:
    return {pid: n for module in trace for pid, n in module}


def zero3_gathers(trace: Trace, *, persistence: float = PERSISTENCE, max_reuse: float = MAX_REUSE,
                  prefetch: float = PREFETCH) -> tuple[int, int]:
    """(elements ZeRO-3 all-gathers per micro-step, persistent elements gathered once per step)."""
    params = _distinct(trace)
    persistent = {pid for pid, n in params.items() if n <= persistence}
    movable = sum(n for pid, n in params.items() if pid not in persistent)
    if movable <= prefetch:  # one prefetch window sees every later use: nothing is released early
        return movable, sum(params[p] for p in persistent)
    order = list(trace) + list(reversed(trace))  # forward, then backward in reverse
    after = [0] * (len(order) + 1)  # elements used from position i on
    for i in range(len(order) - 1, -1, -1):
        after[i] = after[i + 1] + sum(n for _, n in order[i])
    available, gathered = set(persistent), 0
    for i, module in enumerate(order):
        for pid, n in module:
            if pid not in available:
                gathered += n
                available.add(pid)
        for pid, _ in module:  # kept if used again within max_reuse elements of the trace
            if pid not in persistent and not _reused(order, i + 1, pid, after, max_reuse):
                available.discard(pid)
    return gathered, sum(params[p] for p in persistent)


def _reused(order: list, start: int, pid: int, after: list[int], max_reuse: float) -> bool:
    for j in range(start, len(order)):
        if after[start] - after[j] >= max_reuse:
            return False
        if any(p == pid for p, _ in order[j]):
            return True
    return False


def step_collectives(*, stage: int, grad_accum: int, n_params: int, precision: str, trace: Trace = (),
                     persistence: float = PERSISTENCE, max_reuse: float = MAX_REUSE,
                     prefetch: float = PREFETCH) -> list[Collective]:
    """What one optimizer step of `grad_accum` micro-steps sends per rank under ZeRO `stage`."""
    nbytes = 2 if precision in ("bf16", "fp16") else 4  # 16-bit params and communication_data_type
    grads = n_params * nbytes
    if stage == 0:
        return [Collective("all_reduce", grads, "gradients, once per step")]
    if stage in (1, 2):
        times = 1 if stage == 1 else grad_accum
        return [Collective("all_reduce", grads * times, "gradients, " + ("once per step" if stage == 1
                                                                           else "every micro-step")),
                Collective("all_gather", n_params * nbytes, "updated parameters, once per step")]
    trace = trace or (((0, n_params),),)
    per_micro, persistent = zero3_gathers(trace, persistence=persistence, max_reuse=max_reuse, prefetch=prefetch)
    return [Collective("all_gather", per_micro * nbytes * grad_accum, "parameters in forward/backward, every micro-step"),
            Collective("reduce_scatter", grads * grad_accum, "gradients, every micro-step"),
            Collective("all_gather", persistent * nbytes, "persistent parameters, once per step")]


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw: what each rank moves per byte of payload."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def comm_seconds(collectives: Iterable[Collective], *, gpus_per_node: int, nodes: int, intra_bytes_s: float,
                 inter_bytes_s: float) -> tuple[float, float]:
    """(seconds inside nodes, seconds across nodes) of `collectives`, hierarchical, not overlapped."""
    intra = sum(c.nbytes * bus_factor(c.op, gpus_per_node) for c in collectives) / intra_bytes_s
    inter = sum(c.nbytes * bus_factor(c.op, nodes) for c in collectives) / inter_bytes_s
    return intra, inter


def expected_busbw(op: str, *, gpus_per_node: int, nodes: int, intra_bytes_s: float, inter_bytes_s: float) -> float:
    """The bus bandwidth (nccl-tests' definition over all ranks) the plan assumes for `op`."""
    one = Collective(op, 1.0, "")
    t = sum(comm_seconds([one], gpus_per_node=gpus_per_node, nodes=nodes, intra_bytes_s=intra_bytes_s,
                         inter_bytes_s=inter_bytes_s))
    return bus_factor(op, gpus_per_node * nodes) / t if t else float("inf")
