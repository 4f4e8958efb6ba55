"""`model.kind: vit`: a small Vision Transformer, pixels in, class logits out (Dosovitskiy et al., 2021).

patches (a strided conv: each patch x patch square -> d_model) + learned position embeddings
(and a class token with pool: cls) -> `depth` pre-norm transformer blocks -> final LayerNorm ->
class token or mean of the patch tokens -> linear head.

Batch (what e2e-dist's image pipelines collate): {"pixels": float (B, C, S, S) normalized to
[-1, 1], "labels": long (B,)}; S is `data.image_size`, which `options.patch` must divide.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import nn

from e2e_dist import plugins
from e2e_dist.errors import ConfigError
from e2e_dist.models.classifier import ImageClassifier


class ViTOptions(BaseModel):
    """`model.options` of a `vit` run (validated when the config loads, before Ray starts)."""

    model_config = {"extra": "forbid"}  # a misspelt option is an error, not silently ignored

    patch: int = Field(4, ge=1)
    """Side of the square patches; must divide data.image_size."""
    d_model: int = Field(64, ge=8)
    """Token width."""
    depth: int = Field(2, ge=1)
    """Transformer blocks."""
    heads: int = Field(2, ge=1)
    """Attention heads; must divide d_model."""
    mlp_ratio: int = Field(2, ge=1)
    """Hidden width of each block's MLP, in multiples of d_model."""
    pool: Literal["cls", "mean"] = "cls"
    """What the head reads: a class token, or the mean of the patch tokens."""
    in_channels: Literal[1, 3] = 1
    """1: grayscale, 3: RGB (the data pipeline decodes images to this)."""
    num_classes: int = Field(10, ge=2)
    """Outputs of the head (labels 0 .. num_classes-1)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ViTOptions:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        return self


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)): pre-norm keeps small, shallow stacks stable."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # every token sees every token: no mask
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Tokens(nn.Module):
    """Pixels -> patch tokens (+ class token) + position embeddings.

    Why a module of its own, not parameters of ViT itself: the loop calls `eval_sums` directly, not
    through `forward`, and ZeRO-3 gathers a module's parameters only when that module is called, so
    a parameter of the top module would be an empty shard there (once it is larger than
    stage3_param_persistence_threshold, 1e5 elements in e2e-dist's DeepSpeed config)."""

    def __init__(self, in_channels: int, d_model: int, patch: int, image_size: int, cls_token: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, d_model, patch, stride=patch)
        tokens = (image_size // patch) ** 2 + cls_token
        self.pos = nn.Parameter(torch.zeros(1, tokens, d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if cls_token else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos


class ViT(ImageClassifier):
    """Loss, accuracy sums and example batches come from ImageClassifier (input_kind "pixels": `e2e-dist
    predict` decodes an image file and calls `logits`); this class is the network."""

    def __init__(self, opts: ViTOptions, image_size: int):
        super().__init__()
        if image_size % opts.patch:
            raise ConfigError(f"model.options.patch: {opts.patch} does not divide data.image_size {image_size}")
        self.in_channels, self.num_classes, self.image_size, self.pool = (opts.in_channels, opts.num_classes,
                                                                          image_size, opts.pool)
        self.embed = Tokens(opts.in_channels, opts.d_model, opts.patch, image_size, cls_token=opts.pool == "cls")
        self.blocks_ = nn.ModuleList(Block(opts.d_model, opts.heads, opts.mlp_ratio) for _ in range(opts.depth))
        self.norm = nn.LayerNorm(opts.d_model)
        self.head = nn.Linear(opts.d_model, opts.num_classes)
        self.init_weights()

    def init_module(self, name: str, module: nn.Module) -> None:
        # Only `module`'s own parameters: under ZeRO-3 each child is partitioned when built.
        if name == "embed":  # the position and class embeddings (its conv keeps PyTorch's init)
            nn.init.trunc_normal_(module.pos, std=0.02)
            if module.cls is not None:
                nn.init.trunc_normal_(module.cls, std=0.02)
        elif name == "head":
            # A zero head: every class starts equally likely (loss ln(num_classes) at step 0).
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) normalized pixels -> (B, num_classes) logits."""
        # In the parameters' dtype: the same module runs under fp32 and bf16 engines.
        x = self.embed(pixels.to(self.head.weight.dtype))
        for block in self.blocks_:
            x = self.run_block(block, x)  # through run_block: trainer.activation_checkpointing works
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))

    def blocks(self) -> list[nn.Module]:
        return list(self.blocks_)

    def embedding_parameters(self) -> list[nn.Parameter]:
        # Position (and class) embeddings are lookup tables: scaling laws count N without them.
        return [p for p in (self.embed.pos, self.embed.cls) if p is not None]


@plugins.options(ViTOptions)
def build_vit(model_cfg, data_cfg=None) -> ViT:
    """The `vit` builder: e2e-dist calls it on every Train worker (under zero.Init at ZeRO-3) and on
    the `meta` device for FLOP counts and export checks."""
    opts = model_cfg.options
    if not isinstance(opts, ViTOptions):  # a config built by hand, not loaded: validate here
        opts = ViTOptions.model_validate(opts or {})
    return ViT(opts, image_size=data_cfg.image_size if data_cfg is not None else 32)
