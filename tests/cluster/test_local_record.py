"""`--address auto`: which cluster it joins (cluster/local_record.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from e2e_dist.cluster import local_record
from e2e_dist.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("E2E_DIST_CACHE", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def test_auto_joins_the_recorded_cluster_while_its_process_lives(cache, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"--address auto: no cluster to join .*e2e-dist cluster local"):
        local_record.resolve_address("auto")
    path = local_record.write_record("127.0.0.1:6380", "http://127.0.0.1:8266")
    assert path == cache / "local-cluster.json"
    assert local_record.resolve_address("auto") == "127.0.0.1:6380"
    assert local_record.resolve_address("10.0.0.5:6379") == "10.0.0.5:6379" and local_record.resolve_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:7000")  # inside a Ray job: the job's cluster first
    assert local_record.resolve_address("auto") == "127.0.0.1:7000"
    monkeypatch.delenv("RAY_ADDRESS")
    local_record.clear_record()
    assert not path.exists()


def test_a_record_left_by_a_dead_process_is_no_cluster(cache) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache / "local-cluster.json").write_text(json.dumps({"address": "127.0.0.1:6380", "pid": int(dead.stdout)}))
    assert local_record.running_cluster() is None
    with pytest.raises(UserError, match="no cluster to join"):
        local_record.resolve_address("auto")
    # someone else's record is not ours to remove
    local_record.clear_record()
    assert (cache / "local-cluster.json").exists()
