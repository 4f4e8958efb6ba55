"""Checkpoints that are never partial: DeepSpeed save/load, the manifest commit protocol, discovery.

- `engine`:   save_engine / load_engine (DeepSpeed's own checkpointing, tag "ds").
- `commit`:   make_upload_fn, Ray Train's checkpoint_upload_fn: every rank uploads its files and a
              part file, rank 0 writes manifest.json last, then prunes to keep_last.
- `discover`: find_latest_committed / restore_latest / list_checkpoints: storage is the source of
              truth, a directory counts only if its manifest verifies.
- `universal`: resharding - DeepSpeed's universal form of a checkpoint, converted on first need
              and cached next to it, so any world size and ZeRO stage can resume it; `spread`
              converts it on every rank at once, a slice of the parameters each.
- `needs`:    which files of a checkpoint one rank reads on load; `ranks`: the per-node fetch of
              just those (one process per node) and the collectives restore uses.
- `layout`:   names and formats.

Importing this package imports neither Ray nor DeepSpeed (export and `generate` rely on that).
"""

from e2e_dist.checkpoint.commit import make_upload_fn, prune
from e2e_dist.checkpoint.discover import (
    download_checkpoint, find_latest_committed, list_checkpoints, restore_latest, scan,
)
from e2e_dist.checkpoint.engine import load_engine, load_universal, save_engine
from e2e_dist.checkpoint.layout import (
    DS_TAG, MANIFEST, CheckpointInfo, CommittedCheckpoint, checkpoint_dir_name, step_of,
)

__all__ = [
    "DS_TAG", "MANIFEST", "CheckpointInfo", "CommittedCheckpoint", "checkpoint_dir_name", "download_checkpoint",
    "find_latest_committed", "list_checkpoints", "load_engine", "load_universal", "make_upload_fn", "prune", "restore_latest",
    "save_engine", "scan", "step_of",
]
