"""SIGTERM -> a just-in-time checkpoint, then a clean exit that Ray Train restarts from.

Spot reclaims and Kubernetes evictions send SIGTERM and wait a grace period (30 s to 2 min).
Ray runs our training function in a thread, where Python cannot install signal handlers, so the
handler is installed when each worker process starts: the job-level runtime_env's
`worker_process_setup_hook` (set by `init_ray` for local instances and cluster drivers, and by
`e2e-dist submit` for jobs; Ray ignores it in an actor's runtime_env), which runs in the process's main thread. Ray's worker main loop
installs its own SIGTERM handler (exit at once) *after* that hook, so the hook also intercepts
that one call and keeps Ray's handler for a second SIGTERM. Our handler only sets a flag; the loop reduces the flag across ranks at its next logging
interval, inside the metrics all-reduce (no extra collective), and then every rank saves the same checkpoint before the signalled one exits.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("e2e_dist.train")
_requested = threading.Event()
_exit_handler: list = [None]  # the handler Ray wanted (exit now): used on a second SIGTERM


def _on_sigterm(signum, frame) -> None:
    if _requested.is_set() and callable(_exit_handler[0]):
        _exit_handler[0](signum, frame)  # asked twice: stop now, as Ray would have
    _requested.set()


def install_sigterm_handler() -> None:
    """Runs at worker-process start (main thread): SIGTERM sets a flag instead of killing us."""
    if threading.current_thread() is not threading.main_thread():
        return
    original = signal.signal

    def keep_ours(signum, handler):
        if signum == signal.SIGTERM and handler is not _on_sigterm:
            _exit_handler[0] = handler
            return original(signum, _on_sigterm)
        return original(signum, handler)

    signal.signal = keep_ours
    original(signal.SIGTERM, _on_sigterm)


def requested() -> bool:
    """Whether this process got SIGTERM since it started."""
    return _requested.is_set()
