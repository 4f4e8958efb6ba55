"""FLOPs come from FlopCounterMode on the real model; check them against a hand count."""

from __future__ import annotations

import torch

from e2e_dist.models.gpt import VOCAB_SIZE, ByteGPT
from e2e_dist.train.flops import forward_flops, mfu, peak_flops, train_flops_per_batch


def test_gpt_flops_match_hand_count():
    B, T, d, L, h = 2, 16, 32, 2, 4
    model = ByteGPT(L, h, d, T)
    batch = {"tokens": torch.randint(0, 256, (B, T + 1))}
    # Per token and layer: qkv 3d^2, proj d^2, MLP 8d^2 multiply-adds; plus the d x V head. 2 FLOPs per MAC.
    linear = 2 * B * T * (L * (3 * d * d + d * d + 8 * d * d) + d * VOCAB_SIZE)
    # Attention: QK^T and AV, each 2*B*T*T*d per layer (PyTorch counts the full square, not the causal half).
    attention = L * 4 * B * T * T * d
    assert forward_flops(model, batch) == linear + attention
    # Backward: 2x the forward for matmuls; attention backward is 5 matmuls (2.5x its forward).
    assert train_flops_per_batch(model, batch) == 3 * linear + attention + int(2.5 * attention)


def test_mfu_and_peaks():
    assert peak_flops("cpu") is None
    assert mfu(1e12, 1.0, None) is None
    assert mfu(500e12, 1.0, 1000e12) == 0.5


def _math_attention():
    """Attention through its matmuls (what the 'meta' device runs too): 4 for backward, not the
    fused CPU kernel's 5, so counts compare like for like."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def test_gpt_train_flops_from_shapes_equal_the_flop_counter():
    """6N + 12LTd per token (gpt_train_flops) is what FlopCounterMode counts on real weights."""
    B, T, d, L, h = 3, 24, 48, 3, 4
    model = ByteGPT(L, h, d, T)
    with _math_attention():
        counted = train_flops_per_batch(model, {"tokens": torch.randint(0, 256, (B, T + 1))})
    assert model.train_flops(B) == counted


def test_shape_counts_on_meta_equal_real_counts_for_every_kind():
    """Convolutional and audio models count on 'meta' (no weights, no activations): the same
    FLOPs and parameters as the real model on a real batch."""
    from e2e_dist.config import RunConfig
    from e2e_dist.models.registry import build_model
    from e2e_dist.train.flops import shape_counts
    from tests.train.test_build import SHAPES

    for kind, (model_cfg, data_cfg) in SHAPES.items():
        cfg = RunConfig.model_validate({"name": "f", "storage": {"path": "./runs"}, "model": model_cfg, "data": data_cfg})
        counts = shape_counts(cfg.model, cfg.data, 2)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data)
        with _math_attention():
            real = train_flops_per_batch(model, model.example_batch(2))
        assert (counts.train_flops_per_micro_batch, counts.n_params) == (real, model.num_params()), kind


def test_counting_a_1p3b_model_allocates_nothing():
    """The gpt-1.3b preset's counts come from shapes: no weights, no activations (the old count
    was a real fp32 forward+backward at the micro-batch: tens of GB)."""
    from pathlib import Path

    from e2e_dist.config import load_run_config
    from e2e_dist.train.flops import shape_counts

    def rss_kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    cfg = load_run_config("gpt-1.3b", [])
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = rss_kib("VmRSS")
    counts = shape_counts(cfg.model, cfg.data, cfg.trainer.micro_batch_size)
    grown_mib = (rss_kib("VmHWM") - before) / 1024
    assert 1.2e9 < counts.n_params < 1.5e9
    assert counts.train_flops_per_micro_batch > 6 * counts.n_params * cfg.data.seq_len * cfg.trainer.micro_batch_size
    assert grown_mib < 64, f"counting grew the process by {grown_mib:.0f} MiB"
