"""Who downloads the checkpoint on resume: one process per node (the restore itself runs through
the real stack in test_train_e2e.py's crash/resume tests, where rank 1 reads rank 0's copy)."""

from __future__ import annotations

from e2e_dist.config import RunConfig
from e2e_dist.train.resume import downloads_here, node_restore_dir


def test_one_download_per_node():
    # 2 nodes x 2 ranks, rank 0 on node 0: rank 0 and node 1's local rank 0 fetch.
    layout = [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    fetchers = [r for r, lr, n in layout if downloads_here(rank=r, local_rank=lr, node_rank=n, rank0_node=0)]
    assert fetchers == [0, 2]


def test_rank0_fetches_even_when_it_is_not_local_rank_0_and_nobody_else_on_its_node_does():
    layout = [(0, 1, 0), (1, 0, 0), (2, 0, 1)]
    fetchers = [r for r, lr, n in layout if downloads_here(rank=r, local_rank=lr, node_rank=n, rank0_node=0)]
    assert fetchers == [0, 2]


def test_node_dir_is_shared_by_a_runs_ranks_and_differs_between_runs(tmp_path):
    a = RunConfig.model_validate({"name": "exp", "storage": {"path": str(tmp_path / "a")}})
    b = RunConfig.model_validate({"name": "exp", "storage": {"path": str(tmp_path / "b")}})
    assert node_restore_dir(a) == node_restore_dir(RunConfig.model_validate(a.model_dump()))
    assert node_restore_dir(a) != node_restore_dir(b)
