"""Where a run's seconds go before its first step: one timeline, driver and rank 0 together.

Every run pays a fixed cost before it trains (Ray up, data planned, workers started, imports,
engine built, first batch) whatever its length, and a sweep pays it per trial. The driver marks
its phases; rank 0 marks its own against the driver's start (`t0`, wall-clock seconds, shipped in
the loop config) and sends them back as `startup/<phase>_s` metrics, so they reach the driver, the
run summary, W&B's summary and a sweep's results rows without another channel. The driver writes
the merged timeline to the run's log file. Wall clocks of different nodes can differ by a few ms
(NTP); a phase read across nodes is good to that.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

log = logging.getLogger("e2e_dist.launcher")

PREFIX = "startup/"
"""Metric keys of the worker's phases: `startup/<phase>_s`, seconds since the driver's start."""

WORKER_PHASES = ("worker process started", "training function entered", "engine built", "checkpoint restored",
                 "W&B started", "first batch", "first step")
"""Rank 0's marks, in the order they happen."""


def process_start() -> float:
    """When this process started (wall clock): the interpreter's start and imports count too."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - psutil comes with Ray; without it, from the first mark
        return time.time()


def metric_key(phase: str) -> str:
    return PREFIX + phase.replace(" ", "_").replace("&", "and").lower() + "_s"


@dataclass
class Timeline:
    """Marks of one process against a start `t0` (wall-clock seconds)."""

    t0: float = field(default_factory=process_start)
    marks: list[tuple[str, float]] = field(default_factory=list)
    _once: set[str] = field(default_factory=set, init=False, repr=False)

    def mark(self, phase: str, at: float | None = None) -> None:
        self.marks.append((phase, time.time() if at is None else at))

    def mark_once(self, phase: str) -> bool:
        """Mark `phase` unless this did already (a set lookup: cheap enough to ask every
        micro-batch); whether it marked now."""
        if phase in self._once:
            return False
        self._once.add(phase)
        self.mark(phase)
        return True

    def metrics(self) -> dict[str, float]:
        """`startup/<phase>_s`: seconds from t0, rounded to ms (what a worker reports)."""
        return {metric_key(p): round(at - self.t0, 3) for p, at in self.marks}

    def add_reported(self, metrics: dict) -> None:
        """Rank 0's phases from its reported metrics, placed on this (the driver's) timeline."""
        for phase in WORKER_PHASES:
            v = metrics.get(metric_key(phase))
            if isinstance(v, (int, float)):
                self.marks.append((phase, self.t0 + v))

    def at(self, phase: str) -> float | None:
        """Seconds from t0 to the phase's first mark."""
        return next((round(t - self.t0, 3) for p, t in self.marks if p == phase), None)

    def render(self) -> str:
        """The timeline as lines: `+ 12.3 s (+ 4.1)  phase`, in time order."""
        lines, last = [], 0.0
        for phase, at in sorted(self.marks, key=lambda m: m[1]):
            s = at - self.t0
            lines.append(f"  +{s:7.2f} s  (+{s - last:6.2f})  {phase}")
            last = s
        return "\n".join(lines)

    def log(self, title: str) -> None:
        """Into the run's log file only (the console keeps our summary line)."""
        from e2e_dist.console import FILE_ONLY

        log.info("%s, seconds from the process start:\n%s", title, self.render(), extra=FILE_ONLY)


def worker_timeline(t0: float | None) -> Timeline:
    """Rank 0's timeline against the driver's start; its process start is the first mark (Ray
    started it for this run: the gap to the driver's 'trainer started' is Train's group start)."""
    tl = Timeline(t0=t0 if t0 is not None else process_start())
    tl.mark("worker process started", at=process_start())
    return tl


def startup_line(metrics: dict) -> str | None:
    """The summary's start-up line: seconds to the first step and the biggest parts, or None."""
    def at(phase: str) -> float | None:
        v = metrics.get(metric_key(phase))
        return v if isinstance(v, (int, float)) else None

    first = at("first step")
    if first is None:
        return None
    parts = []
    for label, begin, end in (("Ray", None, "Ray up"), ("data", "Ray up", "data ready"),
                              ("workers", "trainer started", "training function entered"),
                              ("engine", "training function entered", "engine built"),
                              ("W&B", "checkpoint restored", "W&B started"),
                              ("first batch", "W&B started", "first batch")):
        b, e = (0.0 if begin is None else at(begin)), at(end)
        if b is not None and e is not None:
            parts.append(f"{label} {e - b:.1f}")
    return f"first step at {first:.1f} s" + (f" ({', '.join(parts)} s)" if parts else "")
