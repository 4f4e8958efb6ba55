"""A local multi-node cluster on loopback (head + 1 worker node, 1 CPU each; any user can start it):
every node on 127.0.0.1 with its own temp dir and HOME, a job's tasks run on both nodes, and
stopping the cluster ends exactly the processes it started. Training, Ray Jobs and S3 across
nodes are tested on separate hosts (test_separate_hosts.py); the fast checks need no cluster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from e2e_dist.cli import main
from e2e_dist.cluster import jobs
from e2e_dist.cluster.local import LocalCluster
from e2e_dist.train.ray_env import WORKER_SETUP_HOOK, _cluster_runtime_env
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




# ------------------------------------------------------------------ fast checks (no cluster)
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
    assert _cluster_runtime_env("127.0.0.1:6379") == ours  # a driver outside any job
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
