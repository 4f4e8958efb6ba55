"""The ResNet-style CNN: shapes, loss, eval sums, FLOPs against a hand count, DeepSpeed fp32/bf16."""

from __future__ import annotations

import math

import pytest
import torch

from e2e_dist.config import load_run_config
from e2e_dist.models.registry import build_model, model_kinds
from e2e_dist.models.resnet import ResNet
from e2e_dist.train.flops import forward_flops, train_flops_per_batch
from tests.models import make_engine


def test_registry_builds_resnet_from_the_preset():
    cfg = load_run_config("tiny-vision", ["model.widths=[8, 16, 32]", "model.blocks_per_stage=2"])
    model = build_model(cfg.model, cfg.data)
    assert "resnet" in model_kinds() and isinstance(model, ResNet) and model.input_kind == "pixels"
    assert len(model.blocks()) == 6
    batch = model.example_batch(3)
    assert batch["pixels"].shape == (3, 1, cfg.data.image_size, cfg.data.image_size)


@pytest.mark.parametrize("stem,size,channels", [("conv3", 8, 1), ("conv3", 17, 3), ("conv7", 32, 3)])
def test_logits_shape_and_initial_loss(stem, size, channels):
    torch.manual_seed(0)
    model = ResNet([8, 16, 32], 1, stem, channels, 7, image_size=size)
    batch = model.example_batch(4)
    assert model.logits(batch["pixels"]).shape == (4, 7)
    # Zero-initialized residual branches and a small head: the first loss is near chance, log(7).
    assert abs(model(batch).item() - math.log(7)) < 0.7


def test_eval_sums_count_correct_predictions():
    torch.manual_seed(0)
    model = ResNet([4, 8], 1, "conv3", 1, 3, image_size=8).eval()
    pixels = torch.randn(5, 1, 8, 8)
    pred = model.predict(pixels)
    labels = pred.clone()
    labels[:2] = (pred[:2] + 1) % 3  # exactly two wrong
    sums = model.eval_sums({"pixels": pixels, "labels": labels})
    assert set(sums) == set(model.eval_sum_keys())
    metrics = model.summarize_eval({k: float(v) for k, v in sums.items()})
    assert metrics["val_acc"] == pytest.approx(3 / 5)
    expected_loss = torch.nn.functional.cross_entropy(model.logits(pixels), labels).item()
    assert metrics["val_loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_flops_match_hand_count():
    B = 2
    model = ResNet([4, 8], 1, "conv3", in_channels=1, num_classes=3, image_size=8)
    batch = model.example_batch(B)
    # A conv costs 2 * Cin * Cout * K * K * Hout * Wout FLOPs per image; BN, ReLU, pooling count 0.
    stem = 2 * 1 * 4 * 3 * 3 * 8 * 8  # 1 -> 4 channels at 8x8
    stage1 = 2 * (2 * 4 * 4 * 3 * 3 * 8 * 8)  # block 4 -> 4: two 3x3 convs at 8x8
    stage2 = (2 * 4 * 8 * 3 * 3 * 4 * 4  # block 4 -> 8: stride-2 3x3 conv to 4x4
              + 2 * 8 * 8 * 3 * 3 * 4 * 4  # second 3x3 conv at 4x4
              + 2 * 4 * 8 * 1 * 1 * 4 * 4)  # 1x1 stride-2 shortcut conv
    head = 2 * 8 * 3
    per_image = stem + stage1 + stage2 + head
    assert per_image == 70192
    assert forward_flops(model, batch) == B * per_image
    # Backward: every conv/linear computes input and weight gradients (2x its forward), except the
    # stem, whose input (the pixels) needs no gradient: only its weight gradient (1x).
    assert train_flops_per_batch(model, batch) == 3 * B * per_image - B * stem


def test_no_inplace_ops_on_parameters_and_bf16_keeps_fp32_statistics():
    torch.manual_seed(0)
    model = ResNet([4, 8], 1, "conv3", 1, 3, image_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(model.example_batch(4)).backward()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # forward/backward leave weights alone
    model = model.bfloat16()
    loss = model(model.example_batch(4))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks_[0].bn1.running_mean.dtype == torch.float32


@pytest.mark.parametrize("stage,precision", [(2, "fp32"), (2, "bf16"), (3, "bf16")])
def test_trains_under_deepspeed_zero(monkeypatch, stage, precision):
    cfg = load_run_config("tiny-vision", [f"deepspeed.zero_stage={stage}", f"trainer.precision={precision}",
                                          "model.widths=[4, 8]", "data.image_size=8", "trainer.lr=0.01"])
    engine, model = make_engine(cfg, monkeypatch)
    batch = model.example_batch(8, "cpu")
    losses = []
    for _ in range(6):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]  # fits a fixed batch
    engine.eval()
    with torch.no_grad():
        metrics = model.summarize_eval({k: float(v) for k, v in model.eval_sums(batch).items()})
    assert 0.0 <= metrics["val_acc"] <= 1.0 and math.isfinite(metrics["val_loss"])


def test_input_norm_makes_brightness_contrast_and_polarity_irrelevant():
    """standardize: an image and a brighter, lower-contrast copy give the same logits; with
    -polarity also its negative (dark ink on light paper = light ink on dark), as long as the
    background is most of the image."""
    torch.manual_seed(0)
    glyph = torch.zeros(2, 1, 12, 12)
    glyph[:, :, 3:9, 5:7] = 1.0  # a bar on a dark background (the background is the median)
    glyph[1, :, 3:5, 3:9] = 1.0
    shifted = 0.3 + 0.4 * glyph
    for norm, same in [("none", False), ("standardize", True), ("standardize-polarity", True)]:
        model = ResNet([4, 8], 1, "conv3", 1, 3, image_size=12, input_norm=norm).eval()
        with torch.no_grad():
            base, brighter, negative = model.logits(glyph), model.logits(shifted), model.logits(-glyph)
        assert torch.allclose(base, brighter, atol=3e-3) == same, norm  # 3e-3: the deviation's epsilon
        assert torch.allclose(base, negative, atol=3e-3) == (norm == "standardize-polarity"), norm
    with pytest.raises(ValueError, match="unknown input_norm 'x'"):
        ResNet([4], 1, "conv3", 1, 3, input_norm="x")
