"""Shared by the model tests: real DeepSpeed engines in this process, built the way the train loop does."""

from __future__ import annotations

import atexit

import torch


def ensure_gloo_world_of_one() -> None:
    """A one-rank gloo process group (DeepSpeed needs one); reused if another test already made it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    from e2e_dist.train.rendezvous import init_loopback_process_group

    init_loopback_process_group("gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def make_engine(cfg, monkeypatch):
    """RunConfig -> (DeepSpeed engine, the module inside it): our AdamW and the project's DeepSpeed config."""
    import deepspeed

    from e2e_dist.models.registry import build_model
    from e2e_dist.train.deepspeed_config import build_deepspeed_config

    ensure_gloo_world_of_one()
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed reads it at init and (ZeRO-3) during steps
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=build_deepspeed_config(cfg, world_size=1, on_gpu=False))
    return engine, model
