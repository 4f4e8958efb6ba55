"""The local autoscaling cluster (cluster/local-autoscale.yaml, our node provider): nodes appear when
work needs them, the work runs on them, and they go away after the idle timeout -- on loopback (any
user) and as separate hosts (root), where a sweep submitted as a job runs its trials on them. Node
counts come from Ray's state API, sampled over time while the workload runs and afterwards."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from e2e_dist.cluster import jobs
from e2e_dist.cluster.local import LocalCluster
from tests.helpers.console import foreign_lines

ROOT = Path(__file__).resolve().parents[2]

# Runs on the cluster as a Ray job (driver on the head, which has 1 CPU): asks the autoscaler for
# a 2-CPU bundle, waits for the node, then runs one 2-CPU task there.
WORKLOAD = '''
import json, time, ray
from ray.autoscaler.sdk import request_resources

ray.init()
head = ray.get_runtime_context().get_node_id()
request_resources(bundles=[{"CPU": 2}])
deadline = time.monotonic() + 240
while ray.cluster_resources().get("CPU", 0) < 3 and time.monotonic() < deadline:
    time.sleep(1)

@ray.remote(num_cpus=2)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = ray.get(where.remote(), timeout=120)
request_resources(bundles=[])  # withdraw the request: the node is idle from now on
print("WORKLOAD " + json.dumps({"head": head, "ran_on": ran_on}), flush=True)
'''


def _alive(url: str) -> dict[str, str]:
    """node id -> address of every alive node."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=url, limit=100, raise_on_missing_output=False)
    return {n.node_id: n.node_ip for n in nodes if n.state == "ALIVE"}


def _what_keeps_nodes(url: str) -> str:
    """Alive actors and placement groups (what keeps a node from being idle), for a failure message."""
    from ray.util.state import list_actors, list_placement_groups

    actors = [(a.class_name, a.node_id[:8], a.state) for a in list_actors(address=url, limit=200,
              raise_on_missing_output=False) if a.state != "DEAD"]
    groups = [(g.placement_group_id[:8], g.state) for g in list_placement_groups(address=url, limit=200,
              raise_on_missing_output=False) if g.state != "REMOVED"]
    return f"alive actors {actors}; placement groups {groups}"


class _Sampler(threading.Thread):
    """Alive node ids every second (the state API over time)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.stop_event = url, [], threading.Event()
        self.ips: dict[str, str] = {}  # node id -> address, every node seen

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                alive = _alive(self.url)
                self.ips.update(alive.items())
                self.samples.append((time.monotonic(), set(alive)))
            except Exception:  # the dashboard can be briefly busy on a loaded machine
                pass
            self.stop_event.wait(1.0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_nodes_appear_for_work_and_leave_when_idle(tmp_path: Path) -> None:
    (tmp_path / "workload.py").write_text(WORKLOAD)
    with LocalCluster(autoscale=True, head_num_cpus=1, idle_timeout_minutes=0.1,
                      object_store_memory=100 * 2**20, auth_mode="disabled") as cluster:
        url = cluster.dashboard_url
        assert len(_alive(url)) == 1  # head only: every worker type has min_workers 0
        sampler = _Sampler(url)
        sampler.start()
        try:
            job_id = jobs.submit(["python", "workload.py"], address=url, working_dir=tmp_path)
            state = jobs.wait(job_id, url, timeout_s=360)
            log = jobs.logs(job_id, url)
            assert state == "SUCCEEDED", log[-3000:]
            result = json.loads(log.split("WORKLOAD ", 1)[1].splitlines()[0])
            head, ran_on = result["head"], result["ran_on"]
            # The work ran on a node the autoscaler added, with a loopback address of its own.
            assert ran_on != head and ran_on in sampler.ips
            assert sampler.ips[ran_on] != sampler.ips[head] and sampler.ips[ran_on].startswith("127.0.0.")
            # Idle timeout 6 s: the worker node goes away, the head stays (seen 3 times in a row).
            deadline, streak = time.monotonic() + 180, 0
            while time.monotonic() < deadline and streak < 3:
                streak = streak + 1 if set(_alive(url)) == {head} else 0
                time.sleep(1)
        finally:
            sampler.stop_event.set()
            sampler.join(timeout=10)
        final = set(_alive(url))
        assert final == {head}, final
        counts = [len(ids) for _, ids in sampler.samples] + [len(final)]
        # Over time: 1 node, then 2 (head + the added one), then back to 1.
        assert counts[0] == 1 and max(counts) >= 2 and counts[-1] == 1, counts
        peak = counts.index(max(counts))
        assert 1 in counts[peak:], counts


# ------------------------------------------------------------------ a sweep submitted to separate hosts
SWEEP_TINY = [  # 2 tiny trials, one 1-CPU worker each: the job machinery is under test, not the model
    "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=64", "data.seq_len=64",
    "data.max_files=20", "trainer.micro_batch_size=8", "trainer.max_steps=4", "trainer.log_every=2",
    "trainer.eval_every=4", "trainer.eval_samples=16", "trainer.ckpt_every=4", "trainer.warmup_steps=1",
    "search_space.data.max_bytes={grid: [65536, 131072]}", "max_concurrent_trials=2",
    "resources_per_trial.num_workers=1", "resources_per_trial.cpus_per_worker=0.99",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_submitted_with_its_working_dir_succeeds_on_autoscaled_hosts(s3_server, monkeypatch) -> None:
    """`e2e-dist submit -- e2e-dist sweep ...` with the default working dir, as the README shows, to an
    autoscaling cluster of separate hosts: nodes come for the trials and go after, the job SUCCEEDS
    (its driver's working dir used to be deleted under it by a worker node sharing the head's session
    folder), results land in S3 and the job's logs are readable."""
    from e2e_dist.cli import main
    from e2e_dist.cluster.netns import SUBNET_PREFIX, netns_unavailable_reason
    from tests.fixtures.s3 import empty_and_delete_bucket, get_object, make_bucket

    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    bucket = make_bucket(s3_server.url, prefix="sweep")
    with LocalCluster(autoscale=True, separate_hosts=True, head_num_cpus=0, idle_timeout_minutes=0.1,
                      object_store_memory=100 * 2**20, auth_mode="disabled") as cluster:
        url, s3 = cluster.dashboard_url, "http://" + cluster.expose(s3_server.port)
        head = set(_alive(url))
        sampler = _Sampler(url)
        sampler.start()
        monkeypatch.chdir(ROOT)  # the default working dir: the repository
        try:
            rc = main(["submit", "--address", url, "--follow", "--timeout", "600", "--submission-id", "sweep-job",
                       "--env", f"AWS_ENDPOINT_URL={s3}", "--env", "WANDB_MODE=offline",
                       "--env", f"E2E_DIST_CACHE={os.environ['E2E_DIST_CACHE']}", "--",
                       "e2e-dist", "sweep", "tune_configs/data_ablation.yaml",
                       *[a for o in [*SWEEP_TINY, f"storage.path={bucket}/sweeps", f"storage.endpoint_url={s3}"]
                         for a in ("--set", o)]])
            log = jobs.logs("sweep-job", url)
            assert rc == 0 and jobs.status("sweep-job", url).status == "SUCCEEDED", log[-4000:]
            # Ray's detached helpers (first creator's node otherwise) were made on the head, by the
            # sweep's driver: nothing of theirs keeps an autoscaled node up
            from ray.util.state import list_actors

            helpers = {a.class_name: a.node_id for a in list_actors(address=url, limit=200, raise_on_missing_output=False)
                       if a.class_name in ("_StatsActor", "_AutoscalingCoordinatorActor") and a.state != "DEAD"}
            assert set(helpers) == {"_StatsActor", "_AutoscalingCoordinatorActor"}, helpers
            assert set(helpers.values()) <= head, (helpers, head)
            deadline, streak = time.monotonic() + 180, 0
            while time.monotonic() < deadline and streak < 3:  # idle timeout 6 s: back to the head alone
                streak = streak + 1 if set(_alive(url)) == head else 0
                time.sleep(1)
        finally:
            sampler.stop_event.set()
            sampler.join(timeout=10)
        assert set(_alive(url)) == head, _what_keeps_nodes(url)
        counts = [len(ids) for _, ids in sampler.samples]
        assert counts[0] == 1 and max(counts) >= 2 and counts[-1] == 1, counts
        ips = set(sampler.ips.values())
        assert len(ips) >= 2 and all(ip.startswith(SUBNET_PREFIX + ".") for ip in ips), ips
    body = get_object(s3_server.url, f"{bucket}/sweeps/data-ablation/results.jsonl").decode()
    rows = [json.loads(line) for line in body.splitlines() if line.strip()]
    assert sorted(r["status"] for r in rows) == ["completed", "completed"]
    assert "data-ablation" in log and "completed" in log  # the sweep's own lines, readable in the job log
    assert foreign_lines(log) == [], log[-4000:]  # only our lines: libraries' go to the sweep's log file
    assert len(log.splitlines()) <= 100, len(log.splitlines())
    empty_and_delete_bucket(s3_server.url, bucket)
