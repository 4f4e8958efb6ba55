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


def _ring(side: int = 24) -> torch.Tensor:
    """A '0'-like ring, 1 on 0, (1, 1, side, side)."""
    yy, xx = torch.meshgrid(torch.arange(side) - side / 2 + 0.5, torch.arange(side) - side / 2 + 0.5, indexing="ij")
    r = (yy ** 2 / 1.6 + xx ** 2).sqrt()
    return ((r > side * 0.2) & (r < side * 0.3)).float()[None, None]


@pytest.mark.parametrize("dark_ink", [True, False])
def test_flatten_takes_shadows_and_gradients_out_and_finds_the_ink(dark_ink):
    """flatten: a digit under a hard shadow over 60% of the picture (40% darker) or a 40% gradient
    comes out close to the evenly lit one, bright ink either way, where the standardized image
    (standardize-polarity's) differs 2-9x more; and its median rule takes that shadow for the paper."""
    from e2e_dist.models.resnet import _standardize, flatten

    ring = _ring()
    ink, paper = (0.1, 0.9) if dark_ink else (0.9, 0.15)
    even = paper + (ink - paper) * ring  # intensities 0..1; the pipeline hands the model 2x - 1
    xx = torch.arange(24).float().expand(1, 1, 24, 24)
    lights = {"shadow": torch.where(xx >= 10, 0.6, 1.0), "gradient": 1 - 0.4 * xx / 23}
    flat_even, sign = flatten(even * 2 - 1)
    assert float(sign) == (-1.0 if dark_ink else 1.0)
    assert float((flat_even * ring).sum() / ring.sum()) > 1.0  # the ink is bright
    for name, light in lights.items():
        flat_lit, sign_lit = flatten(even * light * 2 - 1)
        assert float(sign_lit) == float(sign), name
        gap_flat = float((flat_lit - flat_even).abs().mean())
        gap_plain = float((_standardize(even * light) - _standardize(even)).abs().mean())
        assert gap_flat < gap_plain / 2 and gap_flat < 0.15, (name, gap_flat, gap_plain)  # seen: 0.03-0.12, 0.1-0.55
    if dark_ink:  # the shadowed paper is most of the picture: the median rule calls it the background
        shadowed = _standardize(even * lights["shadow"])
        assert float(shadowed.flatten().median()) < 0


def test_flatten_norms_build_and_the_stacked_one_feeds_both_views():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 24, 24)
    for norm, channels in [("flatten-polarity", 1), ("flatten-polarity-stacked", 2)]:
        model = ResNet([4, 8], 1, "conv3", 1, 3, image_size=24, input_norm=norm).eval()
        assert model.normalize_input(x).shape == (3, channels, 24, 24)
        assert model.logits(x).shape == (3, 3) and model.stem[0].in_channels == channels


def test_temperature_is_fitted_on_eval_sums_and_used_for_probabilities():
    """Overconfident logits (3x those the labels were drawn from): the fitted temperature is ~3, it
    lowers the NLL, `probabilities` divides by it, the argmax stays; a state dict without it (a
    checkpoint from before calibration) loads as uncalibrated."""
    from e2e_dist.models.classifier import fit_temperature

    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, 5, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true, -1), 1, generator=g)[:, 0]
    model = ResNet([4], 1, "conv3", 1, 5, image_size=8).eval()
    model.logits = lambda pixels: 3 * true  # the network is not what is tested
    assert float(model.temperature) == 1.0
    sums = {k: float(v) for k, v in model.eval_sums({"pixels": torch.zeros(1), "labels": labels}).items()}
    metrics = model.summarize_eval(sums)
    assert metrics["val_temperature"] == pytest.approx(3.0, rel=0.1)
    assert float(model.temperature) == pytest.approx(metrics["val_temperature"])
    assert metrics["val_loss_calibrated"] < metrics["val_loss"] - 0.1
    probs = model.probabilities(torch.zeros(1))
    assert torch.allclose(probs, torch.softmax(3 * true / model.temperature, -1))
    assert torch.equal(probs.argmax(-1), true.argmax(-1))
    # between grid points: the parabola's vertex (the grid is 0.25 * 32 ** (i / 40))
    assert fit_temperature([(i - 20.3) ** 2 for i in range(41)]) == pytest.approx(0.25 * 32 ** (20.3 / 40), rel=1e-6)
    state = {k: v for k, v in model.state_dict().items() if k != "temperature"}
    fresh = ResNet([4], 1, "conv3", 1, 5, image_size=8)
    fresh.temperature.fill_(2.0)
    fresh.load_state_dict(state)  # strict
    assert float(fresh.temperature) == 1.0
