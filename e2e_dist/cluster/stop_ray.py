"""Stop one cluster's Ray processes on this machine, and nothing else: `e2e-dist cluster stop-ray --tag T`.

`ray stop` ends every Ray process of the user on the machine (and, as root, every user's), which on
a shared workstation or a GPU box that also runs someone else's Ray is not what `ray down` should
do. cluster/onprem.yaml starts Ray as `E2E_DIST_RAY_CLUSTER=<tag> ray start ...`: the variable is
set for that command alone (not in login shells), and every Ray process of the node - GCS, raylet,
dashboard, agents, the client server, workers and job drivers - inherits it from its parent. This
module ends the processes whose environment carries the tag, and their descendants (some of
which no longer show it: tagged_processes): SIGTERM first (Ray's daemons shut down cleanly on it),
SIGKILL for whatever is left after the grace period, as `ray stop` does.

With `--workers-of ~/ray_bootstrap_config.yaml` (what onprem.yaml's `ray stop` runs on every
machine: only the head has that file) it first stops the tag's processes here, then on each worker
machine of the `local` provider's `worker_ips`, over SSH as the launcher reaches them: `ray down`
itself stops Ray on the head only and merely marks the workers terminated.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from e2e_dist.errors import UserError

TAG_VAR = "E2E_DIST_RAY_CLUSTER"


def tagged_processes(tag: str) -> list:
    """Live processes whose environment has E2E_DIST_RAY_CLUSTER=tag, and every descendant of
    those (not this process or its ancestors: the shell that runs the stop may carry the tag too).
    Descendants count because /proc/PID/environ is not always readable as the tag: Ray's Python
    processes rename themselves (setproctitle: `ray::DashboardAgent`, `ray::RuntimeEnvAgent`,
    `ray::IDLE`), and a long title overwrites the memory /proc shows as their environment; they
    are still children of the tagged raylet when the stop runs."""
    import psutil

    spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in spare:
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found[proc.pid] = proc
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # another user's process (not ours to stop), or already gone
    for proc in list(found.values()):
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid not in spare)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return list(found.values())


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


def worker_addresses(bootstrap: Path) -> tuple[list[str], dict]:
    """The worker machines of the cluster whose head this is, and the launcher's `auth` section,
    from the config `ray up` leaves on the head (~/ray_bootstrap_config.yaml); none on a worker."""
    import yaml

    if not bootstrap.is_file():
        return [], {}
    cfg = yaml.safe_load(bootstrap.read_text()) or {}
    provider = cfg.get("provider") or {}
    if provider.get("type") != "local":
        return [], {}  # cloud providers terminate their machines themselves
    return [str(ip) for ip in provider.get("worker_ips") or []], cfg.get("auth") or {}


def ssh_command(ip: str, auth: dict, remote: str) -> list[str]:
    """`remote` run on `ip` the way Ray's launcher runs commands there: its SSH options (the port
    and anything else from the user's ~/.ssh/config), key and user, in a login shell."""
    opts = ["-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={os.devnull}", "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10s", "-o", "BatchMode=yes"]
    if auth.get("ssh_private_key"):
        opts += ["-i", os.path.expanduser(str(auth["ssh_private_key"]))]
    if auth.get("ssh_proxy_command"):
        opts += ["-o", f"ProxyCommand={auth['ssh_proxy_command']}"]
    target = f"{auth['ssh_user']}@{ip}" if auth.get("ssh_user") else ip
    return ["ssh", *opts, target, "bash --login -c -i " + shlex.quote(f"source ~/.bashrc; {remote}")]


def stop_workers(tag: str, bootstrap: Path, grace_s: float = 10.0) -> list[str]:
    """On a head started by `ray up` with the `local` provider: stop the cluster's Ray on every
    worker machine too (over SSH, in parallel), which Ray's `ray down` does not do (it only marks
    them terminated). Returns one line per worker that could not be reached or stopped."""
    ips, auth = worker_addresses(bootstrap)
    remote = f"e2e-dist cluster stop-ray --tag {shlex.quote(tag)} --grace {grace_s:g}"
    procs = {ip: subprocess.Popen(ssh_command(ip, auth, remote), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for ip in ips}
    failed = []
    for ip, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=grace_s * 2 + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{ip}: exit {proc.returncode}: {out.strip()[-300:]}")
    return failed
