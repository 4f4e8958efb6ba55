"""`Tracker`, what the training loop logs through (the package docstring says how restarts are handled)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from e2e_dist.config import RunConfig
from e2e_dist.tracking.offline_history import last_step_in_files
from e2e_dist.tracking.run_location import (
    Mode,
    resolve_mode,
    sync_command,
    wandb_root,
    wandb_run_id,
)
from e2e_dist.tracking.state import STATE_PREFIX, read_state, write_state
from e2e_dist.tracking.storage_copy import WandbCopy
from e2e_dist.tracking.wandb_session import (
    no_inherited_service,
    open_run,
    teardown_service,
)

log = logging.getLogger(__name__)

_OPEN: list["Tracker"] = []
"""Trackers of this process whose W&B run is open (rank 0 of a run): what `finish_open_runs_stopped`
reaches from code that does not hold the loop's tracker (a Ray Train callback in the worker)."""


class Tracker:
    """One W&B run seen from one process. Rank != 0 and disabled tracking give a no-op tracker."""

    def __init__(self, run: Any = None, *, mode: Mode = "disabled", state_path: Path | None = None,
                 state: dict[str, Any] | None = None, redo_floor: int | None = None,
                 copy: WandbCopy | None = None) -> None:
        self._run = run  # wandb.sdk.wandb_run.Run; wandb is imported lazily (ranks != 0 never load it)
        self.mode: Mode = mode
        self._state_path = state_path
        self._state = state or {}
        self._redo_floor = redo_floor  # W&B history already holds every step <= this
        self._redo_rows: list[list[Any]] = []
        self._last_step: int | None = None  # highest step this session handed to W&B
        self._seen_step: int | None = None  # highest step the loop logged (history or redo table)
        self._warned_backwards = False
        self._finished = run is None
        self._copy = copy  # the run's W&B files next to the run in storage (s3:// runs)

    @classmethod
    def start(cls, cfg: RunConfig, *, rank: int, resume_step: int | None,
              extra_config: dict[str, Any] | None = None) -> "Tracker":
        """Open or continue this run's W&B run on rank 0; every other rank gets a no-op tracker.

        `resume_step`: the step of the checkpoint the loop restored (None: starting from scratch).
        """
        mode = resolve_mode(cfg)
        if rank != 0 or mode == "disabled":
            return cls()
        no_inherited_service()
        run_id, root = wandb_run_id(cfg), wandb_root(cfg)
        (root / "wandb").mkdir(parents=True, exist_ok=True)  # W&B falls back to /tmp if it is missing
        copy = WandbCopy(cfg, root / "wandb", run_id)
        try:  # a restart on another node: continue from the files the last session stored
            copy.pull_if_missing()
        except Exception as e:  # unreadable storage: the run goes on, its history may repeat steps
            log.warning("W&B files of this run not fetched from %s: %s", copy.uri, str(e).splitlines()[0])
        state_path = root / "wandb" / f"{STATE_PREFIX}{run_id}.json"
        state = read_state(state_path)
        handed: int | None = state.get("last_step")  # what earlier sessions handed to W&B
        persisted = last_step_in_files(root / "wandb", run_id) if mode == "offline" else None

        run, rewound, target = open_run(cfg, mode, run_id, root, resume_step, handed, extra_config)
        # What W&B *holds* decides what may not be logged again: online the server's resume point,
        # offline the run's own files (a hard kill loses wandb-core's unflushed buffer).
        server_last = run.starting_step - 1 if run.starting_step else None
        held = server_last if mode == "online" else persisted
        redo_floor = max(x for x in (target, server_last) if x is not None) if rewound else held

        sessions = int(state.get("sessions", 0))
        restarts = list(state.get("restarts", []))
        is_restart = bool(sessions) or held is not None
        if is_restart:
            before = max((x for x in (handed, held) if x is not None), default=None)
            restarts.append({"restart": len(restarts) + 1, "resumed_from_step": resume_step,
                             "last_logged_step": before, "last_persisted_step": held, "rewound": rewound,
                             "steps_redone": max(0, before - (resume_step or 0)) if before is not None else 0})
        sizes = list(state.get("world_sizes", []))
        world = (extra_config or {}).get("world_size")
        if world is not None and (not sizes or sizes[-1]["world_size"] != world):
            sizes.append({"from_step": resume_step or 0, "world_size": world})
        state = {**state, "run_id": run_id, "sessions": sessions + 1, "last_step": redo_floor,
                 "restarts": restarts, "world_sizes": sizes}
        tracker = cls(run, mode=mode, state_path=state_path, state=state, redo_floor=redo_floor, copy=copy)
        _OPEN.append(tracker)
        tracker._save_state()
        if is_restart:
            tracker._summarize_restarts()
        if sizes:
            tracker._summarize_world_sizes()
        return tracker

    # ---------------------------------------------------------------------------------- where
    @property
    def enabled(self) -> bool:
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def run_dir(self) -> Path | None:
        """This session's local W&B folder (`.../wandb/<offline-run|run>-<time>-<id>/`)."""
        return Path(self._run.dir).parent if self._run is not None else None

    @property
    def url(self) -> str | None:
        return (self._run.url or None) if self._run is not None and self.mode == "online" else None

    def describe(self) -> str:
        """Where the run is, in one line: its URL online; its folder and the sync command offline."""
        if self._run is None:
            return "W&B disabled"
        return self.url or f"{self.run_dir} (offline; upload with `{sync_command(str(self.run_dir))}`)"

    # -------------------------------------------------------------------------------- logging
    def log(self, metrics: dict[str, Any], step: int, *, commit: bool | None = None) -> None:
        """One history row at `step`. Same-step calls merge unless one passes commit=True, which
        closes the row at once (the training loop does: it logs once per step). A step history
        already holds from an earlier session goes to the `restarts/redo` table; one below this
        session's last is dropped."""
        if self._finished:
            return
        step = int(step)
        self._seen_step = step if self._seen_step is None else max(self._seen_step, step)
        if self._redo_floor is not None and step <= self._redo_floor:
            n = len(self._state.get("restarts", []))
            self._redo_rows.extend([n, step, k, _jsonable(v)] for k, v in metrics.items())
            return
        if self._last_step is not None and step < self._last_step:
            if not self._warned_backwards:
                log.warning("W&B: step %d < last logged step %d: not logged (history must stay ordered)",
                            step, self._last_step)
                self._warned_backwards = True
            return
        if self._last_step is None:
            self._flush_redo()  # the re-done range is over: publish what it produced
        # commit=True closes the row now: W&B otherwise holds a step's row open until the next step
        # arrives, and a worker killed before then loses it (seen: a crash 2 s after a log).
        self._run.log(dict(metrics), step=step, commit=commit)
        if self._last_step is None or step > self._last_step:
            self._last_step = self._state["last_step"] = step
            self._save_state()

    def backfill(self, rows: list[dict[str, Any]]) -> list[int]:
        """Log the rows a restored checkpoint carried (each with its "step") that W&B lost: a worker
        killed within ~1 s of logging, before wandb-core flushed, loses them, and resuming from that
        checkpoint does not redo those steps. Rows W&B holds (or this session logged) are skipped.
        Returns the steps logged."""
        done = []
        for row in sorted(rows, key=lambda r: r["step"]):
            step = int(row["step"])
            if self._run is None or (self._redo_floor is not None and step <= self._redo_floor):
                continue
            if self._last_step is not None and step <= self._last_step:
                continue
            self.log({k: v for k, v in row.items() if k != "step"}, step, commit=True)
            done.append(step)
        return done

    def log_summary(self, d: dict[str, Any]) -> None:
        if not self._finished:
            self._run.summary.update(dict(d))

    def log_image(self, key: str, png_path: str | Path, step: int | None = None) -> None:
        """An image (a plot) in history at `step`, or in the summary when `step` is None."""
        if self._finished:
            return
        path = Path(png_path)
        if not path.is_file():
            raise FileNotFoundError(f"image for W&B key {key!r} not found: {path}")
        import wandb

        image = wandb.Image(str(path))
        if step is None:
            self._run.summary[key] = image
        else:
            self.log({key: image}, step=step)

    def copy_to_storage(self) -> int:
        """Upload this run's changed W&B files to `<run>/wandb/` (s3:// runs; the loop calls it at
        every checkpoint). Returns how many files went; never raises."""
        return self._copy.push() if self._copy is not None else 0

    def finish(self, exit_code: int = 0) -> None:
        """Publish re-done steps, save state, close the run, copy its files to storage.
        Idempotent; logging after it is a no-op."""
        if self._finished or self._run is None:
            return
        self._finished = True
        if self in _OPEN:
            _OPEN.remove(self)
        self._flush_redo()
        self._save_state()
        self._run.finish(exit_code=exit_code)
        teardown_service()
        self.copy_to_storage()

    def finish_stopped(self, **info: Any) -> int | None:
        """Close the run as stopped early on purpose (a sweep scheduler cut the trial), not crashed:
        summary `stopped_early: 1`, `stopped_at_step` (the last step the loop logged) and `info`
        (say, the step the decision was based on), then a normal finish (exit code 0). Returns the
        step (None when nothing was logged, or the run is not open here)."""
        if self._finished:
            return None
        step = self._seen_step
        self._run.summary.update({"stopped_early": 1, "stopped_at_step": step, **info})
        self.finish(exit_code=0)
        return step

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    # ------------------------------------------------------------------------------ internals
    def _save_state(self) -> None:
        if self._state_path is not None:
            write_state(self._state_path, self._state)

    def _summarize_restarts(self) -> None:
        restarts = self._state["restarts"]
        self._run.summary.update({
            "restarts/count": len(restarts),
            "restarts/last_resumed_from_step": restarts[-1]["resumed_from_step"],
            "restarts/last_logged_step_before": restarts[-1]["last_logged_step"],
            "restarts/steps_redone_total": sum(r["steps_redone"] for r in restarts),
            "restarts/rewound": restarts[-1]["rewound"],
            "restarts/history": restarts,
        })

    def _summarize_world_sizes(self) -> None:
        """Elastic and resized runs: how often the worker count changed, and the sizes over time
        (each entry: the step the size took over at)."""
        sizes = self._state["world_sizes"]
        self._run.summary.update({"resizes/count": len(sizes) - 1, "resizes/world_sizes": sizes})

    def _flush_redo(self) -> None:
        if not self._redo_rows:
            return
        import wandb

        # One table for the whole run (every restart's rows): a later session's summary replaces it.
        rows = self._state.get("redo_rows", []) + self._redo_rows
        self._run.summary["restarts/redo"] = wandb.Table(columns=["restart", "step", "metric", "value"], data=rows)
        self._state["redo_rows"], self._redo_rows = rows, []


def finish_open_runs_stopped(**info: Any) -> int | None:
    """`Tracker.finish_stopped` on every run this process has open; returns the (last) stopped step,
    None when none was open (not rank 0, or tracking disabled)."""
    step = None
    for tracker in list(_OPEN):
        step = tracker.finish_stopped(**info)
    return step


def _jsonable(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    try:
        return float(v)  # numpy / 0-d torch scalars
    except (TypeError, ValueError, RuntimeError):
        return str(v)

