"""A ResNet-style CNN: raw pixels in, class logits out, trained with cross-entropy.

stem (conv3: one 3x3 conv; conv7: 7x7 stride-2 conv + 3x3 max-pool) -> stages of basic residual
blocks (two 3x3 convs; the first block of every stage after the first halves the resolution and a
1x1 conv matches the shortcut) -> global average pool -> linear head.

Batch: {"pixels": float (B, C, H, W) already normalized by the data pipeline, "labels": long (B,)}.
No in-place ops anywhere (DeepSpeed's hooks and activation checkpointing both see every tensor);
inputs are cast to the parameters' dtype so the same module runs under fp32 and bf16 engines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from e2e_dist.models.classifier import ImageClassifier
from e2e_dist.models.registry import register_model


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in fp32 whatever dtype the engine runs in.

    Under a bf16 DeepSpeed engine the weights are bf16 while the running statistics stay fp32,
    and CPU kernels refuse that mix; bf16 running statistics would also lose the small momentum
    updates. So normalize in fp32 and hand back the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.running_mean is not None and self.running_mean.dtype != torch.float32:
            # Someone cast the buffers (module.to(bf16)): swap them for fp32 copies once.
            self.running_mean, self.running_var = self.running_mean.float(), self.running_var.float()
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # a buffer, not a parameter: DeepSpeed never shards it
        y = F.batch_norm(x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
                         training=self.training or self.running_mean is None, momentum=self.momentum, eps=self.eps)
        return y.to(x.dtype)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al., 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c_out)  # its scale starts at zero: ResNet.init_module
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


INPUT_NORMS = ("none", "standardize", "standardize-polarity", "flatten-polarity", "flatten-polarity-stacked")
"""none: pixels as the data pipeline normalized them. standardize: each image to zero mean and unit
deviation (brightness and contrast no longer vary). standardize-polarity: and flipped so its
background is dark (dark ink on light paper and light ink on dark look the same). flatten-polarity:
the log intensity minus its background (`flatten`: uneven light, shadows and gradients, gone),
standardized, ink bright. flatten-polarity-stacked: that and the standardized image (same polarity) as two
channels per input channel, for the network to weigh (the flattened one loses the inside of blobs
wider than the filter: tiny, blurred digits)."""
LOG_FLOOR = 0.05
"""Added to intensities (0..1) before the log: black paper's noise is not blown up to ink contrast."""
BACKGROUND_WINDOW = 11 / 24
"""Side of the median filter that estimates the background, as a share of the image side: wider
than a digit's strokes (a median of mostly paper is paper), narrower than a shadow. At 24 px: 11."""


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-channel k x k median of (B, C, H, W), edges replicated. Unlike a blur, a median keeps a
    shadow's hard edge where it is and ignores thin ink, so it estimates the paper under the ink."""
    b, c, h, w = x.shape
    p = k // 2
    windows = F.unfold(F.pad(x.reshape(b * c, 1, h, w), (p, p, p, p), mode="replicate"), k)
    return windows.median(dim=1).values.view(b, c, h, w)


def flatten(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, ink sign) from pipeline-normalized pixels: each image's log intensity minus its
    median-filtered background, standardized, and +1 or -1 per image such that `image * sign` has
    bright ink. Light multiplies paper and ink alike, so in log intensity a shadow or a gradient is
    an added term the background carries, and the ink keeps its contrast in the shadow (subtracting
    in plain intensity leaves shadowed ink 40% fainter). The sign comes from the residual, where
    paper is ~0 and ink on one side: the image-wide median rule (standardize-polarity) takes the
    shadow for the background when the shadow covers half the picture."""
    from e2e_dist.data.images import PIXEL_MEAN, PIXEL_STD

    light = torch.log((pixels * PIXEL_STD + PIXEL_MEAN).clamp(0.0, 1.0) + LOG_FLOOR)
    k = max(3, round(pixels.shape[-1] * BACKGROUND_WINDOW) // 2 * 2 + 1)
    residual = light - median_filter(light, k)
    sign = torch.where(residual.mean(dim=(1, 2, 3), keepdim=True) < 0, -1.0, 1.0)
    return _standardize(residual * sign), sign


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-3)


class ResNet(ImageClassifier):
    def __init__(self, widths: list[int], blocks_per_stage: int = 1, stem: str = "conv3", in_channels: int = 1,
                 num_classes: int = 10, image_size: int = 32, input_norm: str = "none"):
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r} ({', '.join(INPUT_NORMS)})")
        self.in_channels, self.num_classes, self.input_norm = in_channels, num_classes, input_norm
        self.image_size = image_size  # example batches (FLOP counting) use the data's image size
        w0 = widths[0]
        c0 = in_channels * (2 if input_norm == "flatten-polarity-stacked" else 1)
        if stem == "conv7":
            self.stem = nn.Sequential(nn.Conv2d(c0, w0, 7, stride=2, padding=3, bias=False),
                                      BatchNorm2d(w0), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        elif stem == "conv3":
            self.stem = nn.Sequential(nn.Conv2d(c0, w0, 3, stride=1, padding=1, bias=False),
                                      BatchNorm2d(w0), nn.ReLU())
        else:
            raise ValueError(f"unknown stem {stem!r} (conv3, conv7)")
        blocks, c_in = [], w0
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(c_in, w, stride=2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.blocks_ = nn.ModuleList(blocks)
        self.head = nn.Linear(c_in, num_classes)
        self.init_weights()

    def init_module(self, name: str, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif name.endswith(".bn2"):
            # Zero-init each block's last BN scale: every block starts as (ReLU of) its shortcut,
            # which lets deep stacks train from step one at a high learning rate (Goyal et al., 2017).
            nn.init.zeros_(module.weight)

    def normalize_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Per-image input normalization (see INPUT_NORMS), in fp32; part of the model, so an exported
        model applies it in `predict` too."""
        if self.input_norm == "none":
            return pixels
        x = _standardize(pixels.float())
        if self.input_norm.startswith("flatten-polarity"):
            flat, sign = flatten(pixels.float())
            return torch.cat([x * sign, flat], dim=1) if self.input_norm.endswith("-stacked") else flat
        if self.input_norm == "standardize-polarity":
            # The median pixel is the background wherever the glyph covers less than half the image.
            background = x.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
            x = torch.where(background > 0, -x, x)
        return x

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalized pixels -> (B, num_classes) logits."""
        x = self.normalize_input(pixels).to(self.head.weight.dtype)
        x = self.stem(x)
        for block in self.blocks_:
            x = self.run_block(block, x)
        return self.head(x.mean(dim=(2, 3)))

    def blocks(self) -> list[nn.Module]:
        return list(self.blocks_)

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class index per image (B,)."""
        return self.logits(pixels).argmax(dim=-1)


@register_model("resnet")
def build_resnet(cfg, data_cfg=None) -> ResNet:
    return ResNet(list(cfg.widths), cfg.blocks_per_stage, cfg.stem, cfg.in_channels, cfg.num_classes,
                  image_size=data_cfg.image_size if data_cfg is not None else 32, input_norm=cfg.input_norm)
