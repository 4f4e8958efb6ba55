"""Model -> AdamW -> LR schedule -> DeepSpeed engine, the same recipe on every rank (and in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from e2e_dist.config import RunConfig
from e2e_dist.train.deepspeed_config import build_deepspeed_config, lr_lambda
from e2e_dist.train.flops import train_flops_per_batch


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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels; not biases, norms or embeddings-as-vectors (the usual GPT recipe)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
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
    """The model on `device`, its FLOPs counted, wrapped in a DeepSpeed engine for `world` ranks
    (`load_universal`: one that restores a resharded checkpoint, see build_deepspeed_config)."""
    import deepspeed

    from e2e_dist.models.registry import build_model
    from e2e_dist.train.deepspeed_config import resolve_compile

    t = cfg.trainer
    on_gpu = device.type == "cuda"
    if on_gpu and t.check_memory:
        from e2e_dist.plan.report import check_fits_on_gpu

        check_fits_on_gpu(cfg, world=world, device=device)
    torch.manual_seed(t.seed)  # the same initial weights on every rank and every run
    model = build_model(cfg.model, cfg.data)
    # Count FLOPs on the real module before DeepSpeed partitions it (ZeRO-3 hides full params).
    model.to(device)
    flops_per_micro = train_flops_per_batch(model, model.example_batch(t.micro_batch_size, device))
    n_params, n_params_non_embedding = model.num_params(), model.num_params(non_embedding=True)
    model.checkpoint_activations = t.activation_checkpointing
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, fused=on_gpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if not on_gpu:
        skip_cpu_shm_comm()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=build_deepspeed_config(cfg, world_size=world, on_gpu=on_gpu, load_universal=load_universal,
                                      n_params=n_params),
        dist_init_required=False)
    if resolve_compile(cfg, on_gpu):
        engine.compile()
    return Built(model=model, engine=engine, scheduler=scheduler, n_params=n_params,
                 n_params_non_embedding=n_params_non_embedding, flops_per_step=flops_per_micro * t.grad_accum_at(world))
