"""Elastic runs (`trainer.num_workers: [min, max]`) after a lost node: how soon the smaller group trains.

From the loss to the shrunken group's first step three waits add up (the separate-hosts test
cluster, tests/cluster/test_separate_hosts.py, 2 cores):
1. Ray calls the node dead: at once when its raylet says goodbye (SIGTERM), else when the head's
   health checks give up (ray_env.NODE_DEATH_ENV: 5 s measured for a killed node, 19.5 s for one
   gone from the network; Ray's defaults 14.8 s and ~65 s).
2. Train V2's elastic policy sizes the new group from what Ray's AutoscalingCoordinator sees on
   live nodes (it does start with what is there, not the old size), but that view is recomputed
   only every 20 s: right after a loss it still held the lost node, Train asked for a group of the
   old size and waited its worker-group start timeout (60 s by default) for a placement that could
   never happen, then decided again. `RefreshNodeView` recomputes the view before every retry, and
   an elastic run's start timeout is short (`START_TIMEOUT_S`) for when the node is not yet
   declared dead as Train decides.
3. The new group starts: worker processes, imports, process group (~9 s), then the checkpoint's
   download, resharding and the steps since it.
Measured, node loss -> the shrunken group's first step in the job's log: 51.7 s before (with a 20 s
start timeout: 20 s of it waiting for the 2-worker group, 10 s a DNS stall of the test cluster's
hosts, fixed in cluster/netns.py), 24.3 s after.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from e2e_dist import ray_compat

log = logging.getLogger(__name__)

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = 10
"""An elastic run's worker-group start timeout (unless the user set one). Its policy asks only for
workers that fit on the live nodes it sees (Ray's autoscaling coordinator reserves them for the
run), and such a placement group was ready in 0.02-0.9 s here; a group that does not start in
10 s was sized from a stale view (a node lost but not yet declared dead), or waits for resources
other work holds. Either way Train decides again and retries: a start timeout is retried without
limit and does not count against trainer.max_failures. (A fixed-size run keeps Ray's 60 s.)"""


@contextlib.contextmanager
def fit_env(elastic: bool) -> Iterator[None]:
    """Around `trainer.fit()`: an elastic run's start timeout in this process's environment, from
    where Train copies it to the run's controller when fit() starts it (a variable Train
    propagates); afterwards as before. A value the user set (or a test suite) is kept."""
    if not elastic or START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = str(START_TIMEOUT_S)
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


class RefreshNodeView(ray_compat.train_controller_callback_base()):
    """In an elastic run's Train controller: before each retry (a worker group failed, or did not
    start in time) Ray's AutoscalingCoordinator re-reads the live nodes, so the size Train picks
    next counts only those (see the module docstring, wait 2)."""

    def before_controller_execute_failure_decision(self, failure_decision) -> None:
        try:
            ray_compat.refresh_autoscaling_coordinator()
        except Exception as e:  # noqa: BLE001 - only the restart is slower (Ray refreshes it every 20 s)
            log.warning("could not refresh Ray's view of the cluster's nodes before a restart: %s", e)


def callbacks(elastic: bool) -> list:
    """The Train callbacks an elastic run adds (none for a fixed-size run)."""
    return [RefreshNodeView()] if elastic else []
