"""One rank's checkpoints: DeepSpeed save -> report to Ray with our commit protocol as the upload.

At most one upload is in flight (bounded memory; its error surfaces at the next save). Rank 0
prunes old checkpoints in the background once a new one committed, off the upload's path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from e2e_dist import checkpoint as ckpt
from e2e_dist.config import RunConfig
from e2e_dist.train.run_state import RunState


class Checkpointer:
    def __init__(self, cfg: RunConfig, engine: Any, *, rank: int, world: int) -> None:
        self.cfg, self.engine, self.rank, self.world = cfg, engine, rank, world
        self.local_root = Path(tempfile.mkdtemp(prefix=f"e2e-{cfg.name}-r{rank}-"))
        self.in_flight: Any = None
        self.last: Any = None
        self.stall_s = 0.0
        """Seconds training stood still for the newest save (waiting for the previous upload,
        DeepSpeed's save, and the upload itself when synchronous)."""

    def save(self, state: RunState, metrics: dict[str, Any], *, final: bool) -> None:
        """Checkpoint `state` (collective: every rank calls it) and report `metrics` with it.
        `final`: upload synchronously (the run ends, or a preemption must be safe now)."""
        import ray.train

        t0 = time.perf_counter()
        self.wait_for_upload()
        name = ckpt.checkpoint_dir_name(state.step)
        local = ckpt.save_engine(self.engine, self.local_root / name, state.client_state())
        upload = ckpt.make_upload_fn(
            run_uri=self.cfg.run_uri, storage_cfg=self.cfg.storage, rank=self.rank, world_size=self.world,
            step=state.step, keep_last=self.cfg.trainer.keep_last, zero_stage=self.cfg.deepspeed.zero_stage,
            meta={"config": self.cfg.to_public_dict(), "model_kind": self.cfg.model.kind, "data": dict(state.data),
                  "units_seen": state.units_seen},
            prune_in_background=True)
        asynchronous = self.cfg.trainer.async_checkpoint and not final
        mode = ray.train.CheckpointUploadMode.ASYNC if asynchronous else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=name, checkpoint_upload_mode=mode, checkpoint_upload_fn=upload,
                         delete_local_checkpoint_after_upload=True)
        self.in_flight = upload if asynchronous else None
        self.last = upload
        self.stall_s = time.perf_counter() - t0

    def wait_for_upload(self) -> None:
        """Block until the upload in flight (if any) is done; raise its error."""
        upload, self.in_flight = self.in_flight, None
        if upload is not None:
            upload.done.wait()
            if upload.error is not None:
                raise upload.error

    def close(self) -> None:
        """After the final save: the last prune finished, the local staging dir gone."""
        self.wait_for_upload()
        if self.last is not None:
            self.last.wait_for_prune()
        shutil.rmtree(self.local_root, ignore_errors=True)
