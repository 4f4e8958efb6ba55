"""Building the engine: ZeRO-3 models are built partitioned (deepspeed.zero.Init) with the very
weights the other stages get, and the build's memory stays under the model's size per rank."""

from __future__ import annotations

import pytest
import torch

from e2e_dist.config import RunConfig

SHAPES = {
    "gpt": ({"kind": "gpt", "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32}, {"seq_len": 16}),
    "resnet": ({"kind": "resnet", "widths": [8, 16], "blocks_per_stage": 1}, {"source": "digits"}),
    "ctc-speech": ({"kind": "ctc-speech", "conv_channels": 16, "d_model": 32, "n_layer": 2, "n_head": 2,
                    "front_end": "conv"}, {"source": "spoken-digits"}),
}


def cfg_of(kind: str, zero_stage: int) -> RunConfig:
    model, data = SHAPES[kind]
    return RunConfig.model_validate({"name": "b", "storage": {"path": "./runs"}, "model": model, "data": data,
                                     "trainer": {"micro_batch_size": 2, "max_steps": 4},
                                     "deepspeed": {"zero_stage": zero_stage}})


def weights_of(cfg: RunConfig) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The model build_engine would hand to DeepSpeed, gathered whole, and the sizes of the
    optimizer's parameter groups (decayed matrices, the rest)."""
    import deepspeed

    from e2e_dist.train.build import build_model_for, param_groups
    from e2e_dist.train.deepspeed_config import build_deepspeed_config

    torch.manual_seed(cfg.trainer.seed)
    model = build_model_for(cfg, build_deepspeed_config(cfg, world_size=1, on_gpu=False), torch.device("cpu"))
    params = list(model.parameters())
    groups = [len(g["params"]) for g in param_groups(model, 0.1)]
    if cfg.deepspeed.zero_stage == 3:
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "not partitioned as built"
        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}, groups
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, groups


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_zero3_builds_partitioned_with_the_same_initial_weights(ds, kind):
    """Each model's own init (GPT's scaled residual projections, ResNet's zero BN scales, the
    speech front end's kaiming convs) survives zero.Init: bit for bit the ZeRO-2 weights."""
    (plain, plain_groups), (partitioned, groups) = weights_of(cfg_of(kind, 2)), weights_of(cfg_of(kind, 3))
    assert groups == plain_groups and min(groups) > 0  # shards are flat: weight decay goes by the whole shape
    assert plain.keys() == partitioned.keys()
    for name, tensor in plain.items():
        assert torch.equal(tensor, partitioned[name]), name
    if kind == "resnet":
        assert all(float(v.abs().sum()) == 0 for k, v in partitioned.items() if k.endswith("bn2.weight"))
    if kind == "gpt":  # residual projections at 0.02/sqrt(2L), the rest at 0.02
        assert float(partitioned["blocks_.0.attn.proj.weight"].std()) < 0.7 * float(partitioned["blocks_.0.attn.qkv.weight"].std())


@pytest.mark.slow
def test_a_zero3_build_on_two_ranks_holds_about_half_the_model_per_rank(tmp_path):
    """2 CPU ranks build a 25M-parameter GPT at ZeRO-3 as build_engine does: each rank's peak
    while the model is built stays well under the whole fp32 model (0.54x at 252M, where fixed
    costs vanish: BENCHMARKS.md). The old way held the whole model on every rank (1.0x)."""
    from benchmarks.build_memory import measure

    rows = measure("zero_init", ranks=2, d_model=512, layers=8, out_dir=str(tmp_path))
    for row in rows:
        assert row["n_params"] > 25_000_000
        assert row["model_peak_x_full"] < 0.7, row
