"""The commit protocol, as the `checkpoint_upload_fn` Ray Train calls on every rank.

1. Each rank uploads the files DeepSpeed wrote into its local directory to `<run_uri>/<step dir>/`
   and then writes `_parts/rank_NNNNN.json` (its files with size and sha256, hashed from the local
   bytes it sent).
2. Rank 0 waits (polling storage) until every rank's part of *this* save is there, checks that
   every listed file exists with its size, and writes `manifest.json` last. Only now does the
   checkpoint exist.
3. Rank 0 prunes: the newest `keep_last` committed checkpoints stay; older committed ones and
   uncommitted debris older than the new one are deleted (never before the new one committed).

Ray calls the function as fn(local Checkpoint, checkpoint_dir_name) - in the training thread
(SYNC) or in its one-thread upload pool (ASYNC) - retries it on AWS-ish errors, and expects a
`ray.train.Checkpoint` under its experiment directory back. Errors raise with one line of cause;
Ray hands them to the training loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from e2e_dist import storage
from e2e_dist.checkpoint.discover import scan
from e2e_dist.checkpoint.layout import (
    FORMAT_VERSION, MANIFEST, PARTS_DIR, checkpoint_dir_name, now_utc, parse_part, part_name, rank_of_part,
)
from e2e_dist.errors import CheckpointError, StorageError

log = logging.getLogger(__name__)


def make_upload_fn(*, run_uri: str, storage_cfg: Any, rank: int, world_size: int, step: int,
                   meta: dict[str, Any], keep_last: int, commit_timeout_s: float = 600.0,
                   zero_stage: int | None = None, save_id: str | None = None,
                   prune_in_background: bool = False) -> "CommitUpload":
    """The `checkpoint_upload_fn` for `ray.train.report(..., checkpoint_dir_name=checkpoint_dir_name(step))`.

    save_id: the same string on every rank of one save and different across worker-group restarts,
    so rank 0 never commits a part a dead attempt left behind. Default: taken from Ray Train (its
    per-worker-group synchronization actor), None outside Ray.
    zero_stage: recorded in the manifest; default meta["zero_stage"] or meta["config"]["deepspeed"].
    prune_in_background: rank 0 prunes in a thread of its own after committing, so the upload (and a
    synchronous save's caller) does not wait for deletes; `wait_for_prune` joins it.
    """
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta is not JSON-serializable: {e}") from None
    if zero_stage is None:
        zero_stage = meta.get("zero_stage", meta.get("config", {}).get("deepspeed", {}).get("zero_stage"))
    if save_id is None:
        save_id = _ray_attempt_id()

    return CommitUpload(run_uri=run_uri, storage_cfg=storage_cfg, rank=rank, world_size=world_size, step=step,
                        meta=meta, keep_last=keep_last, commit_timeout_s=commit_timeout_s,
                        zero_stage=zero_stage, save_id=save_id, prune_in_background=prune_in_background)


class CommitUpload:
    """The callable handed to Ray. `done` is set when it finished (committed or failed, see `error`),
    so the loop can keep at most one upload in flight and measure how long it waited for one."""

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.pruning: threading.Thread | None = None

    def __call__(self, checkpoint: Any, dir_name: str) -> Any:
        p = self.params
        self.done.clear()
        self.error = None
        try:
            if dir_name != checkpoint_dir_name(p["step"]):
                raise CheckpointError(f"checkpoint dir {dir_name!r} from Ray != {checkpoint_dir_name(p['step'])!r} "
                                      f"of rank {p['rank']}: ranks are at different steps")
            uri = storage.join(p["run_uri"], dir_name)
            with checkpoint.as_directory() as local_dir:
                commit_rank(Path(local_dir), uri, storage_cfg=p["storage_cfg"], rank=p["rank"],
                            world_size=p["world_size"], step=p["step"], meta=p["meta"], zero_stage=p["zero_stage"],
                            save_id=p["save_id"], commit_timeout_s=p["commit_timeout_s"])
            if p["rank"] == 0:
                self._prune()
            return _persisted_checkpoint(uri, dir_name, p["storage_cfg"])
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.done.set()


    def _prune(self) -> None:
        p = self.params

        def run() -> None:
            with _PRUNE_LOCK:  # one prune at a time: two would race to delete the same directories
                prune(p["run_uri"], p["storage_cfg"], committed_step=p["step"], keep_last=p["keep_last"])

        if not p["prune_in_background"]:
            return run()
        self.pruning = threading.Thread(target=run, name=f"e2e-prune-{p['step']}", daemon=True)
        self.pruning.start()

    def wait_for_prune(self, timeout_s: float | None = None) -> None:
        if self.pruning is not None:
            self.pruning.join(timeout_s)


_PRUNE_LOCK = threading.Lock()


def commit_rank(local_dir: Path, uri: str, *, storage_cfg: Any, rank: int, world_size: int, step: int,
                meta: dict[str, Any], zero_stage: int | None, save_id: str | None,
                commit_timeout_s: float = 600.0, poll_s: float = 0.2) -> dict[str, Any] | None:
    """Steps 1-2 of the protocol for one rank; returns the manifest on rank 0 (None elsewhere)."""
    files = storage.local_files(local_dir)
    reserved = [f for f in files if f == MANIFEST or f.startswith(PARTS_DIR + "/")]
    if reserved:
        raise CheckpointError(f"{local_dir}: {reserved[0]} is a reserved checkpoint file name")
    try:
        if rank == 0:
            # Re-doing a step after a restart: the directory must read as uncommitted while it changes.
            storage.delete_file(storage.join(uri, MANIFEST), storage_cfg)
        entries = storage.upload_dir(local_dir, uri, storage_cfg, files=files)
        part = {"format_version": FORMAT_VERSION, "rank": rank, "world_size": world_size, "step": step,
                "save_id": save_id, "files": [e.to_dict() for e in entries], "created_at": now_utc()}
        storage.write_text(storage.join(uri, part_name(rank)), json.dumps(part), storage_cfg)
    except StorageError as e:
        raise CheckpointError(f"checkpoint {checkpoint_dir_name(step)} rank {rank}: {e}") from None
    if rank != 0:
        return None
    try:
        parts = _wait_for_parts(uri, storage_cfg, world_size=world_size, step=step, save_id=save_id,
                                timeout_s=commit_timeout_s, poll_s=poll_s)
        files_out = _merge_parts(uri, parts)
        listing = storage.list_files(uri, storage_cfg)
        for f in files_out:
            if listing.get(f["path"]) != f["size"]:
                raise CheckpointError(f"checkpoint {uri} not committed: {f['path']} is missing or has the wrong size in storage")
        manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
                    "zero_stage": zero_stage, "save_id": save_id, "files": files_out,
                    "created_at": now_utc(), "meta": meta}
        storage.write_text(storage.join(uri, MANIFEST), json.dumps(manifest, indent=1), storage_cfg)
    except StorageError as e:
        raise CheckpointError(f"checkpoint {checkpoint_dir_name(step)} not committed: {e}") from None
    log.info("committed %s (%d files, %d bytes)", uri, len(files_out), sum(f["size"] for f in files_out))
    return manifest


def _wait_for_parts(uri: str, storage_cfg: Any, *, world_size: int, step: int, save_id: str | None,
                    timeout_s: float, poll_s: float) -> dict[int, dict[str, Any]]:
    """Poll `_parts/` until every rank's part of this save (same step and save_id) is there."""
    parts_uri = storage.join(uri, PARTS_DIR)
    found: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for name in storage.list_dir(parts_uri, storage_cfg):
            r = rank_of_part(name)
            if r is None or r in found:
                continue
            where = f"{uri}/{PARTS_DIR}/{name}"
            part = parse_part(storage.read_text(storage.join(parts_uri, name), storage_cfg), where=where)
            if part.get("step") != step or part.get("save_id") != save_id:
                continue  # left by an earlier attempt at this step: its rank will overwrite it
            if part.get("world_size") != world_size or r >= world_size:
                raise CheckpointError(f"{where}: written by a world of {part.get('world_size')} ranks, this one has {world_size}")
            found[r] = part
        if len(found) == world_size:
            return found
        if time.monotonic() >= deadline:
            missing = ", ".join(str(r) for r in range(world_size) if r not in found)
            raise CheckpointError(f"checkpoint {uri} not committed: no upload from rank(s) {missing} within "
                                  f"{timeout_s:.0f}s (a worker died or its upload failed)")
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.5, 2.0)


def _merge_parts(uri: str, parts: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[str, tuple[int, dict[str, Any]]] = {}
    for r in sorted(parts):
        for f in parts[r]["files"]:
            prev = merged.get(f["path"])
            if prev is not None and prev[1]["sha256"] != f["sha256"]:
                raise CheckpointError(f"checkpoint {uri} not committed: ranks {prev[0]} and {r} both wrote "
                                      f"{f['path']} with different contents")
            merged[f["path"]] = (r, f)
    return [merged[p][1] for p in sorted(merged)]


def prune(run_uri: str, storage_cfg: Any, *, committed_step: int, keep_last: int) -> list[str]:
    """Keep the newest `keep_last` committed checkpoints up to `committed_step`; delete older committed
    ones and uncommitted leftovers older than it. Newer directories (from an attempt that got further
    and died) are left alone: uncommitted they are ignored, and they are overwritten when reached.
    Failures are logged, not raised: the new checkpoint is already safe."""
    deleted: list[str] = []
    try:
        infos = [i for i in scan(run_uri, storage_cfg, check_files=False) if i.step <= committed_step]
        committed = [i for i in infos if i.committed]
        doomed = committed[keep_last:] + [i for i in infos if not i.committed and i.step < committed_step]
        for info in sorted(doomed, key=lambda i: i.step):
            # Manifest first: an interrupted delete leaves an uncommitted directory, never a broken "committed" one.
            storage.delete_file(storage.join(info.uri, MANIFEST), storage_cfg)
            storage.delete_tree(info.uri, storage_cfg)
            deleted.append(info.uri)
    except (StorageError, CheckpointError) as e:
        log.warning("pruning old checkpoints under %s failed (will retry after the next commit): %s", run_uri, e)
    return deleted


def _ray_attempt_id() -> str | None:
    """An id shared by all ranks of the current Ray Train worker group, new on every restart; None
    outside Ray Train. If Ray moved it, parts are matched by step only: said once, loudly."""
    from e2e_dist import ray_compat

    try:
        return ray_compat.train_attempt_id()
    except ray_compat.RayCompatError as e:
        if not _FENCING_WARNED:
            _FENCING_WARNED.append(True)
            log.warning("checkpoint commits are NOT fenced per worker-group attempt (a restarted group "
                        "could commit a dead attempt's part file): %s", e)
        return None


_FENCING_WARNED: list[bool] = []


def _persisted_checkpoint(uri: str, dir_name: str, storage_cfg: Any) -> Any:
    """The ray.train.Checkpoint Ray records: on *its* storage filesystem and experiment path when
    running under Ray Train (it checks both), else on ours."""
    import ray.train

    from e2e_dist import ray_compat

    try:
        ctx = ray_compat.train_storage_context()
        return ray.train.Checkpoint(path=ctx.build_checkpoint_path_from_name(dir_name),
                                    filesystem=ctx.storage_filesystem)
    except Exception:  # noqa: BLE001 - outside Ray Train (tests, tools): our own storage
        fs, path = storage.resolve(uri, storage_cfg)
        return ray.train.Checkpoint(path=path, filesystem=fs)
