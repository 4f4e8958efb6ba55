"""A worker group as a restore sees it: which node each rank is on, who fetches for a node, and the
one collective pattern both restore and the spread conversion use - every rank says which files it
needs, one process per node downloads the union for its node into a directory the node's ranks
share, and every rank learns whether any node's copy failed its checksums.

One process (world 1) needs no process group; more use torch.distributed's default group, which
Ray Train (or a test's loopback group) has set up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_dist.checkpoint.discover import download_checkpoint
from e2e_dist.checkpoint.layout import CommittedCheckpoint
from e2e_dist.errors import CheckpointError, StorageError


def downloads_here(*, rank: int, local_rank: int, node_rank: int, rank0_node: int) -> bool:
    """Whether this process fetches for its node: rank 0 on its node, local rank 0 on every other."""
    return rank == 0 or (local_rank == 0 and node_rank != rank0_node)


@dataclass(frozen=True)
class Ranks:
    """This rank, and the node (and local rank) of every rank of the group."""

    rank: int
    nodes: tuple[int, ...]
    """Node rank of every rank."""
    local_ranks: tuple[int, ...]

    @classmethod
    def discover(cls, *, rank: int, world: int, node_rank: int, local_rank: int) -> "Ranks":
        """Collective when world > 1: every rank learns where every other one runs."""
        pairs = _all_gather((node_rank, local_rank), world)
        return cls(rank, tuple(n for n, _ in pairs), tuple(lr for _, lr in pairs))

    @classmethod
    def single(cls) -> "Ranks":
        return cls(0, (0,), (0,))

    @property
    def world(self) -> int:
        return len(self.nodes)

    @property
    def node(self) -> int:
        return self.nodes[self.rank]

    def fetcher_of(self, node: int) -> int:
        here = self.on_node(node)
        chosen = [r for r in here if downloads_here(rank=r, local_rank=self.local_ranks[r], node_rank=node,
                                                    rank0_node=self.nodes[0])]
        return chosen[0] if chosen else here[0]  # a node without a local rank 0: its first rank

    @property
    def is_fetcher(self) -> bool:
        return self.fetcher_of(self.node) == self.rank

    def on_node(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.nodes) if n == node]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a barrier too)."""
        return _all_gather(obj, self.world)

    def from_rank0(self, obj: Any) -> Any:
        return self.gather(obj if self.rank == 0 else None)[0]


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Ledger:
    """What this process did for its node during one restore: bytes and files it downloaded (as the
    node's fetcher), and the parameters it converted to the universal form."""

    bytes: int = 0
    files: dict[str, list[str]] = field(default_factory=dict)
    """Checkpoint uri -> paths fetched from it."""
    converted: list[str] = field(default_factory=list)

    def add(self, uri: str, paths: list[str], size: int) -> None:
        self.bytes += size
        self.files.setdefault(uri, []).extend(paths)


def node_fetch(ckpt: CommittedCheckpoint, local_dir: Path, paths: Iterable[str], ranks: Ranks, storage_cfg: Any,
               ledger: Ledger) -> list[str]:
    """Collective: this rank needs `paths` of `ckpt` in `local_dir`; the node's fetcher downloads what
    its ranks need and is not there yet, verified by size and sha256. Returns every node's checksum
    problem (empty: every node's copy is complete); a storage failure raises on every rank."""
    wanted = ranks.gather(sorted(set(paths)))
    problem = ("", "")
    if ranks.is_fetcher:
        sizes = {f["path"]: f["size"] for f in ckpt.files}
        need = set().union(*(wanted[r] for r in ranks.on_node(ranks.node)))
        # A file already here came from an earlier fetch of this restore (verified) or from this
        # node's own conversion (hashed as it was uploaded): the directory starts empty.
        todo = sorted(p for p in need if not _present(Path(local_dir) / p, sizes[p]))
        try:
            download_checkpoint(ckpt, local_dir, verify=True, storage_cfg=storage_cfg, only=todo)
            ledger.add(ckpt.uri, todo, sum(sizes[p] for p in todo))
        except CheckpointError as e:
            problem = ("checksum", str(e))
        except StorageError as e:
            problem = ("storage", str(e))
    problems = [p for p in ranks.gather(problem) if p[0]]
    storage_failures = [msg for kind, msg in problems if kind == "storage"]
    if storage_failures:
        raise StorageError(storage_failures[0])
    return [msg for _, msg in problems]


def _present(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
