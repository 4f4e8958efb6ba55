"""SIGTERM -> a just-in-time checkpoint, then a clean exit that Ray Train restarts from.

Spot reclaims and Kubernetes evictions send SIGTERM and wait a grace period (30 s to 2 min).
Ray runs our training function in a thread, where Python cannot install signal handlers, so the
handler is installed when each Ray Train worker process starts (runtime_env
`worker_process_setup_hook`, which runs in the process's main thread). The handler only sets a
flag; the loop reduces the flag across ranks at its next logging interval (no extra collective
per step), and then every rank saves the same checkpoint before the signalled one exits.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("e2e_dist.train")
_requested = threading.Event()
SETUP_HOOK = "e2e_dist.train.preemption.install_sigterm_handler"


def _on_sigterm(signum, frame) -> None:
    _requested.set()


def install_sigterm_handler() -> None:
    """Runs at worker-process start (main thread): SIGTERM sets a flag instead of killing us."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
    """Whether this process got SIGTERM since it started."""
    return _requested.is_set()
