"""RunConfig -> the DeepSpeed config dict. Nothing else lives here.

The optimizer is built by us (torch AdamW, handed to `deepspeed.initialize`) rather than named in
the config: DeepSpeed's FusedAdam / DeepSpeedCPUAdam JIT-compile for ~45 s each on first use, and
torch's AdamW (fused on CUDA) is as fast. The LR schedule is ours too (warmup + cosine with a floor),
a plain LambdaLR that DeepSpeed steps and checkpoints with the engine.
"""

from __future__ import annotations

import math
from typing import Any

from e2e_dist.config import RunConfig, deep_merge


def resolve_precision(cfg: RunConfig, on_gpu: bool) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16" if on_gpu else "fp32"


def resolve_compile(cfg: RunConfig, on_gpu: bool) -> bool:
    """trainer.compile, with None meaning: compile on GPU (closes most of the gap to a plain
    torch.compile loop), not on CPU (compile time dominates the short runs made there)."""
    return cfg.trainer.compile if cfg.trainer.compile is not None else on_gpu


REDUCE_BUCKET = 5e8
"""DeepSpeed's default reduce_bucket_size (elements)."""


def reduce_bucket_elements(n_params: int | None) -> int:
    """Elements per gradient-reduction bucket: DeepSpeed's default, but never more than the model.

    ZeRO-1/2 allocate a bucket (two with overlap_comm) of this many elements at every backward and
    ZeRO-3 one up front, whatever the model's size: 5e8 is 2-4 GiB per GPU, more than a 125M model's
    whole states (plan/memory.py)."""
    return int(min(REDUCE_BUCKET, max(n_params, 1_000_000))) if n_params else int(REDUCE_BUCKET)


def build_deepspeed_config(cfg: RunConfig, *, world_size: int, on_gpu: bool, load_universal: bool = False,
                           n_params: int | None = None) -> dict[str, Any]:
    """load_universal: the engine will restore a checkpoint's universal form (another world size,
    stage or offload setting wrote it; checkpoint/universal.py). Saving is unaffected.
    n_params: the model's size, which caps the reduce buckets (`reduce_bucket_elements`)."""
    t, ds = cfg.trainer, cfg.deepspeed
    accum = t.grad_accum_at(world_size)
    precision = resolve_precision(cfg, on_gpu)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # Overlap gradient reduction with backward and use contiguous buffers (fewer, larger collectives).
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=reduce_bucket_elements(n_params))
    if ds.zero_stage == 3:
        # Keep small parameters resident (no gather per use) and prefetch the next layer's shards.
        zero.update(stage3_param_persistence_threshold=1e5, stage3_prefetch_bucket_size=5e7,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12, "loss_scale_window": 200},
        "steps_per_print": 10**9,  # we report metrics ourselves
        "wall_clock_breakdown": False,
        # Checkpoint loading must not need a matching DeepSpeed "latest" file: we pass the tag.
        "checkpoint": {"tag_validation": "Ignore", "load_universal": load_universal},
    }
    if ds.offload_optimizer:
        # With an external torch optimizer DeepSpeed needs explicit consent to offload it.
        out["zero_force_ds_cpu_optimizer"] = False
    return deep_merge(out, ds.overrides)


def lr_lambda(cfg: RunConfig):
    """Multiplier of the peak LR at optimizer step s: linear warmup, cosine decay to min_lr_ratio."""
    t = cfg.trainer
    warm, total, floor = t.warmup_steps, t.max_steps, t.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
