"""The sweep's trials as rows: the live table while Tune runs, results.jsonl, the final sorted table.

A Ray Tune `Callback` (`SweepCallback`) forwards trial events to the `SweepBook` of the running
sweep. Tune pickles the callbacks into its `tuner.pkl` and, on `Tuner.restore`, runs the unpickled
copies, not new ones: so the callback holds only a key and looks the live book up in this process
(`register_book`), and a resumed sweep reports to the book of the resuming process.

A trial's status in results.jsonl (schema: e2e_dist/sweep/scaling.py):
- `completed`: Tune terminated it after its last report at `trainer.max_steps`;
- `stopped`: terminated earlier, by the scheduler (ASHA). Its metrics are the result the scheduler
  judged; the trial itself trains on to its next report and ends there, its W&B run finished with
  `stopped_early: 1` (early_stop.py);
- `error`: it failed (its error's last line is in `error`).
Trials an interrupt (Ctrl+C) cut short are not finished: they get no row and `--resume` runs them.
Tune marks such trials TERMINATED while it shuts down (ray 2.60 `_cleanup_trials`) but calls
`on_trial_complete` / `on_trial_error` only for real ends; with the trials an earlier session had
finished (`--resume`), that is how the book tells them apart.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from e2e_dist import storage
from e2e_dist.sweep.early_stop import DEFAULT_STOP_GRACE_S
from e2e_dist.sweep.spec import SweepSpec, flatten_params

TERMINATED, ERROR = "TERMINATED", "ERROR"
# Keys Tune adds to every result: bookkeeping, not what the trial measured.
_TUNE_KEYS = {"done", "trial_id", "date", "timestamp", "pid", "hostname", "node_ip", "config", "checkpoint_path",
              "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore",
              "experiment_tag", "should_checkpoint", "checkpoint_dir_name"}
_KEEP_STR = {"run_name", "precision", "stop_reason"}  # other string metrics (the generated sample) stay out of the table


def trial_index(spec: SweepSpec, trial_id: str) -> int | None:
    """The trial's index in its run name: grid sweeps derive it from the point (None here); random
    sweeps take Tune's trial counter (`<prefix>_00003` -> 3), stable across resumes."""
    if spec.search == "grid":
        return None
    return int(trial_id.rsplit("_", 1)[-1])


def clean_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """What the trial reported (numbers and a few labels), without Tune's bookkeeping."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if key in _TUNE_KEYS:
            continue
        if isinstance(value, bool) or (isinstance(value, str) and key not in _KEEP_STR):
            continue
        if isinstance(value, (int, float, str)):
            out[key] = value
    return out


@dataclass
class TrialRow:
    trial_id: str
    name: str
    params: dict[str, Any]
    max_steps: int
    state: str = "pending"
    """pending | running | completed | stopped | error | interrupted."""
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_result(self) -> dict[str, Any]:
        """One line of results.jsonl."""
        row: dict[str, Any] = {"trial": self.name, "status": self.state, "params": self.params,
                               "metrics": self.metrics, "tune_trial_id": self.trial_id}
        if self.error:
            row["error"] = self.error
        return row


class SweepBook:
    """Everything the driver process knows about the sweep's trials; renders and writes them."""

    def __init__(self, spec: SweepSpec, *, live: bool | None = None, out=None, board=None,
                 stop_grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        self.spec = spec
        self.board = board
        """The sweep's `StopBoard` actor (early_stop.py): told which trials the scheduler stopped."""
        self.stop_grace_s = stop_grace_s
        self.rows: dict[str, TrialRow] = {}
        self.ended_here: set[str] = set()
        self.ended_before: set[str] | None = None
        """Trials an earlier session of this sweep finished (restored as such by `--resume`)."""
        self.experiment_ended = False
        self.out = out or sys.stdout
        self.live = self.out.isatty() if live is None else live
        self._lock = threading.Lock()
        self._live_view = None
        self._last_render = 0.0

    # ------------------------------------------------------------------------------ trial events
    def row(self, trial) -> TrialRow:
        row = self.rows.get(trial.trial_id)
        if row is None:
            params = flatten_params(dict(trial.config))
            cfg = self.spec.run_config_for(dict(trial.config), index=trial_index(self.spec, trial.trial_id))
            row = self.rows[trial.trial_id] = TrialRow(trial.trial_id, cfg.name, params, cfg.trainer.max_steps)
        return row

    def sync(self, trial) -> TrialRow:
        """Bring a trial's row up to date from Tune's Trial object."""
        row = self.row(trial)
        result = trial.last_result or {}
        if any(k not in _TUNE_KEYS for k in result):
            # merged: a report between evaluations (a checkpoint) lacks the val metrics of the last one
            row.metrics = {**row.metrics, **clean_metrics(result)}
        status = trial.status
        if trial.trial_id in self.ended_here:
            pass  # decided when Tune ended it (its status may still read RUNNING then)
        elif trial.trial_id in (self.ended_before or ()) and status == ERROR:
            row.state, row.error = "error", row.error or _error_line(trial)
        elif trial.trial_id in (self.ended_before or ()) and status == TERMINATED:
            row.state = self._finish_state(row)
        elif status in (TERMINATED, ERROR):
            # Never ended in this session nor an earlier one: Tune's shutdown after Ctrl+C
            # terminated it (running, or starting up and not yet reported as started).
            row.state = "interrupted"
        else:
            row.state = "running" if status == "RUNNING" else "pending"
        return row

    @staticmethod
    def _finish_state(row: TrialRow) -> str:
        # A trial that early-stopped on its own plateau (trainer.early_stop_patience) finished its run.
        done = row.metrics.get("step") == row.max_steps or row.metrics.get("stop_reason") == "val_loss_plateau"
        return "completed" if done else "stopped"

    def on_session_start(self, trials) -> None:
        """Before Tune's first step: what an earlier session (restored by `--resume`) finished."""
        if self.ended_before is None:
            self.ended_before = {t.trial_id for t in trials if t.status in (TERMINATED, ERROR)}

    def on_start(self, trial) -> None:
        if self.ended_before is not None:
            self.ended_before.discard(trial.trial_id)  # an errored trial that --resume runs again
        self.ended_here.discard(trial.trial_id)  # a retried trial runs again
        self.sync(trial).state = "running"
        self._say(trial, "started")

    def on_result(self, trial, result: dict[str, Any]) -> None:
        row = self.row(trial)
        row.metrics = {**row.metrics, **clean_metrics(result)}
        row.state = "running"
        if not self.live:
            self._say(trial, f"step {row.metrics.get('step', '?')}/{row.max_steps} {_fmt_metrics(row.metrics, self.spec.metric)}")

    def on_end(self, trial, trials, *, error: bool) -> None:
        """Tune ended the trial: it returned, the scheduler stopped it, or it failed."""
        row = self.sync(trial)
        self.ended_here.add(trial.trial_id)
        if error:
            row.state, row.error = "error", _error_line(trial)
        else:
            row.state = self._finish_state(row)
            if row.state == "stopped":
                self._request_graceful_stop(trial, row)
        self._say(trial, row.state + (f": {row.error}" if row.error else ""))
        self.write_results(trials)

    def _request_graceful_stop(self, trial, row: TrialRow) -> None:
        """Tell the trial (through the board) that the scheduler stopped it: it ends at its next
        report, W&B run finished. Tune calls this (on_trial_complete) before it asks the trial's
        actor to stop, and the actor's cleanup reads the board, so the request is there in time."""
        if self.board is None:
            return
        import ray

        try:
            ray.get(self.board.request.remote(trial.trial_id, row.metrics.get("step"), self.spec.scheduler.type),
                    timeout=30)
        except Exception as e:  # noqa: BLE001 - the trial then ends as before (its W&B run unfinished)
            print(f"[{self.spec.name}] {row.name}: could not request a graceful stop ({e})", file=self.out)

    def await_stopping_trials(self, trials) -> None:
        """At the sweep's end, wait (at most `stop_grace_s`) for scheduler-stopped trials still ending.

        Tune gives a stopping trial's actor 10 s once the experiment ends (ray 2.60
        `TuneController._cleanup_stopping_actors(force_all=True)`, `_actor_force_cleanup_timeout`)
        and kills it after: a trial stopped last would lose its graceful end. So when every trial
        is finished, the last Tune step (on_step_end) waits here first."""
        if self.board is None or len(trials) < self.spec.num_trials():
            return
        if any(t.status not in (TERMINATED, ERROR) for t in trials):
            return
        import ray

        deadline = time.monotonic() + self.stop_grace_s
        while True:
            try:
                stopping = ray.get(self.board.stopping.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - never hang the sweep's end on the board
                return
            if not stopping or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def on_experiment_end(self, trials) -> None:
        self.on_session_start(trials)  # a resumed sweep with nothing left to run never steps
        self.experiment_ended = True
        for t in trials:
            self.sync(t)
        self.write_results(trials)
        self.stop_live()

    # ---------------------------------------------------------------------------------- results
    def finished_rows(self) -> list[TrialRow]:
        return sorted((r for r in self.rows.values() if r.state in ("completed", "stopped", "error")),
                      key=lambda r: r.name)

    def unfinished_rows(self) -> list[TrialRow]:
        return sorted((r for r in self.rows.values() if r.state not in ("completed", "stopped", "error")),
                      key=lambda r: r.name)

    def write_results(self, trials=()) -> list[dict[str, Any]]:
        """(Re)write results.jsonl with every finished trial, in trial-name order."""
        with self._lock:
            for t in trials:
                self.sync(t)
            rows = [r.to_result() for r in self.finished_rows()]
            text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
            storage.write_text(self.spec.results_uri, text, self.spec.base_config.storage)
        return rows

    # ---------------------------------------------------------------------------------- display
    def refresh(self) -> None:
        """Redraw the live table (TTY only), at most once a second."""
        if not self.live or time.monotonic() - self._last_render < 1.0:
            return
        self._last_render = time.monotonic()
        if self._live_view is None:
            from rich.console import Console
            from rich.live import Live

            self._live_view = Live(self.table("live"), console=Console(file=self.out), refresh_per_second=2,
                                   transient=True)
            self._live_view.start()
        else:
            self._live_view.update(self.table("live"))

    def stop_live(self) -> None:
        if self._live_view is not None:
            self._live_view.stop()
            self._live_view = None

    def _say(self, trial, what: str) -> None:
        if self.live:
            self.refresh()
        else:
            print(f"[{self.spec.name}] {self.row(trial).name} {what}", file=self.out, flush=True)

    def table(self, title: str = "final"):
        """A rich Table of the trials: by name while live, by the target metric at the end."""
        from rich.table import Table

        metric, sign = self.spec.metric, (1 if self.spec.mode == "min" else -1)

        def best_first(r: TrialRow) -> tuple:  # trials without the metric (errors) last
            v = r.metrics.get(metric)
            return (0, sign * v, r.name) if isinstance(v, (int, float)) else (1, 0, r.name)

        rows = sorted(self.rows.values(), key=(lambda r: r.name) if title == "live" else best_first)
        params = _param_columns(self.rows.values())
        table = Table(title=f"sweep {self.spec.name}: {_counts(self.rows.values())}"
                      + ("" if title == "live" else f" (sorted by {self.spec.metric}, {self.spec.mode})"))
        shown = list(dict.fromkeys(["loss", metric]))  # the target metric may be the train loss itself
        # The sizes a scaling fit uses: N (non-embedding parameters), D seen (tokens or samples
        # trained on) and the unique data behind it (the training subset).
        for col in ["trial", "status", *params.values(), "step", *shown, "N", "D seen", "D unique"]:
            table.add_column(col, justify="left" if col in ("trial", "status") else "right")
        for r in rows:
            m = r.metrics
            table.add_row(r.name, r.state + (f" ({r.error[:40]})" if r.error else ""),
                          *(_short(r.params.get(k)) for k in params), f"{m.get('step', '-')}/{r.max_steps}",
                          *(_num(m.get(k)) for k in shown), _num(m.get("n_params_non_embedding"), ","),
                          _num(m.get("tokens_seen", m.get("samples_seen")), ","),
                          _num(m.get("train_tokens", m.get("train_samples")), ","))
        return table


class SweepCallback(Callback):
    """Forwards Tune's trial events to the book registered under `key` in this process."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _book(self) -> SweepBook | None:
        return _BOOKS.get(self.key)

    def on_step_begin(self, iteration, trials, **info):
        if (book := self._book()) is not None:
            book.on_session_start(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        if (book := self._book()) is not None:
            book.on_start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (book := self._book()) is not None:
            book.on_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (book := self._book()) is not None:
            book.on_end(trial, trials, error=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        if (book := self._book()) is not None:
            book.on_end(trial, trials, error=True)

    def on_step_end(self, iteration, trials, **info):
        if (book := self._book()) is None:
            return
        book.await_stopping_trials(trials)
        if book.live:
            for t in trials:
                book.sync(t)
            book.refresh()

    def on_experiment_end(self, trials, **info):
        if (book := self._book()) is not None:
            book.on_experiment_end(trials)


_BOOKS: dict[str, SweepBook] = {}


def register_book(key: str, book: SweepBook | None) -> None:
    """Make `book` the one `SweepCallback(key)` reports to (None removes it)."""
    if book is None:
        _BOOKS.pop(key, None)
    else:
        _BOOKS[key] = book


# ---------------------------------------------------------------------------------- formatting
def _error_line(trial) -> str:
    """The last line of the trial's error trace: Tune writes it on the driver first (`error_file`)
    and syncs it to storage later (`get_error`)."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text()
        else:
            text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - a missing error file must not hide the trial's status
        pass
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "failed (no error file)")[:300]


def _param_columns(rows) -> dict[str, str]:
    """Swept keys -> column titles: the last part of the dotted key unless two share it."""
    keys = sorted({k for r in rows for k in r.params})
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _counts(rows) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _num(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _fmt_metrics(m: dict[str, Any], metric: str) -> str:
    keys = ["loss", metric] if metric != "loss" else ["loss"]
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
