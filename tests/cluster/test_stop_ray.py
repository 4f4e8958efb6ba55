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


def test_stop_ray_refuses_a_tag_that_could_match_anything(capsys):
    assert main(["cluster", "stop-ray", "--tag", ""]) == 2
    assert "stop-ray: bad tag ''" in capsys.readouterr().err
