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
