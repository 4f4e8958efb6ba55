"""The fake autoscaling cluster (cluster/local-autoscale.yaml): nodes appear when work needs them,
the work runs on them, and they go away after the idle timeout. Node counts come from Ray's state
API, sampled over time while the workload runs and afterwards."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from e2e_dist.cluster import jobs
from e2e_dist.cluster.local import LocalCluster

# Runs on the cluster as a Ray job (driver on the head, which has 1 CPU): asks the autoscaler for
# two 2-CPU bundles, waits for the nodes, then runs one task on each new node.
WORKLOAD = '''
import json, time, ray
from ray.autoscaler.sdk import request_resources
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init()
head = ray.get_runtime_context().get_node_id()
request_resources(bundles=[{"CPU": 2}, {"CPU": 2}])
deadline = time.monotonic() + 240
while ray.cluster_resources().get("CPU", 0) < 5 and time.monotonic() < deadline:
    time.sleep(1)
print("cluster CPUs", ray.cluster_resources().get("CPU"), flush=True)
pg = placement_group([{"CPU": 2}] * 2, strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=120)

@ray.remote(num_cpus=2)
def where():
    return ray.get_runtime_context().get_node_id()

ran_on = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                  for i in range(2)], timeout=120)
remove_placement_group(pg)
request_resources(bundles=[])  # withdraw the request: the nodes are idle from now on
print("WORKLOAD " + json.dumps({"head": head, "ran_on": ran_on}), flush=True)
'''


def _alive(url: str) -> dict[str, dict]:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=url, limit=100, raise_on_missing_output=False)
    return {n.node_id: n.resources_total for n in nodes if n.state == "ALIVE"}


class _Sampler(threading.Thread):
    """Alive node ids every second (the state API over time)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.samples, self.stop_event = url, [], threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.monotonic(), set(_alive(self.url))))
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
            # The work ran on two nodes the autoscaler added (not the head).
            assert len(set(ran_on)) == 2 and head not in ran_on
            seen = set().union(*(ids for _, ids in sampler.samples))
            assert set(ran_on) <= seen
            # Idle timeout 6 s: the worker nodes go away, the head stays (seen 3 times in a row).
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
        # Over time: 1 node, then at least 3 (head + 2 workers), then back to 1.
        assert counts[0] == 1 and max(counts) >= 3 and counts[-1] == 1, counts
        peak = counts.index(max(counts))
        assert 1 in counts[peak:], counts
