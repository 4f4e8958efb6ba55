"""W&B tracking for one training run: rank 0 only, a stable run id, offline by default, honest restarts.

Not `ray.air.integrations.wandb.setup_wandb`: under Ray Train V2 its `rank_zero_only=True` checks
the V1 session and opens a run on *every* rank. The loop passes `rank` in; no Ray import here.
Restarts keep one run id and a strictly increasing, duplicate-free history: online the run is
rewound to the restored step (`resume_from="<id>?_step=S"`), offline (and where the server refuses
a rewind) steps W&B already holds go to the `restarts/redo` table instead of history. docs/wandb.md
says exactly what happens in each mode.

- `run_location`:   resolve_mode, the stable run id and where W&B writes (wandb_run_id, wandb_dir, ...);
                    wandb_sync_command, one `wandb sync` for every session of a run.
- `offline_history`: last_step_in_files, read from W&B's own `.wandb` transaction logs.
- `wandb_session`:  plan_resume and wandb.init / teardown (rewind or resume, a private wandb-core).
- `state`:          our per-run state file next to W&B's files (sessions, restarts, last step).
- `tracker`:        Tracker, what the training loop logs through.
"""

from e2e_dist.tracking.offline_history import last_step_in_files
from e2e_dist.tracking.run_location import (
    Mode,
    resolve_mode,
    wandb_dir,
    wandb_root,
    wandb_run_dir,
    wandb_run_id,
    wandb_sync_command,
)
from e2e_dist.tracking.state import STATE_PREFIX
from e2e_dist.tracking.tracker import Tracker, finish_open_runs_stopped
from e2e_dist.tracking.wandb_session import TrackingError, plan_resume

__all__ = [
    "STATE_PREFIX", "Mode", "Tracker", "TrackingError", "finish_open_runs_stopped", "last_step_in_files",
    "plan_resume", "resolve_mode",
    "wandb_dir", "wandb_root", "wandb_run_dir", "wandb_run_id", "wandb_sync_command",
]
