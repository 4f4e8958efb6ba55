"""`e2e-dist cluster stop-ray --tag T`: ends the processes started under E2E_DIST_RAY_CLUSTER=T (and
their children, which inherit it) and nothing else - not another cluster's, not untagged ones, not
the shell that runs it. The full `ray up` / `ray down` flow: test_ray_up_ssh.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from e2e_dist.cli import main

SLEEPER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"


def spawn(tag: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "E2E_DIST_RAY_CLUSTER"}
    if tag is not None:
        env["E2E_DIST_RAY_CLUSTER"] = tag
    return subprocess.Popen([sys.executable, "-c", SLEEPER], env=env)


def alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_ray_ends_only_the_tagged_cluster(monkeypatch, capsys):
    import psutil

    ours, theirs, untagged = spawn("lab-a"), spawn("lab-b"), spawn(None)
    try:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(ours.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the sleeper's own child is up
        assert children
        # the shell running the stop carries the tag too (it may have started Ray): spared
        monkeypatch.setenv("E2E_DIST_RAY_CLUSTER", "lab-a")
        assert main(["cluster", "stop-ray", "--tag", "lab-a", "--grace", "5"]) == 0
        assert capsys.readouterr().out.startswith("stopped 2 Ray process(es) of cluster 'lab-a'")
        assert ours.wait(timeout=10) is not None and not any(alive(c) for c in children)
        assert theirs.poll() is None and untagged.poll() is None
    finally:
        for p in (ours, theirs, untagged):
            p.kill()
            p.wait()


def test_stop_ray_ends_children_that_no_longer_show_the_tag(capsys):
    """Ray's Python processes rename themselves (`ray::DashboardAgent`), and a long title overwrites
    what /proc shows as their environment: a tagged process's child counts as the cluster's even
    when its environment has no tag (here: started with an empty one)."""
    import psutil

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], env={}); time.sleep(120)"
    env = {k: v for k, v in os.environ.items() if k != "E2E_DIST_RAY_CLUSTER"}
    ours, untagged = subprocess.Popen([sys.executable, "-c", code], env=dict(env, E2E_DIST_RAY_CLUSTER="lab-c")), spawn(None)
    try:
        deadline = time.monotonic() + 30
        while not (children := psutil.Process(ours.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children and "E2E_DIST_RAY_CLUSTER" not in children[0].environ()
        assert main(["cluster", "stop-ray", "--tag", "lab-c", "--grace", "5"]) == 0
        assert capsys.readouterr().out.startswith("stopped 2 Ray process(es) of cluster 'lab-c'")
        assert ours.wait(timeout=10) is not None and not any(alive(c) for c in children)
        assert untagged.poll() is None
    finally:
        for p in (ours, untagged):
            p.kill()
            p.wait()


def test_stop_ray_refuses_a_tag_that_could_match_anything(capsys):
    assert main(["cluster", "stop-ray", "--tag", ""]) == 2
    assert "stop-ray: bad tag ''" in capsys.readouterr().err


def test_workers_of_stops_the_tag_on_every_worker_over_ssh(tmp_path, monkeypatch, capsys):
    """`--workers-of BOOTSTRAP` (onprem.yaml's `ray stop` on the head) runs the same stop on each of
    the config's worker_ips over SSH, with the launcher's key and user; a missing file (a worker
    machine) means this machine only. The real SSH round trip: test_ray_up_ssh.py."""
    log = tmp_path / "ssh.log"
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    boot = tmp_path / "ray_bootstrap_config.yaml"
    boot.write_text("provider: {type: local, head_ip: 10.0.0.1, worker_ips: [10.0.0.2, 10.0.0.3]}\n"
                    "auth: {ssh_user: ops, ssh_private_key: ~/ray_bootstrap_key.pem}\n")
    assert main(["cluster", "stop-ray", "--tag", "lab-a", "--grace", "1", "--workers-of", str(boot)]) == 0
    calls = sorted(log.read_text().splitlines())
    assert [c.split()[c.split().index("-i") + 2] for c in calls] == ["ops@10.0.0.2", "ops@10.0.0.3"], calls
    assert all(os.path.expanduser("~/ray_bootstrap_key.pem") in c and "stop-ray --tag lab-a --grace 1" in c
               for c in calls), calls
    log.unlink()
    assert main(["cluster", "stop-ray", "--tag", "lab-a", "--workers-of", str(tmp_path / "absent.yaml")]) == 0
    assert not log.exists()
    fake.write_text("#!/bin/sh\necho 'connection refused' >&2; exit 255\n")
    assert main(["cluster", "stop-ray", "--tag", "lab-a", "--grace", "1", "--workers-of", str(boot)]) == 1
    assert "stop-ray on worker 10.0.0.2: exit 255: connection refused" in capsys.readouterr().err
