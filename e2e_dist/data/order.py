"""The order samples are trained in: one seeded global order per epoch, the same at any world size.

A split is a sequence of samples 0..n-1 cut into *blocks*: runs of consecutive samples that are one
contiguous read (a 256 KiB stretch of a text stream, a Parquet row group, one image file). Epoch
e's order, from (seed, e) alone:

1. the blocks are permuted;
2. consecutive permuted blocks form *windows* of `window_blocks` blocks;
3. inside a window the blocks' samples are interleaved in proportion (each block's samples in a
   seeded order of their own), so every stretch of the window draws evenly from all its blocks,
   which come from all over the corpus.

Global batch s at epoch position p (samples consumed by all ranks) is positions [p, p + G). Its G
samples are sorted by (window, block slot, order in block), and rank r of W takes the r-th W-th
of that list, split into its micro-batches. Two things follow. The set of samples in every global
batch, and so the optimization, does not depend on W (at W=1 the same micro-batches are
accumulated in the same order); and a rank's share of every batch of a window comes from the same
~window_blocks / W blocks, so it reads ~1/W of the data, not all of it (with G >= window_blocks).

Resume is arithmetic: a position maps to its window and the samples from there on; nothing
before it is read. Why this shape (block-wise like MosaicML Streaming's shuffles, step -> indices
like Levanter, reads by Ray Data): docs/architecture.md, "Data at scale".
"""

from __future__ import annotations

import numpy as np

ORDER_SALT = 0x0DE12
"""Mixed into every generator here, so the order never shares a stream with another use of the seed."""


class EpochOrder:
    """Epoch `epoch`'s global order over a split with block boundaries `starts` (int64, len blocks + 1)."""

    def __init__(self, starts: np.ndarray, *, seed: int, epoch: int, window_blocks: int):
        self.starts = np.asarray(starts, dtype=np.int64)
        self.n = int(self.starts[-1])
        self.seed, self.epoch, self.m = seed, epoch, max(1, int(window_blocks))
        nb = len(self.starts) - 1
        self.perm = np.random.default_rng([ORDER_SALT, seed, epoch]).permutation(nb)
        sizes = np.diff(self.starts)[self.perm]
        per_window = np.add.reduceat(sizes, np.arange(0, nb, self.m)) if nb else np.zeros(0, np.int64)
        self.window_starts = np.concatenate([[0], np.cumsum(per_window)]).astype(np.int64)
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    @property
    def windows(self) -> int:
        return len(self.window_starts) - 1

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Window k in sequence order: (sample ids, block slot in the window, rank in its block's order)."""
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        blocks = self.perm[k * self.m:(k + 1) * self.m]
        first, sizes = self.starts[blocks], self.starts[blocks + 1] - self.starts[blocks]
        total = int(sizes.sum())
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        slot = np.repeat(np.arange(len(blocks)), sizes)
        local = np.arange(total, dtype=np.int64) - np.repeat(offsets, sizes)
        rng = np.random.default_rng([ORDER_SALT, self.seed, self.epoch, k])
        grouped = np.lexsort((rng.random(total), slot))  # each block's samples in a seeded order
        rank = np.empty(total, dtype=np.int64)
        rank[grouped] = np.arange(total, dtype=np.int64) - np.repeat(offsets, sizes)
        phase = rng.random(len(blocks))
        # Sample i of a block of b sits at (i + phase) / b of the window: blocks interleave in proportion.
        seq = np.lexsort((slot, (rank + phase[slot]) / sizes[slot]))
        out = ((first[slot] + local)[seq], slot[seq], rank[seq])
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[k] = out
        return out

    def positions(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Positions [lo, hi) of the epoch: (sample ids, window, slot, rank in block)."""
        if not 0 <= lo <= hi <= self.n:
            raise ValueError(f"positions [{lo}, {hi}) outside an epoch of {self.n} samples")
        parts = []
        k = int(np.searchsorted(self.window_starts, lo, side="right")) - 1
        while lo < hi:
            w0, w1 = int(self.window_starts[k]), int(self.window_starts[k + 1])
            ids, slot, rank = self.window(k)
            a, b = lo - w0, min(hi, w1) - w0
            parts.append((ids[a:b], np.full(b - a, k, dtype=np.int64), slot[a:b], rank[a:b]))
            lo, k = w0 + b, k + 1
        if not parts:
            return tuple(np.zeros(0, np.int64) for _ in range(4))  # type: ignore[return-value]
        return tuple(np.concatenate(cols) for cols in zip(*parts))  # type: ignore[return-value]


def rank_share(order: EpochOrder, *, start: int, batch: int, first: int, count: int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s samples of global batches first .. first+count-1 (batch i = positions
    [start + i*batch, start + (i+1)*batch)), in the order the rank trains on them."""
    return rank_share_windows(order, start=start, batch=batch, first=first, count=count, rank=rank, world=world)[0]


def rank_share_windows(order: EpochOrder, *, start: int, batch: int, first: int, count: int, rank: int,
                       world: int) -> tuple[np.ndarray, np.ndarray]:
    """rank_share, and the window each of those samples is in (non-decreasing: a batch's share is
    sorted by window first, so a rank's reads can be cut at window boundaries)."""
    if batch % world:
        raise ValueError(f"global batch {batch} does not split over {world} ranks")
    lo = start + first * batch
    ids, window, slot, rank_in_block = order.positions(lo, lo + count * batch)
    which = np.repeat(np.arange(count), batch)
    canonical = np.lexsort((rank_in_block, slot, window, which))  # batch by batch, then (window, slot, rank)
    share = batch // world
    mine = canonical.reshape(count, batch)[:, rank * share:(rank + 1) * share].ravel()
    return ids[mine], window[mine]


def cut_at_windows(windows: np.ndarray, at_least: int) -> list[slice]:
    """Consecutive pieces of a rank's samples (their windows non-decreasing), each ending where a
    window does and holding at least `at_least` samples (the last may hold fewer): one read task
    each, so a task reads the rank's blocks of its windows whole, and no other task reads them."""
    ends = np.nonzero(np.diff(windows))[0] + 1
    pieces, lo = [], 0
    for end in [*ends.tolist(), len(windows)]:
        if end - lo >= at_least or end == len(windows):
            if end > lo:
                pieces.append(slice(lo, end))
            lo = end
    return pieces


def batches_left(n: int, position: int, batch: int) -> int:
    """Whole global batches left in an epoch of n samples from `position` (the rest is dropped)."""
    return max(0, (n - position) // batch)


# ------------------------------------------------------------------------------------ evaluation
def eval_selection(n: int, samples: int) -> np.ndarray:
    """The validation samples every evaluation scores: all of a split of n <= samples, else
    `samples` of them evenly spaced over it (the same set at any world size, from every part of it)."""
    if samples >= n:
        return np.arange(n, dtype=np.int64)
    return (np.arange(samples, dtype=np.int64) * n) // samples


def eval_chunks(total: int, micro_batch: int, rank: int, world: int) -> tuple[list[tuple[int, int]], int]:
    """(this rank's chunks of the selection as [lo, hi) ranges, rounds every rank runs).

    The selection is cut into chunks of micro_batch at fixed places, dealt out in contiguous runs:
    every chunk is the same forward on any world size, so the summed metric differs across world
    sizes only by the order of a float64 sum. Every rank runs `rounds` forwards (ZeRO-3 gathers
    parameters collectively in each): a rank with fewer chunks repeats one and drops its result."""
    chunks = -(-total // micro_batch)
    lo, hi = chunks * rank // world, chunks * (rank + 1) // world
    mine = [(c * micro_batch, min(total, (c + 1) * micro_batch)) for c in range(lo, hi)]
    return mine, -(-chunks // world)
