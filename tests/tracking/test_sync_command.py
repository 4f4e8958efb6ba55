"""The end-of-run summary's `wandb sync` line uploads every session of a restarted offline run.

Each session (first start, every restart) writes its own `offline-run-<time>-<id>/` folder; W&B
appends later sessions to the same run, so syncing only the newest folder loses the earlier steps.
Real offline W&B sessions through `Tracker`; the printed command is taken apart and the folders it
names are read back with our `.wandb` reader: together they must hold every step of the run.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

import pytest

from e2e_dist import storage
from e2e_dist.config import RunConfig
from e2e_dist.tracking import Tracker
from e2e_dist.tracking.offline_history import read_history
from e2e_dist.tracking.run_location import sync_command, wandb_run_dir, wandb_stored_dir
from e2e_dist.train.launcher import RunSummary
from e2e_dist.train.report import print_run_summary


@pytest.fixture(autouse=True)
def _no_leftover_wandb_service():
    yield
    if os.environ.get("WANDB_SERVICE"):  # a failed test left a run open: don't leak its service onward
        import wandb

        wandb.teardown()


def _session(cfg: RunConfig, steps: tuple[int, ...], resume: int | None) -> Path:
    tr = Tracker.start(cfg, rank=0, resume_step=resume)
    for s in steps:
        tr.log({"loss": 1.0 / s}, step=s)
    tr.finish()
    # Folders are named by their start second: a restart takes longer than that, a test need not.
    time.sleep(1.0)
    return tr.run_dir


def _printed_sync(cfg: RunConfig, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The summary's upload command (exactly one), as the summary of `e2e-dist train` prints it."""
    summary = RunSummary(name=cfg.name, run_uri=cfg.run_uri, metrics={"step": 7},
                         wandb_dir=wandb_run_dir(cfg), wandb_copy=wandb_stored_dir(cfg))
    print_run_summary(summary, cfg)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "wandb sync" in ln]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("upload it:", 1)[1])


def _synced_steps(folders: list[str | Path]) -> list[int]:
    """What `wandb sync FOLDER...` uploads, in the order given."""
    return [r["_step"] for d in folders for f in Path(d).glob("run-*.wandb") for r in read_history(f)]


def test_local_run_syncs_every_session_oldest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = RunConfig.model_validate({"name": "sync", "storage": {"path": str(tmp_path / "runs")},
                                    "tracking": {"mode": "offline"}})
    sessions = [_session(cfg, (1, 2, 3), None), _session(cfg, (4, 5), 3), _session(cfg, (6, 7), 5)]
    argv = _printed_sync(cfg, capsys)
    assert argv[:2] == ["wandb", "sync"] and argv[2:] == [str(d) for d in sessions]
    assert _synced_steps(argv[2:]) == [1, 2, 3, 4, 5, 6, 7]


def test_s3_run_syncs_every_stored_session(tmp_path: Path, capsys: pytest.CaptureFixture[str], s3_server,
                                           s3_bucket: str) -> None:
    """Rank 0 ran on node A, then B (a restart elsewhere), then A again: A's folders miss session 2,
    so the command fetches the run's stored copy and syncs all three sessions from it."""
    def on(node: str) -> RunConfig:
        return RunConfig.model_validate({
            "name": "s3sync", "storage": {"path": f"{s3_bucket}/runs", "endpoint_url": s3_server.url},
            "tracking": {"mode": "offline", "dir": str(tmp_path / node)}})

    sessions = [_session(on("a"), (1, 2, 3), None), _session(on("b"), (4, 5), 3), _session(on("a"), (6, 7), 5)]
    argv = _printed_sync(on("a"), capsys)
    stored = f"{s3_bucket}/runs/s3sync/wandb"
    assert argv[:5] == ["aws", "s3", "sync", stored, "./s3sync-wandb"] and argv[5:7] == ["&&", "wandb"]
    assert argv[7] == "sync" and argv[8:] == [f"./s3sync-wandb/{d.name}" for d in sessions]

    workdir = tmp_path / "laptop"  # where the user runs it: `aws s3 sync`, then `wandb sync`
    storage.download_dir(stored, workdir / "s3sync-wandb", on("a").storage)
    assert _synced_steps([workdir / f for f in argv[8:]]) == [1, 2, 3, 4, 5, 6, 7]


def test_sync_command_quotes_and_keeps_one_folder_working() -> None:
    assert sync_command("/r/wandb/offline-run-1") == "wandb sync /r/wandb/offline-run-1"
    assert sync_command(["/my runs/a", "/my runs/b"]) == "wandb sync '/my runs/a' '/my runs/b'"
    assert sync_command(["s3://b/x/wandb/offline-run-1-i"]) == \
        "aws s3 sync s3://b/x/wandb ./x-wandb && wandb sync ./x-wandb/offline-run-1-i"
