"""What every end-to-end model offers the training loop, whatever its modality.

The loop never looks inside a batch: it hands the batch dict to the model and gets a loss back
(`forward`), per-batch evaluation sums (`eval_sums`, reduced across ranks by the loop), and turns
reduced sums into named metrics (`summarize_eval`).
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class E2EModel(nn.Module, abc.ABC):
    input_kind: ClassVar[str]
    """What goes in: 'bytes', 'pixels' or 'waveform'."""
    unit_name: ClassVar[str] = "samples"
    """What the loop counts for throughput: 'tokens' for text, 'samples' otherwise."""

    @abc.abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Training loss (scalar) of one micro-batch."""

    @abc.abstractmethod
    def eval_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Additive sums over one validation batch (e.g. loss_sum, count, correct)."""

    def eval_sum_keys(self) -> list[str]:
        """Keys `eval_sums` returns (a rank with no val batch contributes zeros under them)."""
        return ["loss_sum", "count"]

    @abc.abstractmethod
    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn rank-reduced sums into metrics (val_loss, val_bpb, val_acc, val_cer, ...)."""

    @abc.abstractmethod
    def units_in(self, batch: Batch) -> int:
        """Tokens (text) or samples in a batch, for throughput and data-seen counts."""

    @abc.abstractmethod
    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> Batch:
        """A batch of the right shapes, for FLOP counting."""

    checkpoint_activations: bool = False
    """Recompute each block's activations in backward instead of keeping them (trainer.activation_checkpointing)."""

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (transformer blocks, residual stages): what `run_block` checkpoints."""
        return []

    def run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """`block(*args)`, through torch's activation checkpointing when it is on.

        Why not torch's `apply_activation_checkpointing`: its wrapper renames every parameter
        (`blocks_.0._checkpoint_wrapped_module.…`), and DeepSpeed records those names in its
        checkpoints, so exports and resumes would depend on the speed option."""
        if self.checkpoint_activations and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(_numel(p) for p in self.parameters())
        if non_embedding:
            n -= sum(_numel(p) for p in self.embedding_parameters())
        return n

    def train_flops(self, batch_size: int) -> int:
        """FLOPs of one training forward + backward of a micro-batch of `batch_size` examples.

        Default: PyTorch's FlopCounterMode over `example_batch` on the device the parameters live
        on. The trainer and the plan call it on a model built on 'meta' (flops.shape_counts), where
        every op is shape arithmetic: nothing is computed or allocated, whatever the model's size.
        A model whose count should not depend on which kernels run overrides it with a formula."""
        from e2e_dist.train.flops import train_flops_per_batch

        device = next(self.parameters()).device
        return train_flops_per_batch(self, self.example_batch(batch_size, device))

    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialize `module`'s own parameters (`recurse=False`) where the constructors' defaults
        are not wanted; `name` is its name in `named_modules()`. Default: keep them.

        Why here and not in `__init__` after the children exist: under ZeRO-3 the model is built
        inside `deepspeed.zero.Init`, which partitions each submodule's parameters the moment its
        constructor returns; a parent that then re-initializes a child's weight would write into an
        empty shard. `init_weights` calls this per module, with that module's parameters gathered."""

    def init_weights(self, gathered: Callable[[list[nn.Parameter]], contextlib.AbstractContextManager] | None = None
                     ) -> None:
        """Run `init_module` over every module that owns parameters, in `named_modules()` order
        (so the random draws come in the same order on every path). Models call it at the end of
        `__init__`; parameters ZeRO-3 has already partitioned are skipped there, and the builder
        calls it again with `gathered` (DeepSpeed's GatheredParameters: one module's weights whole
        at a time, rank 0's values kept)."""
        for name, module in self.named_modules():
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if gathered is None and any(hasattr(p, "ds_id") for p in own):
                continue  # a zero.Init shard: initialized by the builder, gathered
            with gathered(own) if gathered is not None else contextlib.nullcontext():
                self.init_module(name, module)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters excluded from N in scaling laws (lookup tables: token/position embeddings)."""
        return []


def _numel(p: nn.Parameter) -> int:
    """Elements of a parameter, whole: ZeRO-3 leaves an empty local tensor and keeps the count in `ds_numel`."""
    return getattr(p, "ds_numel", p.numel())


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
