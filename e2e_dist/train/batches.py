"""Micro-batches for one rank: its own samples of every global batch, epoch after epoch, from any position.

The order is data/order.py's: one seeded global order per epoch, whatever the world size; global
batch s is the next G samples of it, and rank r trains on its W-th of them. So a rank reads and
decodes only its own samples (1/W of an epoch), and a position (samples of the epoch consumed by
all ranks) is all a resume needs: the next batches follow from arithmetic, nothing before the
position is read again, and a run resized from 8 to 4 workers skips and repeats nothing.

Reading: a set the launcher materialized (a train set under data.cache_mb) is gathered from the
object store; any other is read by Ray Data tasks, `data.decode_tasks` at a time, on the rank's
node when it has room, each task reading the rank's samples of whole windows of the order: its
blocks there, each once, decoded a chunk at a time. A background
thread keeps `prefetch` micro-batches ready (collated, and on a GPU pinned and copied), across
task batches and epochs. The stream counts what it read: samples and storage bytes (`counters`).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np
import torch

from e2e_dist.data.order import EpochOrder, batches_left, cut_at_windows, rank_share_windows
from e2e_dist.data.samples import READ_BYTES, READ_SAMPLES, VALID, SampleSet, read_dataset

TASKS_PER_PIPELINE = 32
"""Read tasks per Ray Dataset the stream builds (the ids of the next stretch of batches; then the next)."""
WINDOWS_PER_PIPELINE = 4
"""...and at least this many windows of the order, so few windows are cut by a pipeline's end."""


def default_window_blocks(cfg) -> int:
    """data.shuffle_blocks, or max(64, 8 x the most workers the run may have): enough blocks per
    window that each rank's share of a window is ~8 blocks, whose edges then cost little."""
    return cfg.data.shuffle_blocks or max(64, 8 * cfg.trainer.worker_range[1])


def model_batch(cols: dict[str, np.ndarray], collate: Callable[[dict], dict]) -> dict[str, torch.Tensor]:
    """A reader's rows -> the model's tensors: undecodable samples (valid False) dropped, unless that
    would leave nothing (every rank must still run the micro-batch: its collectives)."""
    valid = cols.get(VALID)
    rows = {k: v for k, v in cols.items() if k not in (VALID, READ_BYTES, READ_SAMPLES)}
    if valid is not None and valid.any() and not valid.all():
        rows = {k: v[valid] for k, v in rows.items()}
    return collate(rows)


class BatchStream:
    """Endless micro-batches of `split` for rank `rank` of `world`, from (epoch, samples)."""

    def __init__(self, split: SampleSet, *, micro_batch: int, grad_accum: int, collate: Callable[[dict], dict],
                 device: torch.device, shuffle_blocks: int, rank: int = 0, world: int = 1, epoch: int = 0,
                 samples: int = 0, seed: int = 0, prefetch: int = 2, decode_tasks: int = 1, node_id: str | None = None):
        self.split, self.mb, self.accum, self.collate, self.device = split, micro_batch, grad_accum, collate, device
        self.rank, self.world, self.seed, self.m = rank, world, seed, shuffle_blocks
        self.batch = micro_batch * grad_accum * world  # the global batch, in samples
        self.prefetch, self.decode_tasks, self.node_id = max(1, prefetch), decode_tasks, node_id
        self.position = (epoch, samples)
        self.counters = {"samples": 0, "bytes": 0}
        """Samples this rank's read tasks read and decoded, and the storage bytes they read, since
        the stream began (a materialized set: none). Read-ahead included."""
        self.epoch_counters: dict[int, dict[str, int]] = {}
        """The same, per epoch read."""
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------------ consumer side
    def next(self) -> dict[str, torch.Tensor]:
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._feed, name="e2e-batches", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, done = item
        if done is not None:  # the last micro-batch of a global batch: the position moves past it
            self.position = done
        return batch

    def state(self) -> dict[str, int]:
        """The position: epoch, examples of it consumed by all ranks (independent of W), and the
        order's window size (a resume continues the same order)."""
        return {"epoch": self.position[0], "samples": self.position[1], "shuffle_blocks": self.m}

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop reading ahead: the read tasks in flight are cancelled with their pipeline."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------------ producer side
    def _feed(self) -> None:
        batches = self._micro_batches()
        try:
            for item in batches:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.2)  # type: ignore[union-attr]
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put(e)  # type: ignore[union-attr]
        finally:
            batches.close()  # ends the Ray Data iteration in progress (its executor shuts down)

    def _micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], tuple[int, int] | None]]:
        epoch, pos = self.position
        n, G = self.split.n, self.batch
        while True:
            left = batches_left(n, pos, G)
            if not left:
                if pos == 0:
                    raise RuntimeError(f"the train set holds {n} samples, fewer than one global batch of {G}: "
                                       "lower trainer.micro_batch_size (or global_batch_size) or add data")
                epoch, pos = epoch + 1, 0
                continue
            order = EpochOrder(self.split.starts, seed=self.seed, epoch=epoch, window_blocks=self.m)
            stretch = self._stretch(order)
            for first in range(0, left, stretch):
                count = min(stretch, left - first)
                ids, windows = rank_share_windows(order, start=pos, batch=G, first=first, count=count, rank=self.rank,
                                                  world=self.world)
                for j, cols in enumerate(self._rows(ids, windows)):
                    if READ_SAMPLES in cols:  # read by a task (a materialized set costs no reads)
                        self._count(epoch, int(cols[READ_SAMPLES].sum()), int(cols[READ_BYTES].sum()))
                    done = (epoch, pos + (first + (j + 1) // self.accum) * G) if (j + 1) % self.accum == 0 else None
                    yield self._to_device(model_batch(cols, self.collate)), done
            epoch, pos = epoch + 1, 0

    def _stretch(self, order: EpochOrder) -> int:
        """Global batches per Ray Dataset the stream builds: at least TASKS_PER_PIPELINE read tasks'
        worth and WINDOWS_PER_PIPELINE windows (a window cut by a pipeline's end is read by two
        tasks), micro-batch by micro-batch for a set in memory."""
        G = self.batch
        if self.split.materialized:
            return max(1, self.split.rows_per_task // (G // self.world))
        window = order.n / max(order.windows, 1)
        want = max(TASKS_PER_PIPELINE * self.split.rows_per_task * self.world, WINDOWS_PER_PIPELINE * window)
        return max(1, int(-(-want // G)))

    def _count(self, epoch: int, samples: int, nbytes: int) -> None:
        mine = self.epoch_counters.setdefault(epoch, {"samples": 0, "bytes": 0})
        for c in (self.counters, mine):
            c["samples"] += samples
            c["bytes"] += nbytes

    def _rows(self, ids: np.ndarray, windows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """The rank's rows for `ids` (its samples of a stretch of batches), micro-batch by micro-batch:
        gathered from memory, or read by tasks that each take whole windows (order.cut_at_windows),
        so each of the rank's blocks is read by one task, once."""
        if self.split.materialized:
            for i in range(0, len(ids), self.mb):
                yield self.split.read(ids[i:i + self.mb])[0]
            return
        tasks = [ids[piece] for piece in cut_at_windows(windows, self.split.rows_per_task)]
        ds = read_dataset(tasks, self.split.reader, tasks=self.decode_tasks, name=f"{self.split.name}-rank{self.rank}",
                          node_id=self.node_id, chunk=max(self.mb, self.split.rows_per_task))
        yield from ds.iter_batches(batch_size=self.mb, batch_format="numpy", prefetch_batches=1)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}


def stream_for(split: SampleSet, cfg, *, collate: Callable[[dict], dict], device: torch.device, rank: int, world: int,
               grad_accum: int, position: dict[str, Any]) -> BatchStream:
    """The train stream of a rank of this run, from a checkpoint's position (`RunState.data`)."""
    import os

    import ray
    import ray.train

    local_world = max(1, ray.train.get_context().get_local_world_size())
    tasks = cfg.data.decode_tasks or max(1, (os.cpu_count() or 1) // local_world)
    return BatchStream(split, micro_batch=cfg.trainer.micro_batch_size, grad_accum=grad_accum, collate=collate,
                       device=device, rank=rank, world=world, seed=cfg.data.seed, prefetch=cfg.trainer.prefetch_batches,
                       decode_tasks=tasks, node_id=ray.get_runtime_context().get_node_id(),
                       epoch=int(position.get("epoch", 0)), samples=int(position.get("samples", 0)),
                       shuffle_blocks=int(position.get("shuffle_blocks") or default_window_blocks(cfg)))
