"""`e2e-dist plan`: which ZeRO layout, micro-batch and activation checkpointing fit a GPU, and how fast.

Every option (layout x micro-batch x checkpointing) is costed: model states (plan/memory.py),
activations (plan/activations.py), and a step time from FLOPs at a stated MFU plus the traffic each
layout adds: the collectives DeepSpeed runs per optimizer step, by link (plan/comm.py: per
micro-step for ZeRO >= 2, so the micro-batch matters), offload over PCIe and the CPU's Adam.
An option fits when its bytes leave HEADROOM of the card free after RESERVED_GIB for the CUDA
context and library workspaces. The recommendation is the fastest option that fits (estimates within
TIE of each other count as equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e2e_dist.errors import ConfigError
from e2e_dist.plan.activations import Activations
from e2e_dist.plan.comm import Trace, comm_seconds, link_bandwidths, step_collectives
from e2e_dist.plan.memory import LAYOUTS, GiB, Layout, ModelStates, model_states

HEADROOM = 0.10
"""Share of the card kept free for the allocator's fragmentation and what the estimate misses."""
RESERVED_GIB = 1.0
"""CUDA context, cuBLAS/NCCL workspaces: taken off the card before anything else."""
DEFAULT_MFU = 0.40
PCIE_BYTES_S = 20e9
"""Host <-> GPU copies for offloaded state."""
CPU_ADAM_PARAMS_S = 1e9
"""Parameters per second a node's CPUs update under offload (DeepSpeed's CPU Adam class; torch's is slower)."""
STAGE_PREFERENCE = {2: 0, 1: 1, 3: 2, 0: 3}
"""Order among options of equal estimated speed."""
TIE = 0.03
"""Step-time estimates closer than this (relative) count as equal: below what MFU and link figures resolve."""
RECOMPUTE = 4 / 3
"""Activation checkpointing reruns each block's forward: 4 passes' FLOPs instead of 3."""


@dataclass(frozen=True, kw_only=True)
class Hardware:
    gpus_per_node: int = 1
    nodes: int = 1
    gpu_mem_gib: float = 80.0
    gpu_name: str = "H100"
    peak_flops: float = 989e12
    mfu: float = DEFAULT_MFU
    interconnect: str = "efa"
    """Between nodes: efa | ib | tcp (plan/comm.py); unused on one node."""
    intra_bytes_s: float | None = None
    """Per-GPU bus bandwidth inside a node; None: plan/comm.py's figure for the card."""
    inter_bytes_s: float | None = None
    """A node's network bandwidth; None: plan/comm.py's figure for the card and interconnect."""

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def links(self) -> tuple[float, float]:
        intra, inter = link_bandwidths(self.gpu_name, self.interconnect)
        return self.intra_bytes_s or intra, self.inter_bytes_s or inter


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the plan needs of a model, from its config (see plan/report.py `shape_of`)."""

    name: str
    n_params: int
    largest_layer: int
    flops_per_example: float
    """Training FLOPs (forward + backward) of one example (one window / image / clip)."""
    units_per_example: int
    """Tokens per window for text (1 otherwise): tokens/s = examples/s x this."""
    unit_name: str
    precision: str
    activations: object
    """callable(micro_batch, checkpointing) -> Activations."""
    trace: Trace = ()
    """Modules in forward order with their parameters (plan/comm.py model_trace): ZeRO-3's gathers."""


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """One optimizer step's seconds by what takes them (not overlapped: conservative)."""

    compute: float
    intra: float
    """Collectives inside nodes (NVLink)."""
    inter: float
    """Collectives across nodes (EFA / InfiniBand / TCP)."""
    offload: float
    comm_bytes: float
    """Collective payload per rank and step (nccl-tests' size, all collectives together)."""

    @property
    def total(self) -> float:
        return self.compute + self.intra + self.inter + self.offload


@dataclass(frozen=True, kw_only=True)
class Option:
    layout: Layout
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    states: ModelStates
    activations: Activations
    usable_bytes: float
    time: StepTime
    units_s: float

    @property
    def step_s(self) -> float:
        return self.time.total

    @property
    def gpu_bytes(self) -> int:
        return self.states.gpu + self.activations.peak

    @property
    def fits(self) -> bool:
        return self.gpu_bytes <= self.usable_bytes

    def settings(self) -> dict[str, object]:
        """The config fields that select this option."""
        return {"deepspeed.zero_stage": self.layout.zero_stage, "deepspeed.offload_optimizer": self.layout.offload_optimizer,
                "deepspeed.offload_params": self.layout.offload_params, "trainer.micro_batch_size": self.micro_batch,
                "trainer.activation_checkpointing": self.checkpointing}

    def set_args(self, current: dict[str, object] | None = None) -> str:
        """`--set k=v ...` for the fields that differ from `current` (all when None)."""
        return " ".join(f"--set {k}={str(v).lower()}" for k, v in self.settings().items()
                        if current is None or current.get(k) != v)


@dataclass(kw_only=True)
class Plan:
    shape: ModelShape
    hardware: Hardware
    global_batch: int
    options: list[Option] = field(default_factory=list)

    @property
    def best(self) -> Option | None:
        fitting = [o for o in self.options if o.fits]
        if not fitting:
            return None
        # Estimates within TIE of the fastest are equal (the model cannot tell them apart): then the
        # larger micro-batch (fewer, fuller kernels: the MFU assumes it), then the usual layout order
        # (ZeRO-0 last: its checkpoints resume only as ZeRO-0), then less memory, then the faster.
        fastest = min(o.step_s for o in fitting)
        near = [o for o in fitting if o.step_s <= fastest * (1 + TIE)]
        return min(near, key=lambda o: (-o.micro_batch, STAGE_PREFERENCE[o.layout.zero_stage], o.gpu_bytes, o.step_s))


def usable_bytes(gpu_mem_gib: float) -> float:
    return (gpu_mem_gib - RESERVED_GIB) * (1 - HEADROOM) * GiB


def step_time(shape: ModelShape, hw: Hardware, layout: Layout, global_batch: int, checkpointing: bool,
              grad_accum: int = 1) -> StepTime:
    """Compute at the stated MFU, plus DeepSpeed's collectives of one step (plan/comm.py) and offload
    traffic, not overlapped (conservative)."""
    P, N = shape.n_params, hw.world
    compute = shape.flops_per_example * global_batch * (RECOMPUTE if checkpointing else 1) / (N * hw.peak_flops * hw.mfu)
    intra = inter = comm_bytes = 0.0
    if N > 1:
        collectives = step_collectives(stage=layout.zero_stage, grad_accum=grad_accum, n_params=P,
                                       precision=shape.precision, trace=shape.trace)
        intra_bw, inter_bw = hw.links()
        intra, inter = comm_seconds(collectives, gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
                                    intra_bytes_s=intra_bw, inter_bytes_s=inter_bw)
        comm_bytes = sum(c.nbytes for c in collectives)
    offload = 0.0
    if layout.offload_optimizer:
        shard = P / N
        offload = shard * (2 + 2) / PCIE_BYTES_S + shard * hw.gpus_per_node / CPU_ADAM_PARAMS_S
    if layout.offload_params:
        offload += 2 * P * 2 / PCIE_BYTES_S  # every layer's 16-bit params up in forward and again in backward
    return StepTime(compute=compute, intra=intra, inter=inter, offload=offload, comm_bytes=comm_bytes)


def micro_batches(per_rank: int) -> list[int]:
    """Powers of two dividing the per-rank batch (and the per-rank batch itself)."""
    out = [m for m in (2**k for k in range(0, 16)) if m <= per_rank and per_rank % m == 0]
    return sorted(set(out + [per_rank]))


def make_plan(shape: ModelShape, hw: Hardware, global_batch: int, *, layouts=LAYOUTS, reduce_bucket: float = 5e8) -> Plan:
    if global_batch % hw.world:
        raise ConfigError(f"trainer.global_batch_size={global_batch} does not split over {hw.world} GPUs: "
                          f"use a multiple of {hw.world}")
    plan = Plan(shape=shape, hardware=hw, global_batch=global_batch)
    per_rank = global_batch // hw.world
    usable = usable_bytes(hw.gpu_mem_gib)
    for layout in layouts:
        states = model_states(n_params=shape.n_params, largest_layer=shape.largest_layer, layout=layout,
                              world=hw.world, gpus_per_node=hw.gpus_per_node, precision=shape.precision,
                              reduce_bucket=reduce_bucket)
        for ckpt in (False, True):
            for m in micro_batches(per_rank):  # ZeRO >= 2 communicates per micro-step: time by micro-batch
                step = step_time(shape, hw, layout, global_batch, ckpt, grad_accum=per_rank // m)
                plan.options.append(Option(
                    layout=layout, micro_batch=m, grad_accum=per_rank // m, checkpointing=ckpt, states=states,
                    activations=shape.activations(m, ckpt), usable_bytes=usable, time=step,
                    units_s=global_batch * shape.units_per_example / step.total))
    return plan


def refuse_if_too_big(plan: Plan, chosen: Option, config_label: str) -> None:
    """The check `train` runs on GPU: a setting that cannot fit stops with a line naming what to change."""
    if chosen.fits:
        return
    best = plan.best
    need, have = chosen.gpu_bytes / GiB, chosen.usable_bytes / GiB
    fix = (f"try {best.set_args(chosen.settings())} (e2e-dist plan {config_label} lists the options)" if best else
           f"no layout fits {plan.hardware.gpu_mem_gib:.0f} GiB: use more GPUs or a smaller model")
    raise ConfigError(
        f"{chosen.layout.label} with trainer.micro_batch_size={chosen.micro_batch} needs ~{need:.1f} GiB per GPU "
        f"(states {chosen.states.gpu / GiB:.1f}, activations {chosen.activations.peak / GiB:.1f}) but "
        f"{have:.1f} GiB of the {plan.hardware.gpu_mem_gib:.0f} GiB card is usable: {fix}")
