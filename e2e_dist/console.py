"""What reaches the console, and where everything else goes.

The console is for people: our own lines only. Whatever Ray, Ray Data, Train, Tune, DeepSpeed,
torch and W&B print - on the driver and in every Ray worker of the run - goes to the run's log
file, whose path is printed when the run starts and in its summary. `e2e-dist -v` shows it all.

How each kind of output is routed:
- Our code logs through the `e2e_dist` logger. In a Ray worker, `tag_our_lines()` prints those
  records with TAG in front; on the driver, `RunLog` shows them plainly ("warning: ..." for
  warnings) and writes them to the file.
- Workers' stdout/stderr reach the driver through Ray's log stream (log_to_driver). `RunLog`
  replaces the handler Ray prints them with: every line goes to the file, tagged lines of the
  wanted level also to the console (once, however many ranks said it).
- Library loggers on the driver lose their console handlers and propagate to the root logger,
  which writes to the file; Python warnings are captured into it too.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from e2e_dist import ray_compat

TAG = "[e2e-dist] "
"""Marks our records in a worker's output; the driver shows only such lines (without it)."""

LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "deepspeed", "DeepSpeed", "torch",
                   "wandb", "botocore", "boto3", "urllib3", "filelock", "fsspec", "py.warnings")
"""Loggers whose console handlers a run takes away (their records go to the log file instead)."""


_VERBOSE = False
_ACTIVE: "RunLog | None" = None


def run_log_open() -> bool:
    """Whether a RunLog routes this process's output (init_ray then leaves Ray's logging alone)."""
    return _ACTIVE is not None and not _ACTIVE.verbose


class _LogStream(io.TextIOBase):
    """A file-like view of the open run log (for libraries that print instead of logging)."""

    def __init__(self, run_log: "RunLog") -> None:
        self.run_log = run_log

    def write(self, text: str) -> int:
        with self.run_log._lock:
            self.run_log._file.write(text)
        return len(text)


def library_stream() -> TextIO:
    """Where a library's prints should go: the open run log, else (no run, or -v) stdout."""
    if _ACTIVE is None or _ACTIVE.verbose:
        return sys.stdout
    return _LogStream(_ACTIVE)


def ray_started() -> None:
    """Called by init_ray once it connected Ray: the open RunLog, if any, takes over Ray's
    printing of worker output and the console handlers ray.init just installed."""
    if _ACTIVE is not None:
        _ACTIVE.reroute_libraries()
        _ACTIVE.capture_worker_output()


FILE_ONLY = {"console": False}
"""`log.info(..., extra=FILE_ONLY)`: a detail for the log file, not the console."""


def _not_the_accelerator_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to")


def _for_console(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


def _console_handler(stream: TextIO | None = None) -> logging.Handler:
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(_ConsoleFormatter())
    h.addFilter(_for_console)
    h._e2e_dist_console = True  # type: ignore[attr-defined]  - recognized (and not duplicated) by setup_console
    return h


RAY_CLIENT_CHATTER = ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging")
"""Ray's loggers that narrate a job submission's upload at INFO on the console."""


def setup_console(verbose: bool = False) -> None:
    """The CLI's logging: our records on the console (INFO and up), libraries' warnings too until a
    run opens its log file (verbs such as export have no run); `verbose` shows libraries' INFO."""
    global _VERBOSE
    _VERBOSE = verbose
    ours = logging.getLogger("e2e_dist")
    ours.setLevel(logging.INFO)
    ours.propagate = True
    if not any(getattr(h, "_e2e_dist_console", False) for h in ours.handlers):
        ours.addHandler(_console_handler())
    root = logging.getLogger()
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Ray configures its "ray" logger at import (a console handler at INFO, not propagating):
        # `submit --follow` would print the job SDK's "WebSocket closed ..." INFO line. A level on
        # the child survives that.
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
        # `submit` with a working dir: "Creating a file package ...", "Uploading package ..." (INFO).
        for name in RAY_CLIENT_CHATTER:
            logging.getLogger(name).setLevel(logging.WARNING)
        # DeepSpeed's import says "Setting accelerator to CPU ..." at WARNING on every CPU machine
        # (export, predict); its logger sets its own level and handler at import, a filter stays.
        logging.getLogger("DeepSpeed").addFilter(_not_the_accelerator_notice)
    if not root.handlers:
        libs = logging.StreamHandler(sys.stderr)
        libs.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        libs.addFilter(lambda r: not r.name.startswith("e2e_dist"))  # ours has its own handler above
        root.addHandler(libs)


def tag_our_lines(level: int = logging.INFO) -> None:
    """In a Ray worker: print our records as `TAG LEVEL message` on stderr, which Ray streams to the
    driver, where RunLog picks them out of the libraries' lines. Idempotent."""
    ours = logging.getLogger("e2e_dist")
    ours.setLevel(level)
    ours.propagate = False  # Ray's own handlers on the root would print them a second time, untagged
    if not any(getattr(h, "_e2e_dist_tag", False) for h in ours.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(_TaggedFormatter())
        h._e2e_dist_tag = True  # type: ignore[attr-defined]
        ours.addHandler(h)


class _TaggedFormatter(logging.Formatter):
    """A worker's record for the driver: tagged for the console, or (FILE_ONLY) untagged, which
    the driver's RunLog writes to the log file only, like the libraries' lines."""

    def format(self, record: logging.LogRecord) -> str:
        if _for_console(record):
            return f"{TAG}{record.levelname} {record.getMessage()}"
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def parse_tagged(line: str) -> tuple[int, str] | None:
    """(level, message) of a line `tag_our_lines` printed, None for anything else."""
    if not line.startswith(TAG):
        return None
    level_name, _, msg = line[len(TAG):].partition(" ")
    level = logging.getLevelName(level_name)
    return (level, msg) if isinstance(level, int) else None


def default_log_path(local_dir: str | None, name: str) -> Path:
    """`<local run dir>/logs/<name>-<time>.log`; for a run stored elsewhere (s3://) the log stays
    on the driver's machine, in the cache folder's `logs/` ($E2E_DIST_CACHE, else ~/.cache/e2e_dist:
    not the working directory, which for a Ray job is a temporary copy)."""
    from e2e_dist.data.images import cache_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(local_dir) / "logs" if local_dir and "://" not in local_dir else cache_root() / "logs"
    return (folder / f"{name}-{stamp}.log").resolve()


class RunLog:
    """The run's log file and the console routing around it, for the length of a `with` block.

    worker_level: the lowest level of our workers' records shown on the console (a sweep shows
    only warnings: its table says what the trials do). verbose: change nothing on the console,
    copy everything to the file as well.
    """

    def __init__(self, path: Path, *, verbose: bool | None = None, worker_level: int = logging.INFO,
                 console: TextIO | None = None) -> None:
        self.path, self.worker_level = Path(path), worker_level
        self.verbose = _VERBOSE if verbose is None else verbose
        self.console = console
        self._seen: dict[str, float] = {}
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        self._handler: logging.Handler | None = None
        self._ray_printer: Any = None
        self._error_printer: Any = None
        self._fd2: tuple[int, TextIO, TextIO, list[logging.StreamHandler]] | None = None

    # ------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RunLog":
        import ray  # noqa: F401 - its import installs Ray's console handler: before we take it away

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._handler.setLevel(logging.INFO)  # libraries' DEBUG records propagate up to here too
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self._handler)
        logging.captureWarnings(True)
        self.reroute_libraries()
        self._split_stderr()
        global _ACTIVE
        self._outer, _ACTIVE = _ACTIVE, self
        if ray.is_initialized():
            self.capture_worker_output()
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = self._outer
        self.release_worker_output()
        self._join_stderr()
        root = logging.getLogger()
        root.removeHandler(self._handler)
        root.setLevel(self._root_level)
        logging.captureWarnings(False)
        for logger, handlers, propagate in reversed(self._saved):
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        self._saved.clear()
        self._handler.close()
        self._file.close()

    def _split_stderr(self) -> None:
        """Raw writes to the process's fd 2 go to the log file; our console lines keep the real
        stderr through a duplicate of it. Ray's C++ core worker in this process writes its ERROR
        lines straight to fd 2 (e.g. "Attempting to recover N lost objects" when a node is lost),
        below every Python-level route; so do the processes this run starts. Only when stderr is
        this process's own fd 2 (not under a test's capture, not with a console given)."""
        if self.verbose or self.console is not None:
            return
        try:
            if sys.stderr.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return
        old = sys.stderr
        old.flush()
        dup = os.dup(2)
        new = open(dup, "w", buffering=1, encoding=old.encoding, errors=old.errors)
        moved = [h for lg in (logging.getLogger(), logging.getLogger("e2e_dist"))
                 for h in lg.handlers if isinstance(h, logging.StreamHandler) and h.stream is old]
        for h in moved:
            h.setStream(new)
        sys.stderr = new
        os.dup2(self._file.fileno(), 2)
        self._fd2 = (dup, old, new, moved)

    def _join_stderr(self) -> None:
        if self._fd2 is None:
            return
        dup, old, new, moved = self._fd2
        self._fd2 = None
        new.flush()
        os.dup2(dup, 2)  # fd 2 is the real stderr again
        sys.stderr = old
        for h in moved:
            h.setStream(old)
        new.close()  # closes the duplicate

    def reroute_libraries(self) -> None:
        """Take the console handlers off library loggers; their records reach the file through the
        root. Again after ray.init, which installs Ray's own."""
        if self.verbose:
            return
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            consoles = [h for h in logger.handlers if _is_console(h)]
            if consoles or not logger.propagate:
                self._saved.append((logger, consoles, logger.propagate))
                for h in consoles:
                    logger.removeHandler(h)
                logger.propagate = True
        for h in logging.getLogger().handlers:  # the CLI's pre-run handler for libraries' warnings
            if _is_console(h) and not getattr(h, "_e2e_dist_console", False):
                self._saved.append((logging.getLogger(), [h], True))
                logging.getLogger().removeHandler(h)

    # ------------------------------------------------------------------ workers' output
    def capture_worker_output(self) -> None:
        """Ray connected: workers' lines go through `handle_worker_output` instead of Ray's printer."""
        printer = ray_compat.route_worker_output(_HANDLER_NAME, self.handle_worker_output, keep_ray_printer=self.verbose)
        self._ray_printer = self._ray_printer or printer  # connected twice (init_ray after __enter__): keep the first
        errors = ray_compat.route_error_messages(self.handle_worker_output, keep_printing=self.verbose)
        self._error_printer = self._error_printer or errors

    def release_worker_output(self) -> None:
        try:
            ray_compat.unroute_worker_output(_HANDLER_NAME, self._ray_printer)
            ray_compat.unroute_error_messages(self._error_printer)
        except ray_compat.RayCompatError:
            return
        self._ray_printer = self._error_printer = None

    def handle_worker_output(self, data: dict[str, Any]) -> None:
        """One batch of a Ray process's output lines (Ray's log stream): all to the file, ours to the console."""
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')}) "
        lines = data.get("lines", ())
        if data.get("pid") == "autoscaler":  # its status table every few seconds: keep the events, as Ray does
            lines = ray_compat.autoscaler_events(lines)
        with self._lock:
            for line in lines:
                self._file.write(prefix + line + "\n")
                tagged = parse_tagged(line)
                if tagged and tagged[0] >= self.worker_level and not self.verbose and self._first_time(tagged[1]):
                    level, msg = tagged
                    text = msg if level < logging.WARNING else f"{logging.getLevelName(level).lower()}: {msg}"
                    print(text, file=self.console or sys.stderr, flush=True)

    def _first_time(self, msg: str, window_s: float = 30.0) -> bool:
        """Every rank may say the same thing (a data warning): show it once per window."""
        now = time.monotonic()
        last = self._seen.get(msg)
        self._seen[msg] = now
        if len(self._seen) > 256:
            self._seen = {k: t for k, t in self._seen.items() if now - t < window_s}
        return last is None or now - last >= window_s


_HANDLER_NAME = "e2e_dist_run_log"


def _is_console(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
