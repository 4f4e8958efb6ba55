"""Live progress of a run on the driver's terminal.

Rank 0 pushes every update to a tiny Ray actor (fire-and-forget, never blocks a step; only the
last one waits until it arrived). The actor keeps them until the driver takes them: a rich
progress bar on a TTY shows the newest; otherwise (CI logs, `ray job logs`) every update becomes
one plain line, none dropped however fast the steps go. The actor lives on the driver's node,
so a lost worker node takes no progress with it.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressActor:
    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []

    def put(self, state: dict[str, Any]) -> None:
        self.pending.append(state)

    def drain(self) -> list[dict[str, Any]]:
        """Every update since the last drain, in order."""
        out, self.pending = self.pending, []
        return out


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
        ref = self.actor.put.remote({"step": step, "total": total, "metrics": clean, "done": done})
        if done:  # the run ends next: the last line must not be lost with this worker
            try:
                ray.get(ref, timeout=10)
            except Exception:  # noqa: BLE001 - the display must never take a run down
                pass


_SHOWN = ("loss", "val_loss", "val_bpb", "val_acc", "val_cer", "tokens_per_s", "samples_per_s", "mfu")


def _fmt(metrics: dict[str, float]) -> str:
    parts = []
    for k in _SHOWN:
        if k in metrics:
            v = metrics[k]
            parts.append(f"{k}={v:.4g}" if abs(v) < 1e4 else f"{k}={v:,.0f}")
    return " ".join(parts)


class ProgressDisplay:
    """Driver side: a background thread that renders what rank 0 pushed to the actor."""

    def __init__(self, run_name: str, interval_s: float = 1.0, quiet: bool = False,
                 ckpt_every: int | None = None, total: int | None = None, console: Any = None) -> None:
        """total: the run's steps (trainer.max_steps), shown before the workers report; console: a
        rich Console to draw the bar on (default: the bar on a terminal, plain lines elsewhere)."""
        from e2e_dist.train.ray_env import on_this_node

        # on the driver's node: an actor Ray put on a worker node died with it, and every progress
        # line after the node loss with it (the workers' updates are fire-and-forget)
        self.actor = ProgressActor.options(**on_this_node()).remote()
        self.run_name, self.interval_s, self.quiet, self.ckpt_every = run_name, interval_s, quiet, ckpt_every
        self.total, self.console = total, console
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

    def _info(self, s: dict[str, Any]) -> str:
        """The metrics worth a glance, and when the next checkpoint is due (the final one is at the end)."""
        text = _fmt(s["metrics"])
        if self.ckpt_every and s["step"] < s["total"]:
            text += f" next_ckpt={min((s['step'] // self.ckpt_every + 1) * self.ckpt_every, s['total'])}"
        return text

    def _drain(self) -> list[dict[str, Any]]:
        try:
            return ray.get(self.actor.drain.remote(), timeout=5)
        except Exception:  # the display must never take a run down
            return []

    def _run(self) -> None:
        if self.console is not None or sys.stdout.isatty():
            self._run_rich()
        else:
            self._run_plain()

    def _run_plain(self) -> None:
        last_step = -1
        while True:
            stopping = self._stop.wait(self.interval_s)
            for s in self._drain():  # one line per logged step; the final update repeats the last: once
                # (a group restarted from a checkpoint logs the steps since it again: shown again)
                if not (s["done"] and s["step"] == last_step):
                    last_step = s["step"]
                    print(f"[{self.run_name}] step {s['step']}/{s['total']} {self._info(s)}", flush=True)
            if stopping:  # the run ended: what arrived since the last poll is printed above
                return

    def _run_rich(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        with Progress(*cols, transient=False, console=self.console) as bar:
            task = bar.add_task(self.run_name, total=self.total, info="starting workers...")
            while not self._stop.wait(self.interval_s):
                updates = self._drain()
                if updates:
                    s = updates[-1]
                    bar.update(task, completed=s["step"], total=s["total"], info=self._info(s))
