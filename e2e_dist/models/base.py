"""What every end-to-end model offers the training loop, whatever its modality.

The loop never looks inside a batch: it hands the batch dict to the model and gets a loss back
(`forward`), per-batch evaluation sums (`eval_sums`, reduced across ranks by the loop), and turns
reduced sums into named metrics (`summarize_eval`).
"""

from __future__ import annotations

import abc
import math
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
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embedding_parameters())
        return n

    def embedding_parameters(self) -> list[nn.Parameter]:
        """Parameters excluded from N in scaling laws (lookup tables: token/position embeddings)."""
        return []


def nats_to_bits(x: float) -> float:
    return x / math.log(2)
