"""Which cluster `e2e-dist cluster local` keeps up on this machine: what `--address auto` joins.

A run that joins a running local cluster skips Ray's start (~5 s of a cold 1-step run on 2 cores,
more under load) and finds Ray's workers and dashboard warm. Ray's own `address="auto"` is not
used: it picks whichever cluster it finds first (/tmp/ray) when several share a machine, and ours
run with their own temp dirs. So `cluster local` writes its GCS address and PID to
`<cache>/local-cluster.json` once its nodes are up, removes it when it stops, and a record whose
process is gone counts as no cluster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from e2e_dist.errors import UserError

AUTO = "auto"
ADDRESS_HELP = ("Ray cluster address (host:port, ray://...); `auto`: $RAY_ADDRESS, else the cluster `e2e-dist "
                "cluster local` keeps up on this machine (no Ray start per run); default: a private local Ray")


def record_path() -> Path:
    from e2e_dist.data.images import cache_root

    return cache_root() / "local-cluster.json"


def write_record(address: str, dashboard_url: str) -> Path:
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": address, "dashboard": dashboard_url, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def clear_record() -> None:
    """Remove the record if this process wrote it (another `cluster local` may have replaced it)."""
    path = record_path()
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def running_cluster() -> dict | None:
    """The record of a `cluster local` still running on this machine, else None."""
    try:
        rec = json.loads(record_path().read_text())
    except (OSError, ValueError):
        return None
    pid = rec.get("pid")
    return rec if isinstance(pid, int) and _alive(pid) and rec.get("address") else None


def resolve_address(address: str | None) -> str | None:
    """`--address`: `auto` becomes $RAY_ADDRESS, else the running `cluster local`'s GCS address;
    anything else is returned as given (None: a private local Ray)."""
    if address != AUTO:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    rec = running_cluster()
    if rec is None:
        raise UserError(f"--address auto: no cluster to join (no $RAY_ADDRESS, and no `e2e-dist cluster local` "
                        f"running on this machine: {record_path()}); start one, or leave --address out")
    return rec["address"]
