"""Live progress of a run on the driver's terminal.

Rank 0 pushes its latest metrics to a tiny Ray actor (fire-and-forget, never blocks a step); the
driver polls the actor and renders a rich progress bar on a TTY, or one plain line per update
otherwise (CI logs, `ray job logs`).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressActor:
    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def put(self, state: dict[str, Any]) -> None:
        self.state = state

    def get(self) -> dict[str, Any]:
        return self.state


class ProgressSink:
    """Worker side: rank 0 forwards updates; every other rank (or no actor) does nothing."""

    def __init__(self, actor) -> None:
        self.actor = actor

    @classmethod
    def connect(cls, actor, rank: int) -> "ProgressSink":
        return cls(actor if rank == 0 else None)

    def update(self, step: int, total: int, metrics: dict[str, Any], done: bool = False) -> None:
        if self.actor is None:
            return
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.actor.put.remote({"step": step, "total": total, "metrics": clean, "done": done})


_SHOWN = ("loss", "val_loss", "val_bpb", "val_acc", "val_cer", "tokens_per_s", "samples_per_s", "mfu")


def _fmt(metrics: dict[str, float]) -> str:
    parts = []
    for k in _SHOWN:
        if k in metrics:
            v = metrics[k]
            parts.append(f"{k}={v:.4g}" if abs(v) < 1e4 else f"{k}={v:,.0f}")
    return " ".join(parts)


class ProgressDisplay:
    """Driver side: a background thread that renders what the actor holds."""

    def __init__(self, run_name: str, interval_s: float = 1.0, quiet: bool = False) -> None:
        self.actor = ProgressActor.remote()
        self.run_name, self.interval_s, self.quiet = run_name, interval_s, quiet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        if not self.quiet:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        ray.kill(self.actor)

    def _poll(self) -> dict[str, Any]:
        try:
            return ray.get(self.actor.get.remote(), timeout=5)
        except Exception:  # the display must never take a run down
            return {}

    def _run(self) -> None:
        if sys.stdout.isatty():
            self._run_rich()
        else:
            self._run_plain()

    def _run_plain(self) -> None:
        last_step = -1
        while not self._stop.wait(self.interval_s):
            s = self._poll()
            if s and s["step"] != last_step:
                last_step = s["step"]
                print(f"[{self.run_name}] step {s['step']}/{s['total']} {_fmt(s['metrics'])}", flush=True)

    def _run_rich(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*cols, transient=False) as bar:
            task = bar.add_task(self.run_name, total=None, info="starting workers...")
            while not self._stop.wait(self.interval_s):
                s = self._poll()
                if s:
                    bar.update(task, completed=s["step"], total=s["total"], info=_fmt(s["metrics"]))
