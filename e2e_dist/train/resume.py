"""Resume every rank from the newest *committed* checkpoint in storage, downloading it once per node,
at any world size and ZeRO stage (checkpoint/universal.py reshards one written with another).

Storage is the record (not Ray's): rank 0 picks the newest checkpoint whose manifest and checksums
verify, every rank then restores that same step. DeepSpeed's loader reads every rank's shard files
(ZeRO-1/2 load all optimizer partitions), so a node needs the whole checkpoint, but only once: one
process per node downloads it into a directory the node's ranks share, the others wait at a
barrier and read that copy. On an 8-GPU node that is 1/8 of the traffic and of the disk.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from e2e_dist import checkpoint as ckpt
from e2e_dist.checkpoint import universal
from e2e_dist.config import RunConfig
from e2e_dist.errors import CheckpointError
from e2e_dist.train.run_state import RunState

log = logging.getLogger("e2e_dist.train")


def downloads_here(*, rank: int, local_rank: int, node_rank: int, rank0_node: int) -> bool:
    """Whether this process fetches the checkpoint for its node: rank 0 (it already did, while
    choosing), or local rank 0 of every other node."""
    return rank == 0 or (local_rank == 0 and node_rank != rank0_node)


def node_restore_dir(cfg: RunConfig) -> Path:
    """The same path for every rank of a run on one node (ranks of one node share its /tmp)."""
    run_key = hashlib.sha1(cfg.run_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"e2e-restore-{cfg.name}-{run_key}"


@dataclass(kw_only=True)
class Restore:
    """What every rank restores, chosen by rank 0: the newest committed checkpoint, and - when it was
    written with another world size, ZeRO stage or offload setting - its universal form instead."""

    found: ckpt.CommittedCheckpoint | None = None
    universal: ckpt.CommittedCheckpoint | None = None
    source_layout: universal.Layout | None = None
    """The checkpoint's layout, when it differs from this run's."""
    rank0_node: int = 0

    @property
    def load_universal(self) -> bool:
        """Build the engine with DeepSpeed's `load_universal` (see build_engine)."""
        return self.universal is not None


def choose(cfg: RunConfig, *, rank: int, world: int, node_rank: int) -> Restore:
    """Rank 0 looks for the newest committed checkpoint (newest first, falling back past any that
    fail their checksums), converts it to the universal form if its layout is not this run's, and
    hands its choice to the others, so storage is looked at by one process per start (a cached
    universal form is tried first: then the native shards are not fetched). Collective when world > 1."""
    shared = node_restore_dir(cfg)
    chosen: list[Any] = [Restore(rank0_node=node_rank)]
    if rank == 0:
        shutil.rmtree(shared, ignore_errors=True)
        here = universal.run_layout(cfg.deepspeed, world)
        chosen = [cached_universal(cfg, here, shared, node_rank)]
        if chosen[0].found is None:
            found, _, skipped = ckpt.restore_latest(cfg.run_uri, cfg.storage, shared)
            for msg in skipped:
                log.warning(msg)
            chosen = [Restore(found=found, rank0_node=node_rank)]
            there = universal.layout_of(found.manifest) if found is not None else here
            if found is not None and universal.needs_universal(there, here, found.step):
                chosen[0].source_layout = there
                chosen[0].universal = universal_copy_on_rank0(found, shared, cfg)
    if world > 1:
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def cached_universal(cfg: RunConfig, here: universal.Layout, shared: Path, node_rank: int) -> Restore:
    """The fast path of a resharded resume: the newest checkpoint needs the universal form and that
    is cached already - download (and verify) only it, not the native shards too. Anything else
    (no checkpoint, same layout, no cache or a bad one) returns an empty Restore: the full path runs."""
    found, _ = ckpt.find_latest_committed(cfg.run_uri, cfg.storage)
    if found is None:
        return Restore(rank0_node=node_rank)
    there = universal.layout_of(found.manifest)
    if not universal.needs_universal(there, here, found.step):
        return Restore(rank0_node=node_rank)
    conv, _ = universal.find_universal(found, cfg.storage)
    if conv is None or not fetch_or_discard(conv, found, shared, cfg):
        return Restore(rank0_node=node_rank)
    return Restore(found=found, universal=conv, source_layout=there, rank0_node=node_rank)


def fetch_or_discard(conv: ckpt.CommittedCheckpoint, found: ckpt.CommittedCheckpoint, shared: Path,
                     cfg: RunConfig, *, last_try: bool = False) -> bool:
    """Download (verified) the universal form `conv` of `found` next to its native copy; one that
    fails its checksums is uncommitted (so it is converted again) and False returned - or, on the
    last try, the error raised."""
    try:
        ckpt.download_checkpoint(conv, universal.local_copy_root(shared / found.name), verify=True,
                                 storage_cfg=cfg.storage)
        return True
    except CheckpointError as e:
        if last_try:
            raise
        log.warning("discarding the universal form of step %d: %s", found.step, e)
        universal.discard(conv, cfg.storage)
        return False


def universal_copy_on_rank0(found: ckpt.CommittedCheckpoint, shared: Path, cfg: RunConfig) -> ckpt.CommittedCheckpoint:
    """The checkpoint's universal form, committed in storage and downloaded (verified) next to the
    native copy. A cache that fails its checksums is uncommitted and converted again, once."""
    conv = universal.ensure_universal(found, shared / found.name, cfg.storage)
    if not fetch_or_discard(conv, found, shared, cfg):
        conv = universal.ensure_universal(found, shared / found.name, cfg.storage)
        fetch_or_discard(conv, found, shared, cfg, last_try=True)
    return conv


def restore(engine: Any, plan: Restore, cfg: RunConfig, *, rank: int, world: int, local_rank: int,
            node_rank: int) -> RunState:
    """Load the chosen checkpoint into `engine` on every rank (collective when world > 1); one
    process per node downloads it into a directory the node's ranks share."""
    shared = node_restore_dir(cfg)
    found = plan.found
    if found is None:
        return RunState()
    fetcher = downloads_here(rank=rank, local_rank=local_rank, node_rank=node_rank, rank0_node=plan.rank0_node)
    if fetcher and rank != 0:
        shutil.rmtree(shared, ignore_errors=True)
        if plan.universal is not None:
            ckpt.download_checkpoint(plan.universal, universal.local_copy_root(shared / found.name), verify=True,
                                     storage_cfg=cfg.storage)
        else:
            ckpt.download_checkpoint(found, shared / found.name, verify=True, storage_cfg=cfg.storage)
    if world > 1:
        dist.barrier()  # the node's copy is complete before anyone reads it
    if plan.universal is not None:
        if rank == 0:
            log.warning("resharding step %d: written by %s, resumed on %s", found.step, plan.source_layout,
                        universal.run_layout(cfg.deepspeed, world))
        state = ckpt.load_universal(engine, shared / found.name, zero_stage=cfg.deepspeed.zero_stage)
    else:
        state = ckpt.load_engine(engine, shared / found.name)
    if world > 1:
        dist.barrier()  # everyone has read it before it goes
    if fetcher:
        shutil.rmtree(shared, ignore_errors=True)
    return RunState.from_client_state(state, micro_batch_size=cfg.trainer.micro_batch_size, world=world)
