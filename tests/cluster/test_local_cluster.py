"""A local multi-node cluster (head + 1 worker node, own temp dirs, 1 CPU each) and Ray Jobs on it.

`e2e-dist submit --follow` runs a 2-worker training run whose workers land on both nodes and
whose checkpoint is committed; `e2e-dist jobs stop` stops a running job; forwarded secrets reach
the job without being printed; stopping the cluster ends exactly the processes it started.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e_dist.cli import main
from e2e_dist.cluster import jobs
from e2e_dist.cluster.local import LocalCluster
from e2e_dist.train.ray_env import SIGTERM_SETUP_HOOK, _cluster_runtime_env

ROOT = Path(__file__).resolve().parents[2]


def _alive_nodes(url: str) -> list:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=url, limit=100, raise_on_missing_output=False) if n.state == "ALIVE"]


def _wait_status(job_id: str, url: str, wanted: set[str], timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        state = jobs.status(job_id, url).status
        if state in wanted:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state} after {timeout_s}s (wanted {wanted})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(nodes=1, num_cpus_per_node=1, object_store_memory=200 * 2**20, auth_mode="disabled",
                      home=tmp_path_factory.mktemp("cluster-home")) as c:
        yield c


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_have_own_temp_dirs_and_loopback_addresses(cluster: LocalCluster) -> None:
    nodes = _alive_nodes(cluster.dashboard_url)
    assert len(nodes) == 2
    assert {n.node_ip for n in nodes} == {"127.0.0.1"}  # never the machine's primary address
    temp_dirs = [n.temp_dir for n in cluster.nodes]
    assert len(set(temp_dirs)) == 2 and all((d / "session_latest").exists() for d in temp_dirs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submit_follow_trains_on_both_nodes(cluster: LocalCluster, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from ray.util.state import list_actors

    storage = tmp_path / "runs"
    rc = main([
        "submit", "--address", cluster.dashboard_url, "--follow", "--timeout", "480",
        "--working-dir", str(ROOT), "--submission-id", "cl-train",
        # As a user types it: submit adds `--address auto` so the run uses this cluster.
        "--", "e2e-dist", "train", "tiny-text", "--quiet",
        "--set", "name=cluster-run", "--set", f"storage.path={storage}",
        "--set", "trainer.num_workers=2", "--set", "trainer.cpus_per_worker=1",
        "--set", "trainer.max_steps=4", "--set", "trainer.log_every=2", "--set", "trainer.eval_every=4",
        "--set", "trainer.eval_batches=1", "--set", "trainer.ckpt_every=4",
        "--set", "data.max_bytes=100000", "--set", "data.max_files=10",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    assert "job cl-train: SUCCEEDED" in out and "--address auto" in out
    assert jobs.status("cl-train", cluster.dashboard_url).status == "SUCCEEDED"
    # One Ray Train worker per node: 1 CPU each, 2 workers needing 1 CPU -> both nodes.
    workers = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                          limit=100, raise_on_missing_output=False)
    node_ids = {n.node_id for n in _alive_nodes(cluster.dashboard_url)}
    assert len(workers) == 2 and {w.node_id for w in workers} == node_ids, workers
    # The run's checkpoint was committed (manifest written last).
    assert sorted((storage / "cluster-run").glob("step_*/manifest.json")), list(storage.rglob("*"))[:20]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jobs_stop_list_logs_and_secret_forwarding(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    secret = "wandb-test-secret-0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    script = ("import hashlib, os, time; "
              "print('key-hash', hashlib.sha256(os.environ['WANDB_API_KEY'].encode()).hexdigest()[:16], flush=True); "
              "time.sleep(600)")
    assert main(["submit", "--address", cluster.dashboard_url, "--no-working-dir", "--submission-id", "cl-sleep",
                 "--", sys.executable, "-c", script]) == 0
    out = capsys.readouterr().out
    assert secret not in out and "WANDB_API_KEY" in out  # the name is listed, never the value
    _wait_status("cl-sleep", cluster.dashboard_url, {"RUNNING"})
    # The job got the key: its log shows the key's hash (and not the key).
    want = hashlib.sha256(secret.encode()).hexdigest()[:16]
    deadline = time.monotonic() + 60
    while want not in jobs.logs("cl-sleep", cluster.dashboard_url) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["jobs", "logs", "cl-sleep", "--address", cluster.dashboard_url]) == 0
    assert want in capsys.readouterr().out

    assert main(["jobs", "status", "cl-sleep", "--address", cluster.dashboard_url]) == 0
    assert "RUNNING" in capsys.readouterr().out
    assert main(["jobs", "stop", "cl-sleep", "--address", cluster.dashboard_url, "--wait", "60"]) == 0
    assert "job cl-sleep: STOPPED" in capsys.readouterr().out
    assert jobs.status("cl-sleep", cluster.dashboard_url).status == "STOPPED"
    assert main(["jobs", "list", "--address", cluster.dashboard_url]) == 0
    listing = capsys.readouterr().out
    assert "cl-sleep" in listing and "STOPPED" in listing and secret not in listing


# A job's driver: starts an actor that reports its SIGTERM handler, then sends itself SIGTERM (with
# Ray's handler the actor would exit at once; with ours it only records the request).
PROBE = """
import json, os, signal, sys, time
import ray
if sys.argv[1] == "init_ray":
    from e2e_dist.train.ray_env import init_ray
    init_ray()  # the job's cluster (RAY_ADDRESS), as `e2e-dist train --address auto` does
else:
    ray.init()  # a driver that knows nothing of the hook

@ray.remote(num_cpus=0)
class Probe:
    def report(self):
        h = signal.getsignal(signal.SIGTERM)
        return {"handler": getattr(h, "__module__", "?") + "." + getattr(h, "__qualname__", repr(h)),
                "env": os.environ.get("E2E_DIST_PROBE")}

    def sigterm_self(self):
        from e2e_dist.train import preemption
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not preemption.requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        return preemption.requested()

p = Probe.remote()
result = ray.get(p.report.remote(), timeout=90)
result["survived_sigterm"] = ray.get(p.sigterm_self.remote(), timeout=60)
print("PROBE " + json.dumps(result), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submitted_jobs_get_the_sigterm_hook(cluster: LocalCluster) -> None:
    """`e2e-dist submit` puts the hook into the job's runtime_env (a plain ray.init() driver gets it),
    and a driver of a job submitted without it (`ray job submit`) adds it itself in init_ray."""
    url = cluster.dashboard_url
    env = {"E2E_DIST_PROBE": "kept"}
    started = {
        # our submit path, a driver that never mentions the hook
        "submit-plain": jobs.submit([sys.executable, "-c", PROBE, "plain"], address=url, working_dir=None,
                                    env_vars=env, submission_id="cl-hook-submit-plain", out=io.StringIO()),
        # our submit path and our driver: the job's hook and init_ray's must not conflict
        "submit-init_ray": jobs.submit([sys.executable, "-c", PROBE, "init_ray"], address=url, working_dir=None,
                                       env_vars=env, submission_id="cl-hook-submit-init", out=io.StringIO()),
        # what `ray job submit --runtime-env-json '{"env_vars": ...}'` sends: no hook; init_ray adds it
        "raw-init_ray": jobs.client(url).submit_job(
            entrypoint=shlex.join([sys.executable, "-c", PROBE, "init_ray"]), submission_id="cl-hook-raw-init",
            runtime_env={"env_vars": env}),
    }
    assert jobs.client(url).get_job_info(started["submit-plain"]).runtime_env["worker_process_setup_hook"] == \
        SIGTERM_SETUP_HOOK
    for case, job_id in started.items():
        state = jobs.wait(job_id, url, timeout_s=180, poll_s=0.5)
        log = jobs.logs(job_id, url)
        reports = [ln[len("PROBE "):] for ln in log.splitlines() if ln.startswith("PROBE {")]
        assert state == "SUCCEEDED" and reports, f"{case}: {state}\n{log[-3000:]}"
        result = json.loads(reports[-1])
        assert result == {"handler": "e2e_dist.train.preemption._on_sigterm", "env": "kept",
                          "survived_sigterm": True}, f"{case}: {result}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_ends_exactly_what_it_started(cluster: LocalCluster) -> None:
    """Runs last in this module: stops the shared cluster."""
    # A bystander in its own session, like a colleague's Ray: it must survive our stop().
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        started = cluster.pids()
        assert len(started) >= 6  # per node: ray start, raylet, agents ...; head: gcs, dashboard
        cluster.stop()
        assert not [p for p in started if _alive(p)], "processes of the cluster survived stop()"
        assert bystander.poll() is None, "stop() killed a process it did not start"
        assert not cluster.base_dir.exists()
    finally:
        bystander.send_signal(signal.SIGKILL)
        bystander.wait()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
    assert runtime_env["env_vars"] == env and runtime_env["worker_process_setup_hook"] == SIGTERM_SETUP_HOOK
    assert jobs.cluster_entrypoint(["e2e-dist", "sweep", "s.yaml"]) == ["e2e-dist", "sweep", "s.yaml", "--address", "auto"]
    assert jobs.cluster_entrypoint(["e2e-dist", "train", "x", "--address=ray://h:1"])[-1] == "--address=ray://h:1"
    assert jobs.cluster_entrypoint(["python", "x.py"]) == ["python", "x.py"]
    assert jobs.redact_entrypoint("e2e-dist train x --set tracking.api_key=abc --set a=1") == \
        "e2e-dist train x --set 'tracking.api_key=***' --set a=1"


def test_driver_adds_the_hook_only_where_ray_merges_and_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = {"worker_process_setup_hook": SIGTERM_SETUP_HOOK}
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
