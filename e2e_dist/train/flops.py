"""FLOPs from the model's shapes, and MFU against the accelerator's peak.

Each model kind counts its own training FLOPs (`E2EModel.train_flops`): the transformer by formula
(6N + attention), others by `torch.utils.flop_counter.FlopCounterMode` over a forward+backward on
a model built on the 'meta' device - shape arithmetic only. Nothing is run on real weights: a
1.3B model's count costs no memory and no time on the rank that trains it (it used to be a real
fp32 forward+backward at the micro-batch, with activation checkpointing off: tens of GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks (FLOP/s) per device, without sparsity. Matched by substring of
# torch.cuda.get_device_name(); the first hit wins, so more specific names come first.
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),  # AWS g5
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),  # fp16
    ("T4", 65e12),  # fp16
]


def _register_cpu_attention() -> None:
    """PyTorch counts the CUDA attention kernels but not the CPU flash kernel; count it the same way.

    Without this, attention FLOPs silently vanish from CPU counts (and from CPU-vs-GPU comparisons).
    """
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:
        def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

        flop_counter.register_flop_formula(fwd)(cpu_sdpa)
    if bwd is not None and bwd not in flop_counter.flop_registry:
        def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

        flop_counter.register_flop_formula(bwd)(cpu_sdpa_backward)


_register_cpu_attention()


def _fix_grouped_conv_backward() -> None:
    """PyTorch's convolution_backward formula ignores `groups` in the weight-gradient term, so a
    depthwise conv's backward is overcounted `groups`-fold (inflating CNN/audio MFU). Count the
    input-gradient and weight-gradient parts separately and divide the latter by `groups`."""
    aten = torch.ops.aten
    stock = flop_counter.flop_registry[aten.convolution_backward]
    if getattr(stock, "_e2e_grouped_fix", False):
        return

    def fixed(grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups, output_mask,
              *args, out_val=None, **kwargs):
        common = (grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
        grad_input = stock(*common, [output_mask[0], False], *args, out_val=out_val, **kwargs)
        grad_weight = stock(*common, [False, output_mask[1]], *args, out_val=out_val, **kwargs)
        return grad_input + grad_weight // groups

    fixed._e2e_grouped_fix = True
    flop_counter.flop_registry[aten.convolution_backward] = fixed


_fix_grouped_conv_backward()


@dataclass(frozen=True, kw_only=True)
class ShapeCounts:
    n_params: int
    n_params_non_embedding: int
    train_flops_per_micro_batch: int


def shape_counts(model_cfg: Any, data_cfg: Any, micro_batch_size: int) -> ShapeCounts:
    """Parameter counts and training FLOPs of one micro-batch, from a model built on 'meta'."""
    from e2e_dist.models.registry import build_model

    with torch.device("meta"):
        model = build_model(model_cfg, data_cfg)
    return ShapeCounts(n_params=model.num_params(), n_params_non_embedding=model.num_params(non_embedding=True),
                       train_flops_per_micro_batch=int(model.train_flops(micro_batch_size)))


def train_flops_per_batch(model: torch.nn.Module, batch: dict, loss_of=None) -> int:
    """FLOPs of one forward + backward of `batch` through `model` (as counted by PyTorch);
    `loss_of(model, batch)` stands in for `model(batch)` where the loss has no 'meta' kernel."""
    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = loss_of(model, batch) if loss_of is not None else model(batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops())


def forward_flops(model: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward of `batch` (inference cost)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(batch)
    return int(counter.get_total_flops())


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a known GPU, or None (CPU, unknown card): report achieved FLOP/s only."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the card called `name` (substring match, any case), or None."""
    return next((peak for key, peak in PEAK_FLOPS_BF16 if key.lower() in name.lower()), None)


def mfu(flops_per_step: float, step_time_s: float, peak: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilization: achieved / (peak x devices); None where the peak is unknown."""
    if not peak or step_time_s <= 0:
        return None
    return flops_per_step / step_time_s / (peak * num_devices)
