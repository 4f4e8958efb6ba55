"""A run's W&B files kept next to the run in storage: `<run>/wandb/`.

Why: W&B writes on rank 0's node. With `s3://` storage that node may be gone (a spot reclaim, the
autoscaler) before anyone runs `wandb sync`, and a restarted run may land on another node, where
the offline history it must continue is missing. So rank 0 uploads what changed in the run's
local W&B folder at every checkpoint and at finish, and a run that starts on a node without
them fetches them back first. Local storage needs none of it: W&B writes into the run directory.

Only what `wandb sync` and our restart bookkeeping need travels: W&B's transaction log
(`run-<id>.wandb`), its `files/`, and our state file; not `logs/` or `tmp/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from e2e_dist.config import RunConfig
from e2e_dist.tracking.run_location import stored_in_run_dir
from e2e_dist.tracking.state import STATE_PREFIX

log = logging.getLogger(__name__)

_SKIPPED_PARTS = ("logs", "tmp")


def storage_uri(cfg: RunConfig) -> str | None:
    """`<run>/wandb` where the W&B files are copied to; None when they live in the run dir already."""
    from e2e_dist import storage

    return None if stored_in_run_dir(cfg) else storage.join(cfg.run_uri, "wandb")


class WandbCopy:
    """Pushes the changed files of this run in one local W&B folder to the run's storage (rank 0)."""

    def __init__(self, cfg: RunConfig, local_dir: Path, run_id: str) -> None:
        self.cfg, self.local_dir, self.uri, self.run_id = cfg, Path(local_dir), storage_uri(cfg), run_id
        self._pushed: dict[str, tuple[int, int]] = {}

    def _wanted(self, rel: str) -> bool:
        """This run's files (its session folders and our state file), minus W&B's logs and tmp."""
        parts = Path(rel).parts
        if len(parts) == 1:
            return parts[0] == f"{STATE_PREFIX}{self.run_id}.json"
        return parts[0].endswith(f"-{self.run_id}") and parts[1] not in _SKIPPED_PARTS

    def pull_if_missing(self) -> int:
        """Fetch the stored files when this node has no state for the run; returns how many."""
        from e2e_dist import storage

        if self.uri is None or (self.local_dir / f"{STATE_PREFIX}{self.run_id}.json").exists():
            return 0
        stored = [r for r in storage.list_files(self.uri, self.cfg.storage) if self._wanted(r)]
        if stored:
            storage.download_dir(self.uri, self.local_dir, self.cfg.storage, files=stored)
            log.info("fetched %d W&B file(s) of this run from %s", len(stored), self.uri)
        self._remember(stored)
        return len(stored)

    def push(self) -> int:
        """Upload files that are new or changed since the last push; returns how many. Failures
        are logged, not raised: W&B files must never stop training."""
        from e2e_dist import storage

        if self.uri is None:
            return 0
        changed = [r for r, sig in self._signatures().items() if self._pushed.get(r) != sig]
        if not changed:
            return 0
        try:
            storage.upload_dir(self.local_dir, self.uri, self.cfg.storage, files=changed)
        except Exception as e:  # StorageError and friends: one line, training goes on
            log.warning("W&B files not copied to %s: %s", self.uri, str(e).splitlines()[0] if str(e) else e)
            return 0
        self._remember(changed)
        return len(changed)

    def _signatures(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.local_dir.rglob("*"):
            rel = p.relative_to(self.local_dir).as_posix()
            if p.is_file() and self._wanted(rel):
                st = p.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def _remember(self, rels: list[str]) -> None:
        sigs = self._signatures()
        self._pushed.update({r: sigs[r] for r in rels if r in sigs})
