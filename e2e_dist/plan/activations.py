"""Activation memory of one micro-batch: what autograd keeps from forward for backward.

Two ways to know it, and a test that holds them together (tests/plan/test_plan_vs_reality.py):
- `measure_saved_bytes` runs a real forward and adds up the tensors autograd saves (parameters
  excluded, views of one storage counted once). Cheap for convolutional and audio models at batch 1,
  so their plans measure and scale linearly in the micro-batch.
- `gpt_activation_bytes` is the byte GPT's count from its shapes (in the manner of Korthikanti et
  al. 2022, for this model's code: SDPA/flash attention keeps no T x T matrix). A 1.3B model cannot
  run a forward on a planning laptop, so the plan for GPT presets uses the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_UNITS = 16
"""Saved (batch x seq x width) tensors per GPT block, in the activation dtype: the block input, ln1 out,
qkv (3), the attention output re-laid-out for proj, the second residual (ln2 in), ln2 out, MLP hidden
before and after GELU (4 + 4), and one more the attention kernel keeps (its output). Checked against
autograd's saved tensors by tests/plan/test_plan_vs_reality.py."""


@dataclass(frozen=True, kw_only=True)
class Activations:
    """Bytes of one micro-batch's activations on one GPU."""

    stored: int
    """Kept from forward until backward (peak at the end of forward)."""
    working: int
    """Extra bytes alive at once in backward: gradients flowing through a block (about half its
    saved bytes, fitted to the peak RSS of CPU runs in tests/plan/test_plan_vs_reality.py), the
    loss's gradient over the logits, and under activation checkpointing the block being recomputed."""

    @property
    def peak(self) -> int:
        return self.stored + self.working


def gpt_activation_bytes(*, n_layer: int, d_model: int, n_head: int, vocab: int, batch: int, seq: int,
                         act_bytes: int, checkpointing: bool) -> Activations:
    """The byte GPT's activations (models/gpt.py) for `batch` windows of `seq` bytes.

    act_bytes: 2 under bf16/fp16 autocast-free mixed precision (DeepSpeed runs the module in 16 bit),
    4 in fp32. Statistics (LayerNorm mean/rstd, attention log-sum-exp) and the loss are fp32."""
    bs, h = batch * seq, d_model
    per_block = BLOCK_UNITS * bs * h * act_bytes + 2 * 2 * bs * 4 + batch * n_head * seq * 4
    block_input = bs * h * act_bytes
    # Outside the blocks: token ids for the two embeddings and the loss (int64), ln_f in/out + stats,
    # the fp32 log-softmax over the vocabulary the loss keeps.
    outside = 2 * bs * 8 + 2 * bs * h * act_bytes + 2 * bs * 4 + bs * vocab * 4
    working = bs * vocab * (4 + act_bytes) + per_block // 2
    if checkpointing:
        return Activations(stored=outside + n_layer * block_input, working=working + per_block)
    return Activations(stored=outside + n_layer * per_block, working=working)


@dataclass(frozen=True, kw_only=True)
class SavedBytes:
    """What one forward left for backward, by where it was saved."""

    total: int
    per_block: tuple[int, ...]
    """Saved inside each of the model's `blocks()` (what checkpointing drops and recomputes)."""
    block_inputs: int
    """Bytes of the blocks' inputs (what checkpointing keeps instead)."""


def measure_saved_bytes(model: torch.nn.Module, batch: dict) -> SavedBytes:
    """The distinct storages autograd saves during one forward of `batch` (parameters excluded,
    views of one storage counted once), attributed to the block that saved them first."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    blocks = model.blocks() if hasattr(model, "blocks") else []
    inside = [0] * len(blocks)
    current: list[int] = []
    inputs = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = storage.nbytes()
            if current:
                inside[current[-1]] += storage.nbytes()
        return t

    def enter(i):
        def hook(module, args):
            nonlocal inputs
            inputs += sum(a.untyped_storage().nbytes() for a in args if isinstance(a, torch.Tensor))
            current.append(i)
        return hook

    def leave(module, args, out):
        current.pop()

    handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(enter(i)),
                                                          b.register_forward_hook(leave))]
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(batch)
        del loss
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return SavedBytes(total=sum(saved.values()), per_block=tuple(inside), block_inputs=inputs)


def measured_activation_bytes(model, *, batch: int, dtype: torch.dtype, checkpointing: bool) -> Activations:
    """A model's activations measured on CPU in `dtype` at `batch` (the plan measures at 1 and
    scales: these models' activations are linear in the batch). Checkpointing keeps each block's
    input instead of what the block saved, and recomputes one block at a time in backward."""
    model = model.to(dtype)
    m = measure_saved_bytes(model, _cast(model.example_batch(batch), dtype))
    largest = max(m.per_block, default=0)
    if checkpointing and m.per_block:
        return Activations(stored=m.total - sum(m.per_block) + m.block_inputs, working=largest + largest // 2)
    return Activations(stored=m.total, working=largest // 2)


def _cast(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
