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
    """Endless micro-batches for one rank, epoch after epoch, at a position that survives resizing.

    Every rank reads the *same* sequence of micro-batches (the whole train set in its fixed order,
    the same seeded shuffle) and trains on its own share: rank r of W takes micro-batches r, r+W,
    r+2W, ... So the global order does not depend on the world size, and the position is one
    number any world size can continue from: `samples`, the examples of this epoch consumed by all
    ranks together. A run resized from 8 to 4 workers skips no example and repeats none. (The price:
    each rank's Ray Data pipeline reads the whole set and keeps 1/W of it - cheap for byte text,
    W x the decoding for images and audio.) An epoch ends when fewer than W micro-batches are left,
    so all ranks start the next one together.

    Each epoch draws rows at random from a buffer of `shuffle_rows` rows, seeded by (seed, epoch):
    every epoch has its own order, the same on every run and on every rank. Batches are prefetched
    `prefetch` deep; on a GPU they arrive pinned and already copied to the device.
    """

    def __init__(self, dataset, batch_size: int, collate, device: torch.device, *, rank: int = 0, world: int = 1,
                 epoch: int = 0, samples: int = 0, prefetch: int = 2, shuffle_rows: int = 0, seed: int = 0):
        self.dataset, self.batch_size, self.device, self.prefetch = dataset, batch_size, device, prefetch
        self.rank, self.world = rank, world
        self.shuffle_rows, self.seed = shuffle_rows, seed
        self.collate = ModalityCollate(collate)
        # A position between micro-batches (a resume with another micro_batch_size) rounds down:
        # at most part of one batch is seen twice, nothing is skipped.
        self.epoch, self.consumed = epoch, samples // batch_size
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        shuffle = {}
        if self.shuffle_rows:
            # Ray wants the buffer at least one batch; the seed mixes run seed and epoch.
            shuffle = {"local_shuffle_buffer_size": max(self.shuffle_rows, self.batch_size),
                       "local_shuffle_seed": int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])}
        self._it = iter(self.dataset.iter_torch_batches(
            batch_size=self.batch_size, collate_fn=self.collate, device=self.device,
            pin_memory=self.device.type == "cuda", drop_last=True, prefetch_batches=self.prefetch, **shuffle))
        for _ in range(self.consumed):  # fast-forward to the saved position
            next(self._it)

    def _next_round(self) -> list[dict[str, torch.Tensor]] | None:
        """The next W micro-batches of the global sequence (one per rank), None at the epoch's end."""
        round_ = []
        for _ in range(self.world):
            try:
                round_.append(next(self._it))
            except StopIteration:
                return None
        return round_

    def next(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start_epoch()
        round_ = self._next_round()
        if round_ is None:
            if self.consumed == 0:
                raise RuntimeError(f"the train set yields fewer than {self.world} micro-batches of "
                                   f"{self.batch_size}: lower trainer.micro_batch_size or add data")
            self.epoch, self.consumed = self.epoch + 1, 0
            self._start_epoch()
            round_ = self._next_round()
            if round_ is None:
                raise RuntimeError("the train set changed size between epochs")
        self.consumed += self.world
        return round_[self.rank]

    def state(self) -> dict[str, int]:
        """The position: epoch, and examples of it consumed by all ranks (independent of W)."""
        return {"epoch": self.epoch, "samples": self.consumed * self.batch_size}
