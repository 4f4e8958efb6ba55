"""W&B tracking for one training run: rank 0 only, a stable run id, offline by default, honest restarts.

Not `ray.air.integrations.wandb.setup_wandb`: under Ray Train V2 its `rank_zero_only=True` checks
the V1 session and opens a run on *every* rank. The loop passes `rank` in; no Ray import here.
Restarts keep one run id and a strictly increasing, duplicate-free history: online the run is
rewound to the restored step (`resume_from="<id>?_step=S"`), offline (and where the server refuses
a rewind) steps W&B already holds go to the `restarts/redo` table instead of history. docs/wandb.md
says exactly what happens in each mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal

from e2e_dist.config import RunConfig, redact
from e2e_dist.errors import UserError

log = logging.getLogger(__name__)

Mode = Literal["online", "offline", "disabled"]
STATE_PREFIX = "e2e-dist-tracking-"  # + <run_id>.json in the W&B dir


class TrackingError(UserError):
    """W&B could not be set up as configured (no credentials, server unreachable)."""


# ------------------------------------------------------------------------------- identity and place
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
    return Path(os.path.abspath(os.path.expanduser(path.removeprefix("file://")))) / cfg.name


def wandb_root(cfg: RunConfig) -> Path:
    """What `wandb.init(dir=...)` gets; W&B writes to `<root>/wandb/`. `tracking.dir` if set, else
    the local run directory, else (s3:// storage) `$WANDB_DIR` or the working directory."""
    if cfg.tracking.dir:
        return Path(os.path.abspath(os.path.expanduser(cfg.tracking.dir)))
    local = _local_run_dir(cfg)
    return local if local is not None else Path(os.path.abspath(os.environ.get("WANDB_DIR") or "."))


def wandb_dir(cfg: RunConfig) -> Path:
    """Where W&B's files (one `<offline-run|run>-<time>-<id>/` folder per session) and our state live."""
    return wandb_root(cfg) / "wandb"


def wandb_run_dir(cfg: RunConfig) -> str | None:
    """The newest local W&B folder of this run, for the end-of-run summary; None when tracking is
    disabled or nothing was written on this machine (rank 0 ran on another node)."""
    if resolve_mode(cfg) == "disabled":
        return None
    run_id = wandb_run_id(cfg)
    files = sorted(wandb_dir(cfg).glob(f"*run-*-{run_id}*/run-{run_id}.wandb"),
                   key=lambda p: (_stamp(p.parent.name), p.stat().st_mtime))
    return str(files[-1].parent) if files else None


def _stamp(folder: str) -> str:
    m = re.search(r"-(\d{8}_\d{6})-", folder)
    return m.group(1) if m else ""


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


# ------------------------------------------------------------------- what W&B already holds locally
def last_step_in_files(wdir: Path, run_id: str) -> int | None:
    """The highest history `_step` in this run's local `.wandb` files, or None: the truth offline, as
    a hard-killed process (SIGKILL, OOM, dead Ray worker) loses what wandb-core had not flushed."""
    from wandb.proto import wandb_internal_pb2 as pb

    best: int | None = None
    for f in wdir.glob(f"*run-*-{run_id}*/run-{run_id}.wandb"):
        for payload in _log_payloads(f.read_bytes()):
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception:  # noqa: BLE001 - damaged record: keep what was read before it
                break
            if rec.WhichOneof("record_type") == "history":
                step = next((int(json.loads(i.value_json)) for i in rec.history.item
                             if (list(i.nested_key) or [i.key]) == ["_step"]), rec.history.step.num)
                best = step if best is None else max(best, step)
    return best


def _log_payloads(data: bytes) -> Iterator[bytes]:
    """Whole records of a W&B transaction log: 7-byte file header, 32 KiB blocks of chunks with a
    `<IHB` (crc32 seeded with the type byte, length, FULL/FIRST/MIDDLE/LAST) header."""
    if data[:4] != b":W&B":
        return
    pos, parts = 7, []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        crc, length, ctype = struct.unpack_from("<IHB", data, pos) if room >= 7 else (0, 0, 0)
        if ctype == 0 and length == 0:  # block tail padding
            pos += room
            continue
        payload = data[pos + 7: pos + 7 + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([ctype]))) != crc:
            return
        pos += 7 + length
        if ctype == 1:
            yield payload
        elif ctype == 2:
            parts = [payload]
        elif ctype in (3, 4) and parts:
            parts.append(payload)
            if ctype == 4:
                yield b"".join(parts)
                parts = []
        else:
            return


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


# ----------------------------------------------------------------------------------------- tracker
class Tracker:
    """One W&B run seen from one process. Rank != 0 and disabled tracking give a no-op tracker."""

    def __init__(self, run: Any = None, *, mode: Mode = "disabled", state_path: Path | None = None,
                 state: dict[str, Any] | None = None, redo_floor: int | None = None) -> None:
        self._run = run  # wandb.sdk.wandb_run.Run; wandb is imported lazily (ranks != 0 never load it)
        self.mode: Mode = mode
        self._state_path = state_path
        self._state = state or {}
        self._redo_floor = redo_floor  # W&B history already holds every step <= this
        self._redo_rows: list[list[Any]] = []
        self._last_step: int | None = None  # highest step this session handed to W&B
        self._warned_backwards = False
        self._finished = run is None

    @classmethod
    def start(cls, cfg: RunConfig, *, rank: int, resume_step: int | None,
              extra_config: dict[str, Any] | None = None) -> "Tracker":
        """Open or continue this run's W&B run on rank 0; every other rank gets a no-op tracker.

        `resume_step`: the step of the checkpoint the loop restored (None: starting from scratch).
        """
        mode = resolve_mode(cfg)
        if rank != 0 or mode == "disabled":
            return cls()
        _no_inherited_service()
        run_id, root = wandb_run_id(cfg), wandb_root(cfg)
        (root / "wandb").mkdir(parents=True, exist_ok=True)  # W&B falls back to /tmp if it is missing
        state_path = root / "wandb" / f"{STATE_PREFIX}{run_id}.json"
        state = _read_state(state_path)
        handed: int | None = state.get("last_step")  # what earlier sessions handed to W&B
        persisted = last_step_in_files(root / "wandb", run_id) if mode == "offline" else None

        run, rewound, target = _open_run(cfg, mode, run_id, root, resume_step, handed, extra_config)
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
        state = {**state, "run_id": run_id, "sessions": sessions + 1, "last_step": redo_floor,
                 "restarts": restarts}
        tracker = cls(run, mode=mode, state_path=state_path, state=state, redo_floor=redo_floor)
        tracker._save_state()
        if is_restart:
            tracker._summarize_restarts()
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
        return self.url or f"{self.run_dir} (offline; upload with `wandb sync {self.run_dir}`)"

    # -------------------------------------------------------------------------------- logging
    def log(self, metrics: dict[str, Any], step: int, *, commit: bool | None = None) -> None:
        """One history row at `step`. Same-step calls merge unless one passes commit=True, which
        closes the row at once (the training loop does: it logs once per step). A step history
        already holds from an earlier session goes to the `restarts/redo` table; one below this
        session's last is dropped."""
        if self._run is None:
            return
        step = int(step)
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

    def backfill(self, metrics: dict[str, Any], step: int) -> bool:
        """Log the row of `step` saved with a checkpoint, if W&B lost it (a worker killed within
        ~1 s of logging it, before wandb-core flushed). Resuming from that checkpoint does not
        redo the step, so without this its row would be missing. Returns whether it was logged."""
        if self._run is None or not metrics or (self._redo_floor is not None and step <= self._redo_floor):
            return False
        if self._last_step is not None and step <= self._last_step:
            return False
        self.log(metrics, step, commit=True)
        return True

    def log_summary(self, d: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(d))

    def log_image(self, key: str, png_path: str | Path, step: int | None = None) -> None:
        """An image (a plot) in history at `step`, or in the summary when `step` is None."""
        if self._run is None:
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

    def finish(self, exit_code: int = 0) -> None:
        """Publish re-done steps, save state, close the run. Idempotent."""
        if self._finished or self._run is None:
            return
        self._finished = True
        self._flush_redo()
        self._save_state()
        self._run.finish(exit_code=exit_code)
        _teardown_service()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    # ------------------------------------------------------------------------------ internals
    def _save_state(self) -> None:
        if self._state_path is not None:
            _write_state(self._state_path, self._state)

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

    def _flush_redo(self) -> None:
        if not self._redo_rows:
            return
        import wandb

        # One table for the whole run (every restart's rows): a later session's summary replaces it.
        rows = self._state.get("redo_rows", []) + self._redo_rows
        self._run.summary["restarts/redo"] = wandb.Table(columns=["restart", "step", "metric", "value"], data=rows)
        self._state["redo_rows"], self._redo_rows = rows, []


def _open_run(cfg: RunConfig, mode: Mode, run_id: str, root: Path, resume_step: int | None,
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
            _teardown_service()
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


def _teardown_service() -> None:
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


def _no_inherited_service() -> None:
    """Start our own wandb-core rather than one inherited via `$WANDB_SERVICE` (a Ray worker gets it
    from whatever started the raylet): a killed worker's run stays registered in a shared service
    and the restarted rank 0 fails with "run ID ... is in use". Field 2 of the token is its owner pid."""
    m = re.match(r"\d+-(\d+)-", os.environ.get("WANDB_SERVICE", ""))
    if m and int(m.group(1)) != os.getpid():
        del os.environ["WANDB_SERVICE"]


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # torn by a crash: W&B's own files still say what it holds
        log.warning("ignoring unreadable W&B state file %s (%s)", path, e)
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new state, never half of one


def _jsonable(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    try:
        return float(v)  # numpy / 0-d torch scalars
    except (TypeError, ValueError, RuntimeError):
        return str(v)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
