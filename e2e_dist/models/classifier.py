"""What every image classifier shares: pixels in, class logits out (`logits`), cross-entropy loss,
accuracy. ResNet and plug-ins (examples/vit-plugin) subclass it and write `logits` and their
layers; `predict` needs `logits`, `in_channels` and `image_size` too."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from e2e_dist.models.base import Batch, E2EModel


class ImageClassifier(E2EModel):
    input_kind = "pixels"
    unit_name = "samples"
    in_channels: int
    """Image channels the model takes (1 gray, 3 RGB)."""
    num_classes: int
    image_size: int
    """Side of the square images of `example_batch` (the data's image size)."""

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, num_classes) logits."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch["pixels"]).float(), batch["labels"])

    def eval_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        # Sums, not means: the loop adds them over batches and ranks.
        logits = self.logits(batch["pixels"]).float()
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum().to(loss_sum.dtype)
        count = torch.tensor(float(labels.numel()), device=loss_sum.device)
        return {"loss_sum": loss_sum.detach(), "correct": correct, "count": count}

    def eval_sum_keys(self) -> list[str]:
        return ["loss_sum", "correct", "count"]

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {"val_loss": sums["loss_sum"] / n, "val_acc": sums["correct"] / n}

    def units_in(self, batch: Batch) -> int:
        return int(batch["pixels"].shape[0])

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> Batch:
        s = self.image_size
        return {"pixels": torch.randn(batch_size, self.in_channels, s, s, device=device),
                "labels": torch.randint(0, self.num_classes, (batch_size,), device=device)}
