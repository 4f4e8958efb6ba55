"""Deliberate failures for recovery tests and drills: `E2E_DIST_FAULT=crash@STEP[:RANK]`.

`crash` kills the worker process outright (as a dying node would); `sigterm` sends it SIGTERM (as
a spot reclaim or Kubernetes eviction would). Each fault fires once per run name and step (a marker
file records it), so the restarted worker group trains through the same step.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path


def parse_fault(spec: str | None) -> tuple[str, int, int] | None:
    if not spec:
        return None
    kind, _, rest = spec.partition("@")
    step, _, rank = rest.partition(":")
    if kind not in ("crash", "sigterm") or not step.isdigit() or (rank and not rank.isdigit()):
        raise ValueError(f"E2E_DIST_FAULT={spec!r}: expected crash@STEP[:RANK] or sigterm@STEP[:RANK]")
    return kind, int(step), int(rank or 0)


def maybe_inject_fault(spec: str | None, run_name: str, step: int, rank: int) -> None:
    fault = parse_fault(spec)
    if fault is None or fault[1] != step or fault[2] != rank:
        return
    marker_dir = Path(os.environ.get("E2E_DIST_FAULT_DIR", tempfile.gettempdir()))
    marker = marker_dir / f"e2e-dist-fault-{run_name}-{fault[0]}-{step}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    if fault[0] == "crash":
        os._exit(17)
    os.kill(os.getpid(), signal.SIGTERM)
