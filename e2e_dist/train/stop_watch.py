"""A sweep trial's stop, seen from its training loop (the flow: e2e_dist/sweep/early_stop.py).

Kept apart from sweep/early_stop.py so a training worker does not import Ray Tune for it."""

from __future__ import annotations

import threading
from typing import Any


class StopWatch:
    """In a trial's rank 0: polls the board every `every_s` in a daemon thread, so the training loop
    learns of the scheduler's stop within seconds and reports at its next logging step (its flag
    rides the metrics all-reduce there), instead of at its next evaluation or checkpoint, up to
    trainer.report_every steps later: a stopped trial lets go of its workers in seconds (measured
    in BENCHMARKS.md section 17). Other ranks and runs outside a sweep watch nothing."""

    def __init__(self, stop: Any, rank: int, every_s: float = 2.0) -> None:
        self._flag, self._closed = threading.Event(), threading.Event()
        if stop is not None and rank == 0:
            threading.Thread(target=self._poll, args=(stop, every_s), daemon=True, name="e2e-dist-stop-watch").start()

    def _poll(self, stop: Any, every_s: float) -> None:
        while not self._closed.is_set():
            try:
                if stop.requested() is not None:
                    self._flag.set()
                    return
            except Exception:  # noqa: BLE001 - the board is best effort; the next report still checks it
                pass
            self._closed.wait(every_s)

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    def close(self) -> None:
        self._closed.set()
