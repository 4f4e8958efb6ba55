"""Opening and closing the W&B run: rewind or resume (`plan_resume`), quiet settings, and a
wandb-core service of our own that is torn down once the run's files are complete."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from e2e_dist.config import RunConfig, redact
from e2e_dist.errors import UserError
from e2e_dist.tracking.run_location import Mode

log = logging.getLogger(__name__)


class TrackingError(UserError):
    """W&B could not be set up as configured (no credentials, server unreachable)."""


def plan_resume(mode: Mode, resume_step: int | None, prior_last: int | None) -> tuple[str, int | None]:
    """("rewind", S) or ("allow", None). Rewind online only, when history may hold steps past the
    restored step: known from the state file, or unknowable (another machine) on a resumed run.
    A restart with no checkpoint yet (`resume_step` None) over existing history rewinds to 0."""
    if mode != "online":
        return "allow", None
    target = resume_step if resume_step is not None else 0
    if prior_last is not None:
        return ("rewind", target) if prior_last > target else ("allow", None)
    return ("rewind", target) if resume_step is not None else ("allow", None)


def open_run(cfg: RunConfig, mode: Mode, run_id: str, root: Path, resume_step: int | None,
             handed: int | None, extra_config: dict[str, Any] | None) -> tuple[Any, bool, int | None]:
    """wandb.init: rewind when `plan_resume` says so and the server agrees, else resume="allow"."""
    import wandb

    kwargs = dict(project=cfg.tracking.project, entity=cfg.tracking.entity, group=cfg.tracking.group,
                  name=cfg.name, tags=list(cfg.tracking.tags) or None, job_type="train", dir=str(root),
                  config={**cfg.to_public_dict(), **redact(dict(extra_config or {}))}, mode=mode,
                  reinit="create_new")
    # A fresh Settings per call: wandb.init mutates the one it is given (resume_from stays set).
    settings = _quiet_settings(wandb)
    action, target = plan_resume(mode, resume_step, handed)
    if action == "rewind":
        try:
            return wandb.init(resume_from=f"{run_id}?_step={target}", settings=settings, **kwargs), True, target
        except Exception as e:  # noqa: BLE001 - rewind is a server preview: any refusal -> fall back
            if re.search(r"deadline exceeded|timed? ?out", str(e), re.I):  # no server: no second 90 s wait
                raise _init_failed(mode, e) from None
            log.warning("W&B rewind of %s to step %s unavailable (%s): continuing without rewind",
                        run_id, target, _one_line(e))
            # The refused init leaves its stream registered in wandb-core ("run ID ... is in use"
            # on the retry, seen with wandb 0.31): retry on a fresh service.
            teardown_service()
    try:
        return wandb.init(id=run_id, resume="allow", settings=settings, **kwargs), False, None
    except Exception as e:  # noqa: BLE001
        raise _init_failed(mode, e) from None


def _init_failed(mode: Mode, e: BaseException) -> TrackingError:
    hint = "; set tracking.mode=offline to train without a W&B connection" if mode == "online" else ""
    return TrackingError(f"tracking.mode={mode}: W&B init failed ({_one_line(e)}){hint}")


def _quiet_settings(wandb: Any) -> dict[str, Any]:
    """No banner or console capture (the loop has its own progress display); frequent transaction-log
    flushes, so a hard-killed process loses at most ~1 s of offline rows (the default is 15 s)."""
    settings: dict[str, Any] = dict(console="off", silent=True, quiet=True, show_info=False,
                                    disable_job_creation=True, save_code=False)
    if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:
        settings["x_transaction_log_flush_interval"] = 1.0
    return settings


def teardown_service() -> None:
    """Stop this process's wandb-core once its files are complete (unless another run is open).

    `run.finish()` only *informs* the service; the `.wandb` file is completed asynchronously and a
    process exiting right after (as Ray workers do) can leave it truncated. A later tracker simply
    starts a fresh service."""
    import wandb
    from wandb.sdk import wandb_setup

    if wandb_setup.singleton().most_recent_active_run is not None:
        return
    try:
        wandb.teardown(exit_code=0)  # the run's own exit code is already recorded by finish()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - teardown exits on a service error: never kill training for it
        log.warning("W&B service teardown failed (%s)", _one_line(e) if isinstance(e, Exception) else e)


def no_inherited_service() -> None:
    """Start our own wandb-core rather than one inherited via `$WANDB_SERVICE` (a Ray worker gets it
    from whatever started the raylet): a killed worker's run stays registered in a shared service
    and the restarted rank 0 fails with "run ID ... is in use". Field 2 of the token is its owner pid."""
    m = re.match(r"\d+-(\d+)-", os.environ.get("WANDB_SERVICE", ""))
    if m and int(m.group(1)) != os.getpid():
        del os.environ["WANDB_SERVICE"]


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
