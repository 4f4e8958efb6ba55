"""Deliberate failures for recovery tests and drills: `E2E_DIST_FAULT=crash@STEP[:RANK][,...]`.

`crash` kills the worker process outright (as a dying node would); `sigterm` sends it SIGTERM (as
a spot reclaim or Kubernetes eviction would); `hold` stalls the rank at that step until Ray ends
its process (a worker group replaced while it waits: a drill changes the cluster at a known point,
e.g. removes a node; after HOLD_LIMIT_S it exits as a crash, so a forgotten hold never hangs a run).
Several faults may be listed, comma-separated. Each fires once per run (a marker file in
`fault_marker_dir` records it), so the restarted worker group trains through the same step.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from pathlib import Path

KINDS = ("crash", "sigterm", "hold")
HOLD_LIMIT_S = 600.0


def fault_marker_dir(run_uri: str) -> str:
    """Where fired faults are recorded: $E2E_DIST_FAULT_DIR, else a temp folder of this run's own."""
    explicit = os.environ.get("E2E_DIST_FAULT_DIR")
    if explicit:
        return explicit
    return str(Path(tempfile.gettempdir()) / f"e2e-dist-faults-{hashlib.sha1(run_uri.encode()).hexdigest()[:10]}")


def parse_faults(spec: str | None) -> list[tuple[str, int, int]]:
    """`crash@12:1,sigterm@20` -> [("crash", 12, 1), ("sigterm", 20, 0)]."""
    faults = []
    for item in filter(None, (spec or "").split(",")):
        kind, _, rest = item.strip().partition("@")
        step, _, rank = rest.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"E2E_DIST_FAULT={spec!r}: expected KIND@STEP[:RANK] with KIND one of "
                             f"{', '.join(KINDS)}, comma-separated")
        faults.append((kind, int(step), int(rank or 0)))
    return faults


def maybe_inject_fault(spec: str | None, marker_dir: str, run_name: str, step: int, rank: int) -> None:
    for kind, at, fault_rank in parse_faults(spec):
        if at != step or fault_rank != rank:
            continue
        Path(marker_dir).mkdir(parents=True, exist_ok=True)
        marker = Path(marker_dir) / f"e2e-dist-fault-{run_name}-{kind}-{step}-{rank}"
        if marker.exists():
            continue
        marker.write_text(str(os.getpid()))
        if kind == "crash":
            os._exit(17)
        if kind == "hold":
            time.sleep(HOLD_LIMIT_S)
            os._exit(17)
        os.kill(os.getpid(), signal.SIGTERM)
