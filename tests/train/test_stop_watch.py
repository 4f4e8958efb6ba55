"""A sweep trial's rank 0 learns of the scheduler's stop from the board within its poll interval."""

from __future__ import annotations

import threading
import time

from e2e_dist.train.stop_watch import StopWatch


class _Board:
    """What TrialStop offers the watch: `requested()`, here set by the test (the board is a Ray actor)."""

    def __init__(self) -> None:
        self.decision, self.calls = None, 0
        self.lock = threading.Lock()

    def requested(self):
        with self.lock:
            self.calls += 1
            return self.decision


def _wait(cond, timeout_s: float = 5.0) -> bool:
    end = time.time() + timeout_s
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_rank_0_sees_the_stop_within_a_poll_and_other_ranks_never_poll() -> None:
    board = _Board()
    watch, other = StopWatch(board, rank=0, every_s=0.05), StopWatch(board, rank=1, every_s=0.05)
    assert _wait(lambda: board.calls >= 3) and not watch.requested
    board.decision = {"step": 8, "by": "asha", "at": time.time()}
    assert _wait(lambda: watch.requested, timeout_s=1.0)
    calls = board.calls
    time.sleep(0.2)
    assert board.calls == calls  # it stops polling once it knows
    assert not other.requested and StopWatch(None, rank=0).requested is False
    watch.close()
    other.close()


def test_a_board_that_fails_is_asked_again_and_close_ends_the_thread() -> None:
    class Flaky(_Board):
        def requested(self):
            super().requested()
            raise RuntimeError("actor gone")

    board = Flaky()
    watch = StopWatch(board, rank=0, every_s=0.02)
    assert _wait(lambda: board.calls >= 3) and not watch.requested
    watch.close()
    time.sleep(0.1)
    calls = board.calls
    time.sleep(0.1)
    assert board.calls == calls
