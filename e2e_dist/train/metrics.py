"""Step metrics without a host sync per step.

Losses accumulate as device tensors; they are summed across ranks and moved to the host only once
per logging interval (`MetricWindow.flush`), so the GPU never waits for Python mid-interval.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from e2e_dist.train.flops import mfu


def all_reduce_sum(values: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, float]:
    """Sum named scalars across ranks in one collective; returns host floats."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def read_counters(counters: dict[str, int], device: torch.device) -> dict[str, float]:
    """What the ranks' train streams read since they started: samples and storage bytes, summed over
    ranks and the largest rank's (a rank reading far more than 1/W of the data shows here)."""
    t = torch.tensor([float(counters["samples"]), float(counters["bytes"])], dtype=torch.float64, device=device)
    total, most = t.clone(), t.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return {"data/samples_read": total[0].item(), "data/samples_read_max_rank": most[0].item(),
            "data/bytes_read": total[1].item(), "data/bytes_read_max_rank": most[1].item()}


class MetricWindow:
    """Accumulates one logging interval: loss sum, micro-batches, units (tokens/samples), wall time."""

    def __init__(self, device: torch.device, flops_per_step: float, peak_flops: float | None, world_size: int):
        self.device = device
        self.flops_per_step = flops_per_step  # per rank per optimizer step
        self.peak = peak_flops
        self.world_size = world_size
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        self.micro_batches = 0
        self.units = 0
        self.steps = 0
        self.t0 = time.perf_counter()

    def add_micro(self, loss: torch.Tensor, units: int) -> None:
        self.loss_sum += loss.detach().float()
        self.micro_batches += 1
        self.units += units

    def end_step(self) -> None:
        self.steps += 1

    def flush(self, unit_name: str, *, preempt_requested: bool = False,
              stop_requested: bool = False) -> tuple[dict[str, float], bool, bool]:
        """Reduce across ranks and return (interval metrics, whether any rank asked to preempt,
        whether any rank was told its sweep trial is stopped).

        Every rank gets the same numbers; the flags ride in the same collective, so checking them
        costs nothing extra."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.t0
        red = all_reduce_sum({"loss": self.loss_sum, "n": float(self.micro_batches), "units": float(self.units),
                              "preempt": float(preempt_requested), "stop": float(stop_requested)}, self.device)
        steps = max(self.steps, 1)
        step_time = elapsed / steps
        achieved = self.flops_per_step / step_time if step_time > 0 else 0.0  # per device
        out = {
            "loss": red["loss"] / max(red["n"], 1.0),
            f"{unit_name}_per_s": red["units"] / elapsed if elapsed > 0 else 0.0,
            "step_time_s": step_time,
            "achieved_tflops_per_device": achieved / 1e12,
        }
        if self.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        m = mfu(self.flops_per_step, step_time, self.peak)
        if m is not None:
            out["mfu"] = m
        self._reset()
        return out, red["preempt"] > 0, red["stop"] > 0
