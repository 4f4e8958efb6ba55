"""Resume every rank from the newest *committed* checkpoint in storage, at any world size and ZeRO
stage (checkpoint/universal.py reshards one written with another), each node fetching only the
files its own ranks load.

Storage is the record (not Ray's): rank 0 picks the newest committed checkpoint and every rank
restores that same step. A node fetches, verified by sha256, only what its ranks read
(checkpoint/needs.py): at the same layout the model states and each rank's own optimizer partition
- DeepSpeed 0.19.8 opens no other rank's shard - so a node of a 64-rank run fetches 1/64 of the
optimizer state, not all of it; at another layout the parameters its ranks' engines hold a piece
of, from the universal form (converted first, by every rank at once, when it is not cached yet).
One process per node downloads into a directory the node's ranks share. A checkpoint whose files
fail their checksums on any node is skipped for the next older one (the universal form: converted
again, once). Each node's downloaded bytes are counted for the resume line and the run summary.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_dist import checkpoint as ckpt
from e2e_dist.checkpoint import needs, universal
from e2e_dist.checkpoint.ranks import Ledger, Ranks, downloads_here, node_fetch
from e2e_dist.config import RunConfig
from e2e_dist.errors import CheckpointError, StorageError
from e2e_dist.train.run_state import RunState

__all__ = ["Restore", "choose", "downloads_here", "node_restore_dir", "restore"]

log = logging.getLogger("e2e_dist.train")


def node_restore_dir(cfg: RunConfig) -> Path:
    """The same path for every rank of a run on one node (ranks of one node share its /tmp)."""
    run_key = hashlib.sha1(cfg.run_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"e2e-restore-{cfg.name}-{run_key}"


@dataclass(kw_only=True)
class Restore:
    """What this rank restores, chosen by rank 0: the newest committed checkpoint, and - when it was
    written with another world size, ZeRO stage or offload setting - its universal form instead."""

    found: ckpt.CommittedCheckpoint | None = None
    universal: ckpt.CommittedCheckpoint | None = None
    source_layout: universal.Layout | None = None
    """The checkpoint's layout, when it differs from this run's."""
    ranks: Ranks = field(default_factory=Ranks.single)
    ledger: Ledger = field(default_factory=Ledger)
    """What this process fetched for its node (and converted) during this restore."""
    node_bytes: dict[int, int] = field(default_factory=dict)
    """After restore: the bytes each node downloaded, by node rank."""

    @property
    def load_universal(self) -> bool:
        """Build the engine with DeepSpeed's `load_universal` (see build_engine)."""
        return self.universal is not None

    def traffic(self) -> str:
        """The byte counter of the resume line: what this node and all nodes fetched, of how much."""
        here, total = self.node_bytes.get(self.ranks.node, 0), sum(self.node_bytes.values())
        size = sum(f["size"] for f in self.found.files) if self.found else 0
        form = f", universal form {_mb(sum(f['size'] for f in self.universal.files))}" if self.universal else ""
        return (f"fetched {_mb(here)} on this node, {_mb(total)} on {len(self.node_bytes)} node(s) "
                f"(checkpoint {_mb(size)}{form})")

    def metrics(self) -> dict[str, int]:
        """The same counts for the run summary."""
        return {"restore/bytes_fetched": sum(self.node_bytes.values()),
                "restore/bytes_fetched_max_node": max(self.node_bytes.values(), default=0)}


@dataclass(frozen=True)
class _Pick:
    """Rank 0's choice, handed to every rank."""

    found: ckpt.CommittedCheckpoint | None = None
    source_layout: universal.Layout | None = None
    error: Exception | None = None


def choose(cfg: RunConfig, *, rank: int, world: int, node_rank: int, local_rank: int = 0) -> Restore:
    """Rank 0 picks the newest committed checkpoint; every node fetches (verified) what its ranks
    load of it, or, written with another layout, its universal form is found or converted by all
    ranks. A checkpoint any node finds corrupt is skipped for the next older one. Collective when
    world > 1; the universal form itself is fetched by `restore`, once the engine says which
    parameters each rank holds."""
    ranks = Ranks.discover(rank=rank, world=world, node_rank=node_rank, local_rank=local_rank)
    shared = node_restore_dir(cfg)
    if ranks.is_fetcher:
        shutil.rmtree(shared, ignore_errors=True)
    here = universal.run_layout(cfg.deepspeed, world)
    candidates = _committed(cfg) if rank == 0 else iter(())
    ledger = Ledger()
    while True:
        pick = ranks.from_rank0(_next_pick(candidates, here) if rank == 0 else None)
        if pick.error is not None:
            raise pick.error
        plan = Restore(found=pick.found, source_layout=pick.source_layout, ranks=ranks, ledger=ledger)
        if pick.found is None:
            return plan
        problems = _prepare(plan, cfg, shared / pick.found.name)
        if not problems:
            return plan
        if rank == 0:
            log.warning("skipped %s: %s", pick.found.uri, problems[0].removeprefix(f"checkpoint {pick.found.uri}: "))
        if ranks.is_fetcher:
            shutil.rmtree(shared / pick.found.name, ignore_errors=True)


def _committed(cfg: RunConfig) -> Iterator[ckpt.CommittedCheckpoint]:
    """Rank 0: committed checkpoints, newest first; an uncommitted directory is said and skipped."""
    for info in ckpt.scan(cfg.run_uri, cfg.storage):
        if not info.committed:
            log.warning("skipped %s: %s", info.uri, info.reason)
            continue
        yield ckpt.CommittedCheckpoint(info.uri, info.step, info.manifest or {}, cfg.storage)


def _next_pick(candidates: Iterator[ckpt.CommittedCheckpoint], here: universal.Layout) -> _Pick:
    """Rank 0: the next candidate and whether it needs the universal form; an error travels to every
    rank (raised there too, so no rank waits for a choice that never comes)."""
    try:
        found = next(candidates, None)
        if found is None:
            return _Pick()
        there = universal.layout_of(found.manifest)
        return _Pick(found=found, source_layout=there if universal.needs_universal(there, here, found.step) else None)
    except (CheckpointError, StorageError) as e:
        return _Pick(error=e)


def _prepare(plan: Restore, cfg: RunConfig, local: Path) -> list[str]:
    """Same layout: this node fetches its ranks' files. Another: the universal form is found or
    converted (fetching the native files the node's slices need). Returns checksum problems."""
    if plan.source_layout is None:
        need = needs.native_files([f["path"] for f in plan.found.files], rank=plan.ranks.rank,
                                  elastic=needs.elastic_checkpoint(cfg.deepspeed))
        return node_fetch(plan.found, local, need, plan.ranks, cfg.storage, plan.ledger)
    plan.universal, problems = universal.ensure_universal(plan.found, local, plan.ranks, cfg.storage, plan.ledger)
    return problems


def restore(engine: Any, plan: Restore, cfg: RunConfig, *, rank: int, world: int, local_rank: int = 0,
            node_rank: int = 0) -> RunState:
    """Load the chosen checkpoint into `engine` on every rank (collective when world > 1); with the
    universal form, each node first fetches the parameters its ranks' engines hold."""
    found = plan.found
    if found is None:
        return RunState()
    local = node_restore_dir(cfg) / found.name
    if plan.universal is not None:
        _fetch_universal(engine, plan, cfg, local)
        if rank == 0:
            log.warning("resharding step %d: written by %s, resumed on %s", found.step, plan.source_layout,
                        universal.run_layout(cfg.deepspeed, world))
        state = ckpt.load_universal(engine, local, zero_stage=cfg.deepspeed.zero_stage)
    else:
        state = ckpt.load_engine(engine, local)
    # Also the barrier before the copy goes: every rank has read it.
    plan.node_bytes = _per_node(plan.ranks, plan.ranks.gather(plan.ledger.bytes))
    if plan.ranks.is_fetcher:
        shutil.rmtree(node_restore_dir(cfg), ignore_errors=True)
    return RunState.from_client_state(state, micro_batch_size=cfg.trainer.micro_batch_size, world=world)


def _fetch_universal(engine: Any, plan: Restore, cfg: RunConfig, local: Path) -> None:
    """The node's share of the universal form, verified. A cache that fails its checksums is
    uncommitted and converted again (by all ranks), once; a second failure raises."""
    for last_try in (False, True):
        need = needs.universal_files([f["path"] for f in plan.universal.files], engine,
                                     zero_stage=cfg.deepspeed.zero_stage)
        problems = node_fetch(plan.universal, local / universal.UNIVERSAL_DIR, need, plan.ranks, cfg.storage,
                              plan.ledger)
        if not problems:
            return
        if last_try:
            raise CheckpointError(problems[0])
        if plan.ranks.rank == 0:
            log.warning("discarding the universal form of step %d: %s", plan.found.step, problems[0])
            universal.discard(plan.universal, cfg.storage)
        if plan.ranks.is_fetcher:
            shutil.rmtree(local / universal.UNIVERSAL_DIR, ignore_errors=True)
        plan.universal, problems = universal.ensure_universal(plan.found, local, plan.ranks, cfg.storage, plan.ledger)
        if problems:
            raise CheckpointError(problems[0])


def _per_node(ranks: Ranks, per_rank: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r, n in enumerate(per_rank):
        out[ranks.nodes[r]] = out.get(ranks.nodes[r], 0) + n
    return out


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"
