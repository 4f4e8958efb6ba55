"""Process checks shared by the tests that stop what they started."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import Iterator


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def bystander() -> Iterator[subprocess.Popen]:
    """A process in its own session that is not ours to stop (like a colleague's Ray)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
