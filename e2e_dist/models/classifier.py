"""What every image classifier shares: pixels in, class logits out (`logits`), cross-entropy loss,
accuracy, and a calibrated confidence. ResNet and plug-ins (examples/vit-plugin) subclass it and
write `logits` and their layers; `predict` needs `logits`, `in_channels` and `image_size` too.

Calibration (temperature scaling, Guo et al. 2017): `predict` reports softmax(logits / temperature).
Every evaluation fits the temperature on the validation set, the one minimizing the negative log
likelihood: `eval_sums` adds the NLL at each of TEMPERATURES (sums, so ranks and batches add up as
for the loss), `summarize_eval` picks the best (refined between grid points) and stores it in the
`temperature` buffer, so the final evaluation's fit travels in the checkpoint and the export. It
only rescales the logits: the predicted class, the loss and training are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from e2e_dist.models.base import Batch, E2EModel

TEMPERATURES = tuple(0.25 * 32 ** (i / 40) for i in range(41))
"""The temperatures evaluated (0.25 to 8, 9% apart); the fit interpolates between them."""


def fit_temperature(nll: list[float]) -> float:
    """The temperature minimizing the NLL, given it at each of TEMPERATURES: the grid's best, moved to
    the vertex of the parabola through it and its neighbours (in log temperature)."""
    i = min(range(len(nll)), key=nll.__getitem__)
    log_t = math.log(TEMPERATURES[i])
    if 0 < i < len(nll) - 1:
        curvature = nll[i - 1] - 2 * nll[i] + nll[i + 1]
        if curvature > 0:
            step = math.log(TEMPERATURES[1] / TEMPERATURES[0])
            log_t += step * 0.5 * (nll[i - 1] - nll[i + 1]) / curvature
    return math.exp(log_t)


def temperature_from_sums(sums: dict[str, float], key: str, buffer) -> tuple[float, float] | None:
    """At the end of an evaluation: the temperature minimizing the mean loss summed per grid point
    under `<key><i>` (i over TEMPERATURES), written into `buffer` (it travels in checkpoints and
    exports); (temperature, the loss at the grid's best), or None when nothing was scored."""
    n = max(sums.get("count", 0.0), 1.0)
    losses = [float(sums.get(f"{key}{i}", math.nan)) / n for i in range(len(TEMPERATURES))]
    if sums.get("count", 0.0) <= 0 or not all(math.isfinite(v) for v in losses):
        return None
    t = fit_temperature(losses)
    buffer.fill_(t)
    return t, min(losses)


class ImageClassifier(E2EModel):
    input_kind = "pixels"
    unit_name = "samples"
    in_channels: int
    """Image channels the model takes (1 gray, 3 RGB)."""
    num_classes: int
    image_size: int
    """Side of the square images of `example_batch` (the data's image size)."""

    def __init__(self) -> None:
        super().__init__()
        # Divides the logits for `probabilities` (1: uncalibrated); fitted by `summarize_eval`.
        self.register_buffer("temperature", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints and exports from before calibration have no temperature: they are uncalibrated.
        state_dict.setdefault(prefix + "temperature", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def optional_state(self) -> list[str]:
        """State-dict keys a checkpoint may lack (their defaults fill in): export does not refuse it."""
        return ["temperature"]

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, num_classes) logits."""
        raise NotImplementedError

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, num_classes) calibrated class probabilities."""
        return torch.softmax(self.logits(pixels).float() / self.temperature.float(), dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch["pixels"]).float(), batch["labels"])

    def eval_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        # Sums, not means: the loop adds them over batches and ranks.
        logits = self.logits(batch["pixels"]).float()
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum().to(loss_sum.dtype)
        count = torch.tensor(float(labels.numel()), device=loss_sum.device)
        nll = {f"nll_t{i}": F.cross_entropy(logits.detach() / t, labels, reduction="sum")
               for i, t in enumerate(TEMPERATURES)}
        return {"loss_sum": loss_sum.detach(), "correct": correct, "count": count, **nll}

    def eval_sum_keys(self) -> list[str]:
        return ["loss_sum", "correct", "count", *(f"nll_t{i}" for i in range(len(TEMPERATURES)))]

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        """val_loss, val_acc; and (fitting `temperature` on these sums) val_temperature and
        val_loss_calibrated, the NLL at that temperature."""
        n = max(sums["count"], 1.0)
        metrics = {"val_loss": sums["loss_sum"] / n, "val_acc": sums["correct"] / n}
        fitted = temperature_from_sums(sums, "nll_t", self.temperature)
        if fitted is not None:
            metrics |= {"val_temperature": fitted[0], "val_loss_calibrated": fitted[1]}
        return metrics

    def units_in(self, batch: Batch) -> int:
        return int(batch["pixels"].shape[0])

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> Batch:
        s = self.image_size
        return {"pixels": torch.randn(batch_size, self.in_channels, s, s, device=device),
                "labels": torch.randint(0, self.num_classes, (batch_size,), device=device)}
