"""What an elastic run sets up for a quick restart after a lost node (train/elastic.py). The node
loss itself, and the time to the shrunken group's first step: tests/cluster/test_separate_hosts.py."""

from __future__ import annotations

import os

import pytest

from e2e_dist.config import load_run_config
from e2e_dist.train import elastic
from e2e_dist.train.launcher import build_trainer
from e2e_dist.train.ray_env import NODE_DEATH_ENV


def test_an_elastic_fit_gets_a_short_start_timeout_unless_one_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    var = elastic.START_TIMEOUT_ENV
    monkeypatch.delenv(var, raising=False)
    with elastic.fit_env(True):
        assert os.environ[var] == str(elastic.START_TIMEOUT_S)
    assert var not in os.environ  # only while fit() starts Train's controller
    with elastic.fit_env(False):
        assert var not in os.environ  # a fixed-size run keeps Ray's default
    monkeypatch.setenv(var, "300")
    with elastic.fit_env(True):
        assert os.environ[var] == "300"  # the user's (or a suite's) value wins
    assert os.environ[var] == "300"


def test_an_elastic_run_refreshes_rays_view_of_the_nodes_before_a_restart(tmp_path) -> None:
    def callbacks(workers: str) -> list[str]:
        cfg = load_run_config("tiny-text", [f"trainer.num_workers={workers}", "trainer.use_gpu=false",
                                            f"storage.path={tmp_path}"])
        trainer = build_trainer(cfg, train=None, val=None, collate=None)
        return [type(c).__name__ for c in trainer.run_config.callbacks]

    assert callbacks("[1, 2]") == ["RefreshNodeView"]
    assert callbacks("2") == []


def test_the_refresh_never_fails_a_restart(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from e2e_dist import ray_compat

    def gone(**_):
        raise ray_compat.RayCompatError("no coordinator")

    monkeypatch.setattr(ray_compat, "refresh_autoscaling_coordinator", gone)
    elastic.RefreshNodeView().before_controller_execute_failure_decision(None)
    assert "could not refresh" in caplog.text and "no coordinator" in caplog.text


def test_the_refresh_reaches_the_coordinator(ray_local) -> None:
    """Against the real actor: Ray's AutoscalingCoordinator recomputes on request (a Ray upgrade
    that drops `recompute` fails here, not as a slow restart)."""
    from e2e_dist import ray_compat

    ray_compat.refresh_autoscaling_coordinator()


def test_heads_declare_a_lost_node_dead_within_seconds() -> None:
    period, timeout, failures = (int(NODE_DEATH_ENV[f"RAY_health_check_{k}"])
                                 for k in ("period_ms", "timeout_ms", "failure_threshold"))
    assert failures * period <= 5000  # a machine that refuses connections
    assert failures * (period + timeout) <= 20000  # one gone from the network
