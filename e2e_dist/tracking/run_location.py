"""Which W&B mode a run uses, the run's stable W&B id, and where W&B writes its files."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from e2e_dist.config import RunConfig, absolute_path

Mode = Literal["online", "offline", "disabled"]


def resolve_mode(cfg: RunConfig, env: Any = None) -> Mode:
    """`tracking.mode` -> W&B mode. auto: `$WANDB_MODE` when it says offline/disabled, else online
    with `$WANDB_API_KEY`, else offline."""
    env = os.environ if env is None else env
    t = cfg.tracking
    if not t.wandb or t.mode == "disabled":
        return "disabled"
    if t.mode != "auto":
        return t.mode
    forced = env.get("WANDB_MODE", "").lower()
    if forced in ("offline", "dryrun", "disabled"):
        return "disabled" if forced == "disabled" else "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


def wandb_run_id(cfg: RunConfig) -> str:
    """`<name>-<8 hex of sha1(run location)>`: one run (restarted, resumed) keeps one W&B id, and
    one name in two places (sweep trial dirs, buckets) gets two. Local paths are made absolute."""
    local = _local_run_dir(cfg)
    where = str(local) if local is not None else cfg.run_uri.rstrip("/")
    return f"{cfg.name[:64]}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def _local_run_dir(cfg: RunConfig) -> Path | None:
    path = cfg.storage.path
    if path.startswith("s3://"):
        return None
    return Path(absolute_path(path)) / cfg.name


def wandb_root(cfg: RunConfig) -> Path:
    """What `wandb.init(dir=...)` gets; W&B writes to `<root>/wandb/`. `tracking.dir` if set, else
    the local run directory, else (s3:// storage) `$WANDB_DIR`, else a stable folder of this run in
    the user's cache (`~/.cache/e2e-dist/wandb/<run id>`, never a Ray session's temp dir)."""
    if cfg.tracking.dir:
        return Path(absolute_path(cfg.tracking.dir))
    local = _local_run_dir(cfg)
    if local is not None:
        return local
    if os.environ.get("WANDB_DIR"):
        return Path(absolute_path(os.environ["WANDB_DIR"]))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "e2e-dist" / "wandb" / wandb_run_id(cfg)


def stored_in_run_dir(cfg: RunConfig) -> bool:
    """Whether W&B writes into the run's own directory in storage (local storage, default dir)."""
    local = _local_run_dir(cfg)
    return local is not None and wandb_root(cfg) == local


def wandb_dir(cfg: RunConfig) -> Path:
    """Where W&B's files (one `<offline-run|run>-<time>-<id>/` folder per session) and our state live."""
    return wandb_root(cfg) / "wandb"


def wandb_session_dirs(cfg: RunConfig) -> list[str]:
    """Every local W&B folder of this run, one per session, oldest first; [] when tracking is
    disabled or nothing was written on this machine (rank 0 ran on another node)."""
    from e2e_dist.tracking.offline_history import find_run_files

    if resolve_mode(cfg) == "disabled":
        return []
    return [str(f.parent) for f in find_run_files(wandb_dir(cfg), wandb_run_id(cfg))]


def wandb_run_dir(cfg: RunConfig) -> str | None:
    """The newest local W&B folder of this run, for the end-of-run summary; None when there is none."""
    dirs = wandb_session_dirs(cfg)
    return dirs[-1] if dirs else None


def wandb_stored_dirs(cfg: RunConfig) -> list[str]:
    """Every W&B folder of this run in its copy next to the run (`<run>/wandb/<folder>`, written for
    runs whose W&B files do not live in the run dir), oldest first; [] if there is none."""
    if resolve_mode(cfg) == "disabled" or stored_in_run_dir(cfg):
        return []
    from e2e_dist import storage

    stored, run_id = storage.join(cfg.run_uri, "wandb"), wandb_run_id(cfg)
    try:
        names = storage.list_files(stored, cfg.storage)
    except storage.StorageError:
        return []
    folders = sorted({n.split("/")[0] for n in names if n.endswith(f"/run-{run_id}.wandb")},
                     key=lambda f: (_stamp(f), f))
    return [storage.join(stored, f) for f in folders]


def wandb_stored_dir(cfg: RunConfig) -> str | None:
    """The newest of `wandb_stored_dirs`, or None."""
    dirs = wandb_stored_dirs(cfg)
    return dirs[-1] if dirs else None


def wandb_sync_command(cfg: RunConfig) -> str | None:
    """One command that uploads every offline session of this run, oldest first (each later session
    continues the same W&B run, so syncing only the newest would lose the earlier steps). From this
    machine's folders when they hold every stored session, else from the copy in storage (rank 0 ran
    some sessions on other nodes). None when no offline session is found."""
    local = [d for d in wandb_session_dirs(cfg) if _offline(d)]
    stored = [d for d in wandb_stored_dirs(cfg) if _offline(d)]
    here = {_folder(d) for d in local}
    if local and all(_folder(d) in here for d in stored):
        return sync_command(local)
    return sync_command(stored) if stored else None


def sync_command(run_dirs: str | Sequence[str]) -> str:
    """How to upload offline W&B folders of one run (local, or their copies in S3) to W&B, in the
    order given: `wandb sync` takes several folders and appends a run's sessions in order."""
    dirs = [run_dirs] if isinstance(run_dirs, str) else list(run_dirs)
    if not dirs[0].startswith("s3://"):
        return "wandb sync " + " ".join(shlex.quote(d) for d in dirs)
    # The stored copy `<run>/wandb/` holds this run's W&B files only: fetch it whole, once.
    parent = dirs[0].rstrip("/").rsplit("/", 1)[0]
    local = f"./{_folder(parent.rsplit('/', 1)[0])}-wandb"
    folders = " ".join(shlex.quote(f"{local}/{_folder(d)}") for d in dirs)
    return f"aws s3 sync {shlex.quote(parent)} {shlex.quote(local)} && wandb sync {folders}"


def _folder(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _offline(path: str) -> bool:
    return _folder(path).startswith("offline-run-")


def _stamp(folder: str) -> str:
    m = re.search(r"-(\d{8}_\d{6})-", folder)
    return m.group(1) if m else ""


def discard_offline_run(cfg: RunConfig) -> None:
    """Delete this run's offline W&B folders and state on this machine: for a run that replaces,
    not continues, an earlier one of its id (a scaling fit made again). Offline W&B cannot append to
    an earlier folder; each init would leave another one for `wandb sync` to upload twice."""
    import shutil

    from e2e_dist.tracking.state import STATE_PREFIX

    folder, run_id = wandb_root(cfg) / "wandb", wandb_run_id(cfg)
    for old in folder.glob(f"offline-run-*-{run_id}"):
        shutil.rmtree(old, ignore_errors=True)
    (folder / f"{STATE_PREFIX}{run_id}.json").unlink(missing_ok=True)

