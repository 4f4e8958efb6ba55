"""Micro-batches for the training loop: a Ray Data shard, epoch after epoch, with a resumable position."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn


class ModalityCollate(NumpyBatchCollateFn):
    """Our modality's numpy -> tensor collate in the form Ray Data's `iter_torch_batches` takes.

    Ray runs it (and the pinning and host-to-device copy after it) in its prefetch threads, so the
    next batch is ready on the device while the current step computes."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch):
        return self.fn(batch)


class BatchStream:
    """Endless micro-batches from a Ray Data shard, epoch after epoch, with a resumable position.

    The position is (epoch, batches consumed in that epoch). Each epoch draws rows at random from
    a buffer of `shuffle_rows` rows, seeded by (seed, epoch): every epoch has its own order, and
    that order is the same on every run. Resuming replays the epoch's order and skips the consumed
    batches, so a restart sees the same data it would have seen without the crash (up to Ray
    Data's shard assignment between workers). Batches are prefetched `prefetch` deep; on a GPU
    they arrive pinned and already copied to the device.
    """

    def __init__(self, shard, batch_size: int, collate, device: torch.device, epoch: int = 0, consumed: int = 0,
                 prefetch: int = 2, shuffle_rows: int = 0, seed: int = 0):
        self.shard, self.batch_size, self.device, self.prefetch = shard, batch_size, device, prefetch
        self.shuffle_rows, self.seed = shuffle_rows, seed
        self.collate = ModalityCollate(collate)
        self.epoch, self.consumed = epoch, consumed
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        shuffle = {}
        if self.shuffle_rows:
            # Ray wants the buffer at least one batch; the seed mixes run seed and epoch.
            shuffle = {"local_shuffle_buffer_size": max(self.shuffle_rows, self.batch_size),
                       "local_shuffle_seed": int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])}
        self._it = iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=self.collate, device=self.device,
            pin_memory=self.device.type == "cuda", drop_last=True, prefetch_batches=self.prefetch, **shuffle))
        for _ in range(self.consumed):  # fast-forward to the saved position
            next(self._it)

    def next(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start_epoch()
        while True:
            try:
                batch = next(self._it)
                break
            except StopIteration:
                if self.consumed == 0:
                    raise RuntimeError("a data shard yields no full batch: lower trainer.micro_batch_size or add data") from None
                self.epoch, self.consumed = self.epoch + 1, 0
                self._start_epoch()
        self.consumed += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}
