"""A local multi-node cluster on loopback (head + 1 worker node, 1 CPU each; any user can start it):
every node on 127.0.0.1 with its own temp dir and HOME, a job's tasks run on both nodes, and
stopping the cluster ends exactly the processes it started. Training, Ray Jobs and S3 across
nodes are tested on separate hosts (test_separate_hosts.py); the fast checks need no cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from e2e_dist.cli import main
from e2e_dist.cluster import commands, jobs, local_record
from e2e_dist.cluster.local import LocalCluster
from e2e_dist.cluster.local_node import LocalNode, node_pids, stop_node
from e2e_dist.train.ray_env import (
    TRAIN_CONTROLLER_ENV,
    WORKER_SETUP_HOOK,
    _cluster_runtime_env,
)
from tests.helpers.processes import alive, bystander

ROOT = Path(__file__).resolve().parents[2]


def _alive_nodes(url: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=url, limit=100, raise_on_missing_output=False) if n.state == "ALIVE"]


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(nodes=1, num_cpus_per_node=1, object_store_memory=100 * 2**20, auth_mode="disabled") as c:
        yield c


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_have_own_dirs_and_loopback_addresses(cluster: LocalCluster) -> None:
    nodes = _alive_nodes(cluster.dashboard_url)
    assert len(nodes) == 2
    assert {n.node_ip for n in nodes} == {"127.0.0.1"}  # never the machine's primary address
    assert len({n.temp_dir for n in cluster.nodes}) == 2 and all((n.temp_dir / "session_latest").exists()
                                                                 for n in cluster.nodes)
    assert len({n.home for n in cluster.nodes}) == 2


# Two 1-CPU tasks at once on a cluster of two 1-CPU nodes: one lands on each.
SPREAD = """
import json, ray
ray.init()
@ray.remote(num_cpus=1)
def where():
    import os, time
    time.sleep(2)
    return ray.get_runtime_context().get_node_id(), os.environ["HOME"]
print("WHERE " + json.dumps(ray.get([where.remote() for _ in range(2)])), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_runs_on_both_nodes_each_in_its_own_home(cluster: LocalCluster) -> None:
    url = cluster.dashboard_url
    job_id = jobs.submit([sys.executable, "-c", SPREAD], address=url, working_dir=None, submission_id="spread")
    assert jobs.wait(job_id, url, timeout_s=180) == "SUCCEEDED", jobs.logs(job_id, url)[-3000:]
    log = jobs.logs(job_id, url)
    ran = json.loads(next(ln for ln in log.splitlines() if ln.startswith("WHERE "))[len("WHERE "):])
    assert {node for node, _ in ran} == {n.node_id for n in _alive_nodes(url)}
    assert {home for _, home in ran} == {str(n.home) for n in cluster.nodes}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_ends_exactly_what_it_started(cluster: LocalCluster) -> None:
    """Runs last in this module: stops the shared cluster."""
    with bystander() as other:
        started = cluster.pids()
        assert len(started) >= 6  # per node: ray start, raylet, agents ...; head: gcs, dashboard
        cluster.stop()
        assert not [p for p in started if alive(p)], "processes of the cluster survived stop()"
        assert other.poll() is None, "stop() killed a process it did not start"
        assert not cluster.base_dir.exists()


def _wait_for_text(path: Path, text: str, timeout_s: float, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = path.read_text(errors="replace")
        if text in found:
            return found
        assert proc.poll() is None, f"`e2e-dist cluster local` exited ({proc.returncode}):\n{found[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} after {timeout_s:.0f}s:\n{path.read_text(errors='replace')[-3000:]}")


NODE_LINE = re.compile(r"  node (\w+) *: 127\.0\.0\.1 +pid (\d+), dir (\S+), log (\S+)")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_local_goes_on_when_a_worker_node_is_lost(tmp_path: Path) -> None:
    """`e2e-dist cluster local --nodes 1` (its own dirs and ports on 127.0.0.1): the worker node's
    processes are killed, as when a machine is lost; the command names it and its log once and
    keeps the head; SIGTERM then stops everything it started and keeps the logs."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    argv = [sys.executable, "-m", "e2e_dist.cli", "cluster", "local", "--nodes", "1", "--auth", "disabled",
            "--object-store-mb", "100"]
    # its own cache folder: where it records its address for `--address auto` (cluster/local_record.py)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")},
           "E2E_DIST_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(argv, stdout=out.open("w"), stderr=err.open("w"), cwd=ROOT, start_new_session=True,
                            env=env)
    nodes: dict[str, LocalNode] = {}
    try:
        started = _wait_for_text(out, "Ctrl-C stops", 300, proc)
        for name, pid, d, log in NODE_LINE.findall(started):
            nodes[name] = LocalNode(name=name, temp_dir=Path(d) / "ray", log_path=Path(log), pid=int(pid),
                                    ip="127.0.0.1")
        assert sorted(nodes) == ["head", "worker1"], started
        _train_joins_the_running_cluster(tmp_path, env)
        head_pids, worker = node_pids(nodes["head"]), nodes["worker1"]
        os.killpg(worker.pgid, signal.SIGKILL)  # the machine is gone: its `ray start` and raylet at once

        said = _wait_for_text(err, "ray node worker1 exited", 60, proc)
        assert f"the rest of the cluster goes on (its log: {worker.log_path})" in said
        time.sleep(3)  # a few more watch rounds: nothing else happens
        assert proc.poll() is None and len(err.read_text().splitlines()) == 1, err.read_text()
        assert nodes["head"].alive() and all(alive(p) for p in head_pids)
        assert not node_pids(worker), "processes of the lost node outlived it"

        proc.send_signal(signal.SIGTERM)  # as a CI runner stops it; Ctrl-C goes the same way
        assert proc.wait(timeout=120) == 0, err.read_text()
        assert not [p for p in head_pids if alive(p)], "processes of the cluster survived SIGTERM"
        base = worker.log_path.parent
        assert f"stopping ... (logs kept in {base}: worker1 exited)" in err.read_text()
        assert worker.log_path.is_file()  # what explains the lost node is still there
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for node in nodes.values():
            stop_node(node, timeout_s=10)
        if nodes:
            shutil.rmtree(nodes["head"].log_path.parent, ignore_errors=True)


def _train_joins_the_running_cluster(tmp_path: Path, env: dict[str, str]) -> None:
    """`e2e-dist train --address auto` beside a running `cluster local`: joins it (no Ray of its
    own started), and its log file holds the start-up timeline, driver and rank 0 phases together."""
    run = subprocess.run([sys.executable, "-m", "e2e_dist.cli", "train", "tiny-text", "--address", "auto", "--quiet",
                          "--set", "trainer.max_steps=2", "--set", "trainer.num_workers=1", "--set", "data.max_files=20",
                          "--set", f"storage.path={tmp_path}/runs"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    first = re.search(r"start-up +first step at ([\d.]+) s", run.stdout)
    assert first, run.stdout
    log = Path(re.search(r"log file +(\S+\.log)", run.stdout).group(1)).read_text()
    assert "Started a local Ray instance" not in log and not (tmp_path / ".cache" / "ray").exists()
    timeline = log[log.index("timeline, seconds from the process start"):]
    marks = [line.split(")", 1)[1].strip() for line in timeline.splitlines()[1:] if line.startswith("  +")]
    for phase in ("config checked", "Ray up", "data ready", "trainer started", "worker process started",
                  "engine built", "first batch", "first step", "fit returned"):
        assert phase in marks, (phase, timeline[:2000])
    assert marks.index("trainer started") < marks.index("engine built") < marks.index("first step")


# ------------------------------------------------------------------ fast checks (no cluster)
class _FakeNode:
    """alive() until `dies_at` watch rounds have passed; at the `sigterm_at` round the head sends SIGTERM to
    this process, as a CI runner stopping `e2e-dist cluster local` does."""

    def __init__(self, name: str, rounds: list[int], dies_at: int | None = None, sigterm_at: int | None = None):
        self.name, self.log_path, self.pid = name, Path(f"/tmp/e2elc-fake/{name}.log"), 1
        self.temp_dir, self.ip, self._rounds = Path(f"/tmp/e2elc-fake/{name}/ray"), "127.0.0.1", rounds
        self._dies_at, self._sigterm_at = dies_at, sigterm_at

    def alive(self) -> bool:
        if self._sigterm_at is not None:  # the head is asked first every round: it counts them
            self._rounds[0] += 1
            if self._rounds[0] == self._sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
        return self._dies_at is None or self._rounds[0] < self._dies_at


class _FakeCluster:
    def __init__(self, nodes: list[_FakeNode]):
        self.nodes, self.home, self.base_dir = nodes, Path("/tmp/e2elc-fake/home"), Path("/tmp/e2elc-fake")
        self.address, self.dashboard_url = "127.0.0.1:6390", "http://127.0.0.1:8290"
        self.removed: list[str] = []
        self.stops: list[bool] = []

    def start(self) -> "_FakeCluster":
        return self

    def describe(self) -> str:
        return "local Ray cluster: fake"

    def remove_worker(self, node: _FakeNode) -> None:
        self.removed.append(node.name)

    def stop(self, keep_dirs: bool = False) -> None:
        self.stops.append(keep_dirs)


def _run_cluster_local(monkeypatch: pytest.MonkeyPatch, nodes: list[_FakeNode]) -> tuple[int, _FakeCluster]:
    made: list[_FakeCluster] = []
    monkeypatch.setattr("e2e_dist.cluster.local.LocalCluster", lambda **kw: made.append(_FakeCluster(nodes)) or made[0])
    monkeypatch.setattr(commands, "WATCH_INTERVAL_S", 0.01, raising=False)
    monkeypatch.setenv("E2E_DIST_CACHE", tempfile.mkdtemp(prefix="e2elc-cache-"))  # where it records its address
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    rc = main(["cluster", "local", "--nodes", str(len(nodes) - 1), "--auth", "disabled"])
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # put back as they were
    return rc, made[0]


def test_cluster_local_names_a_lost_worker_node_and_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rounds = [0]
    head = _FakeNode("head", rounds, sigterm_at=8)
    nodes = [head, _FakeNode("worker1", rounds, dies_at=3), _FakeNode("worker2", rounds)]
    rc, cluster = _run_cluster_local(monkeypatch, nodes)
    out, err = capsys.readouterr()
    err = err.splitlines()
    # while it ran, `--address auto` would join it: it said so and recorded where; stopped, no record
    record = local_record.record_path()
    assert f"--address auto   (joins this cluster: {record})" in out and not record.exists()
    assert rc == 0 and rounds[0] == 8  # watched on after the loss, until SIGTERM
    assert err == ["ray node worker1 exited; the rest of the cluster goes on (its log: /tmp/e2elc-fake/worker1.log)",
                   "stopping ... (logs kept in /tmp/e2elc-fake: worker1 exited)"]
    assert cluster.removed == ["worker1"] and cluster.stops == [True]


def test_cluster_local_stops_when_the_head_exits(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rounds = [0]
    head = _FakeNode("head", rounds, dies_at=3, sigterm_at=100)
    rc, cluster = _run_cluster_local(monkeypatch, [head, _FakeNode("worker1", rounds)])
    assert rc == 1 and capsys.readouterr().err.splitlines() == [
        "ray head node exited; stopping the cluster (its log: /tmp/e2elc-fake/head.log)"]
    assert cluster.removed == [] and cluster.stops == [True]


def test_unreachable_jobs_api_is_one_line() -> None:
    with pytest.raises(jobs.JobsError) as err:
        jobs.client("http://127.0.0.1:1")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot reach the Ray Jobs API at http://127.0.0.1:1")


def test_submit_needs_a_command_and_well_formed_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "--address", "http://127.0.0.1:1", "--"]) == 2
    assert "no command" in capsys.readouterr().err
    assert main(["submit", "--env", "JUSTANAME", "--", "true"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert main(["jobs", "list", "--address", "ray://127.0.0.1:10001"]) == 2
    assert "not ray://" in capsys.readouterr().err


def test_forwarded_env_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("E2E_DIST_FAULT", "kill-rank-1")
    monkeypatch.setenv("UNRELATED_VAR", "x")
    env = jobs.forwarded_env({"EXTRA": "1"})
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and env["E2E_DIST_FAULT"] == "kill-rank-1" and env["EXTRA"] == "1"
    assert "UNRELATED_VAR" not in env
    runtime_env = jobs.build_runtime_env(ROOT, env)
    assert runtime_env["working_dir"] == str(ROOT) and ".venv" in runtime_env["excludes"]
    assert runtime_env["env_vars"] == env and runtime_env["worker_process_setup_hook"] == WORKER_SETUP_HOOK
    assert jobs.cluster_entrypoint(["e2e-dist", "sweep", "s.yaml"]) == ["e2e-dist", "sweep", "s.yaml", "--address", "auto"]
    assert jobs.cluster_entrypoint(["e2e-dist", "train", "x", "--address=ray://h:1"])[-1] == "--address=ray://h:1"
    assert jobs.cluster_entrypoint(["python", "x.py"]) == ["python", "x.py"]
    assert jobs.redact_entrypoint("e2e-dist train x --set tracking.api_key=abc --set a=1") == \
        "e2e-dist train x --set 'tracking.api_key=***' --set a=1"


def test_driver_adds_the_hook_only_where_ray_merges_and_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    # a driver outside any job: no job runtime_env to merge with, so Train's controller settings too
    assert _cluster_runtime_env("127.0.0.1:6379") == {**ours, "env_vars": TRAIN_CONTROLLER_ENV}
    assert _cluster_runtime_env("ray://127.0.0.1:10001") is None  # Ray Client never runs the hook

    def job(runtime_env: dict) -> None:
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": runtime_env, "metadata": {}}))

    job({"env_vars": {"A": "1"}, "working_dir": "gcs://x.zip"})
    assert _cluster_runtime_env("auto") == ours  # `ray job submit` without the hook: merged in
    job({"env_vars": {}, **ours})
    assert _cluster_runtime_env("auto") is None  # `e2e-dist submit` put it there already
    job({"worker_process_setup_hook": "theirs.setup"})
    assert _cluster_runtime_env("auto") is None  # the user's own hook is kept (a warning says so)


def test_separate_hosts_without_root_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["cluster", "local", "--separate-hosts", "--auth", "disabled"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("e2e-dist: error: separate hosts: network namespaces need root") and "\n" not in err
    assert main(["cluster", "local", "--expose", "9000"]) == 2
    assert "--expose: only with --separate-hosts" in capsys.readouterr().err
