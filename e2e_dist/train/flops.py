"""FLOPs from the real model, and MFU against the accelerator's peak.

FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` on a forward+backward pass
of an example batch, so the same code serves transformers, CNNs and audio front ends alike (no
architecture-specific formula to keep in sync with the model).
"""

from __future__ import annotations

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


def train_flops_per_batch(model: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward + backward of `batch` through `model` (as counted by PyTorch)."""
    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(batch)
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
