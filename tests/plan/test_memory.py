"""Model-state accounting per ZeRO layout: DeepSpeed's own estimators agree, shards shrink with N."""

import pytest

from e2e_dist.plan.memory import GiB, LAYOUTS, Layout, model_states

P, LARGEST = 1_300_000_000, 8_400_000


def states(layout, world=8, precision="bf16", **kw):
    return model_states(n_params=P, largest_layer=LARGEST, layout=layout, world=world, gpus_per_node=min(world, 8),
                        precision=precision, **kw)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeeds_estimator(offload):
    s = states(Layout(zero_stage=2, offload_optimizer=offload))
    # Without buckets our split (2 + (2+4)/N + 12/N bytes per parameter) is DeepSpeed's total exactly.
    assert s.params + s.grads + s.optimizer == s.deepspeed_gpu
    assert (s.cpu_per_node > 0) == offload


@pytest.mark.parametrize("layout", [l for l in LAYOUTS if l.zero_stage == 3])
def test_zero3_is_deepspeeds_estimate_plus_the_16bit_shard(layout):
    """DeepSpeed's ZeRO-3 estimate leaves the rank's 16-bit parameter shard out when nothing is
    offloaded (its 18 bytes per parameter are grads, fp32 params and Adam) and counts it otherwise."""
    s = states(layout)
    shard = 0 if layout.offload_optimizer else 2 * P // 8
    assert s.params + s.grads + s.optimizer == s.deepspeed_gpu + shard


def test_sharding_follows_the_stage():
    one = {l.zero_stage: states(l, world=1) for l in LAYOUTS if not l.offload_optimizer}
    eight = {l.zero_stage: states(l, world=8) for l in LAYOUTS if not l.offload_optimizer}
    assert eight[0].gpu == one[0].gpu  # plain data parallel: every rank holds everything
    assert eight[1].optimizer == one[1].optimizer // 8 and eight[1].params == one[1].params
    assert eight[2].grads == one[2].grads // 8 and eight[2].params == one[2].params
    assert eight[3].params < one[3].params / 4  # the 16-bit shard + one gathered layer
    # Mixed precision on one GPU: 2 + 6 + 12 = 20 bytes per parameter under any stage, before buckets.
    assert all(abs((s.gpu - s.buffers) / P - 20) < 0.1 for st, s in one.items() if st in (0, 1, 2))


def test_offload_moves_optimizer_and_grads_to_the_host():
    on, off = states(Layout(zero_stage=2)), states(Layout(zero_stage=2, offload_optimizer=True))
    assert off.optimizer == off.grads == 0 and off.params == on.params
    assert off.cpu_per_node > P * 12  # fp32 master + Adam of the node's 8 shards, with DeepSpeed's buffer factor


def test_buckets_follow_the_config():
    """ZeRO-1 stages fp32 buckets, ZeRO-2 16-bit ones, doubled by overlap_comm on GPU; DeepSpeed's
    default 5e8 elements is GiBs, our cap (deepspeed_config.reduce_bucket_elements) the model's size."""
    from e2e_dist.train.deepspeed_config import reduce_bucket_elements

    assert states(Layout(zero_stage=1), reduce_bucket=5e8).buffers == 5e8 * 4 * 2
    assert states(Layout(zero_stage=2), reduce_bucket=5e8).buffers == 5e8 * 2 * 2
    assert states(Layout(zero_stage=2), reduce_bucket=5e8, on_gpu=False).buffers == 5e8 * 2
    assert reduce_bucket_elements(125_000_000) == 125_000_000 and reduce_bucket_elements(P) == 5e8
    small = states(Layout(zero_stage=2), reduce_bucket=reduce_bucket_elements(10_000_000))
    assert small.buffers < 0.05 * GiB * 1
