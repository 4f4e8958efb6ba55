"""Stop one cluster's Ray processes on this machine, and nothing else: `e2e-dist cluster stop-ray --tag T`.

`ray stop` ends every Ray process of the user on the machine (and, as root, every user's), which on
a shared workstation or a GPU box that also runs someone else's Ray is not what `ray down` should
do. cluster/onprem.yaml starts Ray as `E2E_DIST_RAY_CLUSTER=<tag> ray start ...`: the variable is
set for that command alone (not in login shells), and every Ray process of the node - GCS, raylet,
dashboard, agents, the client server, workers and job drivers - inherits it from its parent. This
module ends the processes whose environment carries the tag: SIGTERM first (Ray's daemons shut
down cleanly on it), SIGKILL for whatever is left after the grace period, as `ray stop` does.
"""

from __future__ import annotations

import os

from e2e_dist.errors import UserError

TAG_VAR = "E2E_DIST_RAY_CLUSTER"


def tagged_processes(tag: str) -> list:
    """Live processes whose environment has E2E_DIST_RAY_CLUSTER=tag (not this process or its
    ancestors: the shell that runs the stop may carry the tag too)."""
    import psutil

    spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in spare:
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # another user's process (not ours to stop), or already gone
    return found


def stop_tagged(tag: str, grace_s: float = 10.0) -> tuple[int, int]:
    """End the tagged processes; returns (how many got SIGTERM, how many needed SIGKILL)."""
    import psutil

    if not tag or "=" in tag:
        raise UserError(f"stop-ray: bad tag {tag!r} (the value of {TAG_VAR} given to `ray start`)")
    procs = tagged_processes(tag)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs), len(alive)
