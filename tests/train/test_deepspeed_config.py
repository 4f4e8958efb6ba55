from __future__ import annotations

import pytest

from e2e_dist.config import load_run_config
from e2e_dist.train.deepspeed_config import build_deepspeed_config, lr_lambda


def cfg_with(*overrides):
    return load_run_config("tiny-text", list(overrides))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_batch(stage):
    ds = build_deepspeed_config(cfg_with(f"deepspeed.zero_stage={stage}", "trainer.micro_batch_size=4",
                                         "trainer.grad_accum=3"), world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_accumulation_steps"] == 3
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # CPU default: fp32


def test_gpu_defaults_bf16_and_offload():
    cfg = cfg_with("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                   "trainer.grad_clip=0.5")
    ds = build_deepspeed_config(cfg, world_size=8, on_gpu=True)
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert z["overlap_comm"] is True


def test_precision_override_and_raw_overrides():
    cfg = cfg_with("trainer.precision=fp16", "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000}}")
    ds = build_deepspeed_config(cfg, world_size=1, on_gpu=True)
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 2


def test_warmup_cosine_schedule():
    f = lr_lambda(cfg_with("trainer.warmup_steps=10", "trainer.max_steps=110", "trainer.min_lr_ratio=0.1"))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # halfway through cosine: floor + (1-floor)/2
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
