"""Resume every rank from the newest *committed* checkpoint in storage, downloading it once per node.

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
from pathlib import Path
from typing import Any

import torch.distributed as dist

from e2e_dist import checkpoint as ckpt
from e2e_dist.config import RunConfig
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


def restore(engine: Any, cfg: RunConfig, *, rank: int, world: int, local_rank: int, node_rank: int) -> RunState:
    """Load the newest committed checkpoint into `engine` on every rank (collective when world > 1).

    Rank 0 alone looks for it (newest first, falling back past any that fail their checksums) and
    hands its choice, manifest included, to the others: storage is scanned once per start."""
    shared = node_restore_dir(cfg)
    chosen: list[Any] = [None, node_rank]
    if rank == 0:
        shutil.rmtree(shared, ignore_errors=True)
        found, _, skipped = ckpt.restore_latest(cfg.run_uri, cfg.storage, shared)
        for msg in skipped:
            log.warning(msg)
        chosen = [found, node_rank]
    if world > 1:
        dist.broadcast_object_list(chosen, src=0)
    found, rank0_node = chosen
    if found is None:
        return RunState()
    fetcher = downloads_here(rank=rank, local_rank=local_rank, node_rank=node_rank, rank0_node=rank0_node)
    if fetcher and rank != 0:
        shutil.rmtree(shared, ignore_errors=True)
        ckpt.download_checkpoint(found, shared / found.name, verify=True, storage_cfg=cfg.storage)
    if world > 1:
        dist.barrier()  # the node's copy is complete before anyone reads it
    state = ckpt.load_engine(engine, shared / found.name)
    if world > 1:
        dist.barrier()  # everyone has read it before it goes
    if fetcher:
        shutil.rmtree(shared, ignore_errors=True)
    return RunState.from_client_state(state)
