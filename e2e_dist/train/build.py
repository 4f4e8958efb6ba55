"""Model -> AdamW -> LR schedule -> DeepSpeed engine, the same recipe on every rank (and in tests)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from e2e_dist.config import RunConfig
from e2e_dist.train import compile_cache
from e2e_dist.train.deepspeed_config import build_deepspeed_config, lr_lambda
from e2e_dist.train.flops import shape_counts


@dataclass(kw_only=True)
class Built:
    model: Any
    """The module itself (E2EModel); DeepSpeed partitions its parameters under ZeRO-3."""
    engine: Any
    scheduler: Any
    n_params: int
    n_params_non_embedding: int
    flops_per_step: float
    """Training FLOPs of one optimizer step on one rank (all micro-batches)."""
    compile_cache_loaded: int = 0
    """Bytes of shared torch.compile cache loaded before compiling (train/compile_cache.py)."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels; not biases, norms or embeddings-as-vectors (the usual GPT recipe)."""
    # A ZeRO-3 shard is a flat empty tensor: its whole shape is in `ds_shape`.
    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU collectives on plain gloo.

    Its shared-memory all-reduce op is JIT-built on first use (~25 s on a fresh machine) and its
    rendezvous between Ray worker processes stalled init by ~60 s here; gloo is what the raw DDP
    baseline uses too, so CPU comparisons stay like for like.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg: RunConfig, *, device: torch.device, world: int, load_universal: bool = False) -> Built:
    """The model on `device` (partitioned as it is built, under ZeRO-3), its FLOPs counted from its
    shapes, wrapped in a DeepSpeed engine for `world` ranks (`load_universal`: one that restores a
    resharded checkpoint, see build_deepspeed_config)."""
    import deepspeed

    from e2e_dist.train.deepspeed_config import resolve_compile

    t = cfg.trainer
    on_gpu = device.type == "cuda"
    if on_gpu and t.check_memory:
        from e2e_dist.plan.report import check_fits_on_gpu

        check_fits_on_gpu(cfg, world=world, device=device)
    counts = shape_counts(cfg.model, cfg.data, t.micro_batch_size)
    ds_config = build_deepspeed_config(cfg, world_size=world, on_gpu=on_gpu, load_universal=load_universal,
                                       n_params=counts.n_params)
    if not on_gpu:
        skip_cpu_shm_comm()
    partitioned = cfg.deepspeed.zero_stage == 3
    with freed_memory_returned() if partitioned else contextlib.nullcontext():
        torch.manual_seed(t.seed)  # the same initial weights on every rank, every run and every ZeRO stage
        model = build_model_for(cfg, ds_config, device)
        model.checkpoint_activations = t.activation_checkpointing
        optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, fused=on_gpu)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=ds_config, dist_init_required=False)
    loaded = 0
    if resolve_compile(cfg, on_gpu):
        loaded = compile_cache.load(cfg, device)  # the kernels an earlier run compiled, if any (any node)
        engine.compile()
    return Built(model=model, engine=engine, scheduler=scheduler, n_params=counts.n_params, compile_cache_loaded=loaded,
                 n_params_non_embedding=counts.n_params_non_embedding,
                 flops_per_step=counts.train_flops_per_micro_batch * t.grad_accum_at(world))


def build_model_for(cfg: RunConfig, ds_config: dict[str, Any], device: torch.device) -> Any:
    """The model, ready for `deepspeed.initialize`. Under ZeRO-3 it is built inside
    `deepspeed.zero.Init`: each submodule's parameters are partitioned over the ranks (or put on
    the CPU, with offload_params) as its constructor returns, so no rank ever holds the whole model
    - a model that does not fit one device still builds. Its initialization then runs module by
    module with that module's weights gathered, rank 0's draws kept: the same weights as at ZeRO-1/2."""
    import deepspeed

    from e2e_dist.models.registry import build_model

    if cfg.deepspeed.zero_stage != 3:
        return build_model(cfg.model, cfg.data).to(device)
    # On the process group already there (deepspeed.initialize would do the same later): zero.Init
    # reads the world size from DeepSpeed's comm before it would initialize it itself.
    deepspeed.comm.init_distributed(dist_init_required=False)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build_model(cfg.model, cfg.data)
        model.init_weights(gathered=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
    return model


GLIBC_MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's ceiling for its dynamic mmap threshold on 64-bit (what the threshold grows to)."""


@contextlib.contextmanager
def freed_memory_returned(threshold: int = 1 << 20):
    """While building a ZeRO-3 engine: host allocations over `threshold` get their own mappings, so
    the whole tensor a constructor makes and zero.Init then cuts to a shard is given back to the
    OS when freed. glibc otherwise raises its mmap threshold to 32 MiB at the first big free, and
    every later layer lands in the heap, whose freed pages stay with the process: a 252M-parameter
    model on 2 CPU ranks peaked at 1.12x its fp32 size per rank that way while the model was built,
    0.54x with this (benchmarks/build_memory.py); DeepSpeed's flat buffers behave the same. Afterwards the threshold is left where glibc would have grown it
    (allocations in steps behave as before) and the heap trimmed. No-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_mmap_threshold = -3  # <malloc.h>
    mallopt(m_mmap_threshold, threshold)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD_MAX)
        malloc_trim(0)
