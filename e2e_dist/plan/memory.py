"""Per-GPU memory of model states (parameters, gradients, optimizer) for each ZeRO layout.

The bytes per parameter follow DeepSpeed's own accounting (the comments of its estimators
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, which
`ModelStates.deepspeed_gpu` calls for the cross-check), split by kind so the plan can say *what*
fills a GPU, plus the buffers our DeepSpeed config makes it allocate (train/deepspeed_config.py):
- mixed precision (bf16/fp16): 16-bit params (2), 16-bit + fp32 grads (2 + 4), fp32 master
  weights (4) and Adam's two moments (8);
- fp32: params (4), grads (4; under ZeRO >= 1 only the rank's shard: the rest passes through the
  buckets), and under ZeRO >= 1 DeepSpeed's fp32 partition (a copy, 4) + Adam (8);
- reduce buckets: ZeRO-1/2 allocate reduce_bucket_size elements per bucket at backward (fp32 under
  ZeRO-1, 16-bit under ZeRO-2), two when overlap_comm is on (GPU); ZeRO-3 one 16-bit bucket plus
  its prefetch bucket. With the default 5e8 that is 1-4 GiB whatever the model's size.
ZeRO shards what its stage covers over the data-parallel world N: 1 = optimizer, 2 = + grads,
3 = + params (with the largest layer gathered whole while it runs).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One way to lay the states out: a ZeRO stage and what is offloaded to CPU."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        off = "+offload(opt,params)" if self.offload_params else "+offload(opt)" if self.offload_optimizer else ""
        return f"ZeRO-{self.zero_stage}{off}"



LAYOUTS = (
    Layout(zero_stage=0), Layout(zero_stage=1), Layout(zero_stage=2), Layout(zero_stage=2, offload_optimizer=True),
    Layout(zero_stage=3), Layout(zero_stage=3, offload_optimizer=True),
    Layout(zero_stage=3, offload_optimizer=True, offload_params=True),
)
"""Every layout the plan weighs, in DeepSpeed's order of rising memory savings."""


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Bytes on one GPU (and on each node's CPU for offloaded state)."""

    params: int
    grads: int
    optimizer: int
    buffers: int
    """DeepSpeed's gradient-reduction buckets (sized by the config's reduce_bucket_size)."""
    cpu_per_node: int
    """Offloaded state in each node's host memory (DeepSpeed's estimate, its 1.5x buffer factor included)."""
    deepspeed_gpu: int | None
    """DeepSpeed's own estimate of the GPU bytes (ZeRO-2 and -3 only; it has none for 0 and 1)."""

    @property
    def gpu(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers


def model_states(*, n_params: int, largest_layer: int, layout: Layout, world: int, gpus_per_node: int,
                 precision: str, on_gpu: bool = True, reduce_bucket: float = 5e8) -> ModelStates:
    """Model-state bytes per GPU for `n_params` parameters trained by `world` data-parallel ranks."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    P, N, stage = n_params, world, layout.zero_stage
    mixed = precision in ("bf16", "fp16")
    p_bytes, grad_bytes = (2, 2 + 4) if mixed else (4, 4)
    opt_bytes = 4 + 8 if (mixed or stage >= 1) else 8  # fp32 master/partition copy + Adam m, v
    gather = 4 * largest_layer  # ZeRO-3: a layer's full params while it runs (DeepSpeed's term)

    params = P * p_bytes if stage < 3 else P * p_bytes // N + gather
    if stage == 0:
        grads = P * grad_bytes
    elif stage == 1 and mixed:
        grads = P * 2 + P * 4 // N  # full 16-bit grads, the fp32 shard accumulated
    else:
        grads = P * grad_bytes // N
    optimizer = P * opt_bytes // (N if stage >= 1 else 1)
    if layout.offload_optimizer:
        grads = optimizer = 0
    if layout.offload_params:
        params = gather

    overlap = 2 if on_gpu else 1
    if stage in (1, 2):
        bucket_elem = 4 if (stage == 1 or not mixed) else 2
        buffers = int(reduce_bucket) * bucket_elem * overlap
    elif stage == 3:
        buffers = int(reduce_bucket) * p_bytes
    else:
        buffers = 0

    nodes = max(1, N // max(1, gpus_per_node))
    ds_gpu, cpu = None, 0
    if stage == 2:
        cpu_est, ds_gpu = estimate_zero2_model_states_mem_needs(
            P, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=layout.offload_optimizer)
        cpu = cpu_est if layout.offload_optimizer else 0
    elif stage == 3:
        cpu_est, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
            P, largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=layout.offload_optimizer, cpu_offload_params=layout.offload_params, zero_init=False)
        cpu = cpu_est if layout.offload_optimizer else 0
    elif layout.offload_optimizer:  # ZeRO-1 offload: what ZeRO-2's offload keeps on the host
        cpu = int(P * max(4 * N, 16) * 1.5)
    return ModelStates(params=params, grads=grads, optimizer=optimizer, buffers=buffers, cpu_per_node=int(cpu),
                       deepspeed_gpu=ds_gpu)


def largest_layer_params(model) -> int:
    """Parameters of the largest single module (its own, not its children's): what ZeRO-3 gathers at once."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
