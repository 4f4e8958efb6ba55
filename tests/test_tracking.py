"""W&B tracking with real wandb in offline mode; everything is read back from the `.wandb` files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from e2e_dist.config import RunConfig
from e2e_dist.errors import UserError
from e2e_dist.tracking import (
    Tracker,
    last_step_in_files,
    plan_resume,
    resolve_mode,
    wandb_dir,
    wandb_run_dir,
    wandb_run_id,
)
from e2e_dist.tracking.offline_history import (
    WandbFileError,
    find_run_files,
    read_config,
    read_history,
    read_records,
    read_run,
    read_summary,
    read_table,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_leftover_wandb_service():
    yield
    if os.environ.get("WANDB_SERVICE"):  # a failed test left a run open: don't leak its service onward
        import wandb

        wandb.teardown()


def make_cfg(tmp_path: Path, name: str = "trk", **tracking) -> RunConfig:
    return RunConfig.model_validate({"name": name, "storage": {"path": str(tmp_path / "runs")},
                                     "tracking": {"mode": "offline", **tracking}})


def combined_history(cfg: RunConfig) -> list[dict]:
    """History of every session of the run, in session order (what `wandb sync` would upload)."""
    rows: list[dict] = []
    for f in find_run_files(wandb_dir(cfg), wandb_run_id(cfg)):
        rows += read_history(f)
    return rows


def assert_strictly_increasing(steps: list[int]) -> None:
    assert all(a < b for a, b in zip(steps, steps[1:])), f"duplicate or out-of-order steps: {steps}"


def test_metrics_land_at_their_steps_and_wandb_stays_quiet(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # our own settings must keep W&B quiet
    cfg = make_cfg(tmp_path, group="sweep-a", tags=["t1"])
    tr = Tracker.start(cfg, rank=0, resume_step=None, extra_config={"n_params": 1234})
    for step in (10, 20, 30):
        tr.log({"loss": 1.0 / step, "lr": 0.1}, step=step)
    tr.log({"val_loss": 0.5}, step=30)  # same step: merges into one row
    tr.log({"loss": 9.0}, step=20)  # backwards within a session: dropped, never out of order
    tr.log_summary({"final_loss": 0.03})
    tr.finish()
    tr.finish()  # idempotent

    out, err = capfd.readouterr()
    assert "wandb" not in out.lower(), out
    assert "wandb:" not in err.lower(), err  # W&B's own banner/warnings ("wandb: ...") stay off stderr too
    assert tr.run_dir is not None and tr.run_dir.name.startswith("offline-run-")
    assert tr.run_dir.parent == tmp_path / "runs" / "trk" / "wandb"  # <run dir>/wandb by default
    assert wandb_run_dir(cfg) == str(tr.run_dir)

    files = find_run_files(wandb_dir(cfg))
    assert len(files) == 1
    rows = read_history(files[0])
    assert [r["_step"] for r in rows] == [10, 20, 30]
    assert [r["loss"] for r in rows] == pytest.approx([0.1, 0.05, 1 / 30])
    assert rows[2]["val_loss"] == 0.5 and "val_loss" not in rows[1]
    info = read_run(files[0])
    assert (info.run_id, info.project, info.group, info.name, info.tags) == (
        wandb_run_id(cfg), "e2e-dist", "sweep-a", "trk", ["t1"])
    cfg_back = read_config(files[0])
    assert cfg_back["n_params"] == 1234 and cfg_back["trainer"]["max_steps"] == cfg.trainer.max_steps
    assert read_summary(files[0])["final_loss"] == 0.03


def test_rank_nonzero_and_disabled_create_nothing(tmp_path):
    cfg = make_cfg(tmp_path)
    for tr in (Tracker.start(cfg, rank=1, resume_step=None),
               Tracker.start(make_cfg(tmp_path, mode="disabled"), rank=0, resume_step=None),
               Tracker.start(make_cfg(tmp_path, wandb=False), rank=0, resume_step=None)):
        assert not tr.enabled and tr.run_id is None and tr.run_dir is None
        tr.log({"loss": 1.0}, step=1)
        tr.log_summary({"x": 1})
        tr.finish()
    assert not (tmp_path / "runs").exists()
    assert wandb_run_dir(make_cfg(tmp_path, mode="disabled")) is None


def test_run_id_is_stable_and_distinct_per_run(tmp_path):
    a = make_cfg(tmp_path, name="same")
    assert wandb_run_id(a) == wandb_run_id(make_cfg(tmp_path, name="same"))
    assert wandb_run_id(a).startswith("same-") and len(wandb_run_id(a)) == len("same-") + 8
    # Same name elsewhere (another sweep trial dir, another bucket) -> another W&B run.
    assert wandb_run_id(a) != wandb_run_id(make_cfg(tmp_path / "other", name="same"))
    s3 = RunConfig.model_validate({"name": "same", "storage": {"path": "s3://bucket-x/p"}})
    assert wandb_run_id(s3) not in (wandb_run_id(a),) and wandb_run_id(s3).startswith("same-")
    # `./runs` and its absolute spelling are the same directory, so the same run.
    rel = RunConfig.model_validate({"name": "same", "storage": {"path": "./runs"}})
    absolute = RunConfig.model_validate({"name": "same", "storage": {"path": os.path.abspath("runs")}})
    assert wandb_run_id(rel) == wandb_run_id(absolute)


def test_two_sessions_continue_the_same_run(tmp_path):
    cfg = make_cfg(tmp_path, name="cont")
    ids = []
    for steps, resume in (((1, 2, 3), None), ((4, 5), 3)):
        tr = Tracker.start(cfg, rank=0, resume_step=resume)
        ids.append(tr.run_id)
        for s in steps:
            tr.log({"loss": float(s)}, step=s)
        tr.finish()
    assert ids[0] == ids[1] == wandb_run_id(cfg)
    files = find_run_files(wandb_dir(cfg), ids[0])
    assert len(files) == 2 and files[0].parent != files[1].parent
    runs = [read_run(f) for f in files]
    assert {r.run_id for r in runs} == {ids[0]}
    assert runs[1].resume  # `wandb sync` appends the second session to the same run
    assert [r["_step"] for r in combined_history(cfg)] == [1, 2, 3, 4, 5]
    summary = read_summary(files[1])
    assert summary["restarts/count"] == 1 and summary["restarts/steps_redone_total"] == 0
    assert "restarts/redo" not in summary  # nothing was re-done


def test_restart_before_last_logged_step_keeps_history_monotonic(tmp_path):
    cfg = make_cfg(tmp_path, name="redo")
    # Session 1 logs up to 50; the last committed checkpoint was at 20.
    tr = Tracker.start(cfg, rank=0, resume_step=None)
    for s in range(10, 60, 10):
        tr.log({"loss": 1.0 / s}, step=s)
    tr.finish(exit_code=1)
    # Session 2 resumes from 20, re-does 30..50 (slightly different values), goes on to 70.
    tr = Tracker.start(cfg, rank=0, resume_step=20)
    for s in range(30, 80, 10):
        tr.log({"loss": 1.0 / s + 1e-3}, step=s)
    tr.finish(exit_code=1)
    # Session 3 crashes again: resumes from 60, re-does 70, goes on to 90.
    tr = Tracker.start(cfg, rank=0, resume_step=60)
    for s in (70, 80, 90):
        tr.log({"loss": 1.0 / s + 2e-3}, step=s)
    tr.finish()

    rows = combined_history(cfg)
    steps = [r["_step"] for r in rows]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert_strictly_increasing(steps)
    # History keeps the first values logged for each step; the re-done ones live in the redo table.
    assert rows[2]["loss"] == pytest.approx(1 / 30) and rows[5]["loss"] == pytest.approx(1 / 60 + 1e-3)

    last = find_run_files(wandb_dir(cfg), wandb_run_id(cfg))[-1]
    summary = read_summary(last)
    assert summary["restarts/count"] == 2
    assert summary["restarts/last_resumed_from_step"] == 60
    assert summary["restarts/last_logged_step_before"] == 70
    assert summary["restarts/steps_redone_total"] == 30 + 10
    assert [(h["resumed_from_step"], h["last_persisted_step"]) for h in summary["restarts/history"]] == [(20, 50), (60, 70)]
    redo = read_table(last, summary["restarts/redo"])  # cumulative over both restarts
    assert [(r["restart"], r["step"], r["metric"]) for r in redo] == [
        (1, 30, "loss"), (1, 40, "loss"), (1, 50, "loss"), (2, 70, "loss")]
    assert redo[0]["value"] == pytest.approx(1 / 30 + 1e-3) and redo[3]["value"] == pytest.approx(1 / 70 + 2e-3)


CRASHING_SESSION = textwrap.dedent("""
    import os, signal, sys, time
    from e2e_dist.config import RunConfig
    from e2e_dist.tracking import Tracker
    cfg = RunConfig.model_validate_json(sys.argv[1])
    tr = Tracker.start(cfg, rank=0, resume_step=None)
    for s in (10, 20, 30):
        tr.log({"loss": 1.0 / s}, step=s)
    time.sleep(2.5)  # > the 1 s transaction-log flush interval: 10..20 reach the file
    tr.log({"loss": 1.0 / 40}, step=40)  # still buffered in wandb-core when the process dies
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_hard_kill_then_restart_logs_what_wandb_lost(tmp_path):
    """A SIGKILLed rank 0 loses wandb-core's unflushed rows: the restart must re-log them, not skip them.

    Another run stays open in this process meanwhile, so the crashing child inherits this process's
    `$WANDB_SERVICE` (as Ray workers inherit it from a driver or test process that used wandb): the
    tracker must not share that service, or the killed run's id stays "in use" in it.
    """
    other = Tracker.start(make_cfg(tmp_path, name="bystander"), rank=0, resume_step=None)
    assert os.environ.get("WANDB_SERVICE")
    cfg = make_cfg(tmp_path, name="killed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CRASHING_SESSION, cfg.model_dump_json()], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id = wandb_run_id(cfg)
    persisted = last_step_in_files(wandb_dir(cfg), run_id)
    first = [r["_step"] for r in combined_history(cfg)]
    assert persisted == (first[-1] if first else None)
    assert persisted is None or persisted < 40  # step 40 was handed to W&B but never written

    tr = Tracker.start(cfg, rank=0, resume_step=20)  # last committed checkpoint: 20
    for s in (30, 40, 50):
        tr.log({"loss": 1.0 / s}, step=s)
    tr.finish()
    other.log({"loss": 1.0}, step=1)
    other.finish()  # the last open run: waits for wandb-core to complete every file

    steps = [r["_step"] for r in combined_history(cfg)]
    assert_strictly_increasing(steps)
    assert {30, 40, 50} <= set(steps)  # nothing the crash lost is missing from history...
    last = find_run_files(wandb_dir(cfg), run_id)[-1]
    summary = read_summary(last)
    (restart,) = summary["restarts/history"]
    assert restart["last_logged_step"] == 40 and restart["last_persisted_step"] == persisted
    redone = {r["step"] for r in read_table(last, summary["restarts/redo"])} if "restarts/redo" in summary else set()
    assert redone == {s for s in (30,) if persisted is not None and s <= persisted}  # ...nor logged twice


def test_no_secrets_in_wandb_files(tmp_path, monkeypatch):
    key, aws = "wandb-key-" + "3f9c" * 8, "aws-secret-" + "77ab" * 6
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + "TESTKEYID12345")
    cfg = RunConfig.model_validate({
        "name": "secret", "storage": {"path": str(tmp_path / "runs")}, "tracking": {"mode": "offline"},
        "deepspeed": {"overrides": {"aws_secret_access_key": aws, "comm": {"api_key": key}}}})
    tr = Tracker.start(cfg, rank=0, resume_step=None, extra_config={"wandb_api_key": key, "n_params": 3})
    tr.log({"loss": 1.0}, step=1)
    tr.finish()

    (f,) = find_run_files(wandb_dir(cfg))
    conf = read_config(f)
    assert conf["deepspeed"]["overrides"]["aws_secret_access_key"] == "***"
    assert conf["deepspeed"]["overrides"]["comm"]["api_key"] == "***"
    assert conf["wandb_api_key"] == "***" and conf["n_params"] == 3
    for p in (tmp_path / "runs").rglob("*"):  # every file W&B or we wrote: run log, metadata, state
        if p.is_file():
            blob = p.read_bytes()
            assert key.encode() not in blob and aws.encode() not in blob, p


def test_mode_auto_is_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg(tmp_path, mode="auto")
    assert resolve_mode(cfg) == "offline"
    assert resolve_mode(cfg, env={"WANDB_API_KEY": "k"}) == "online"
    assert resolve_mode(cfg, env={"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode(cfg, env={"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode(make_cfg(tmp_path, mode="online"), env={}) == "online"
    tr = Tracker.start(cfg, rank=0, resume_step=None)
    tr.log({"loss": 2.0}, step=5)
    tr.finish()
    assert tr.mode == "offline" and tr.run_dir.name.startswith("offline-run-")
    assert "wandb sync" in tr.describe()
    assert [r["_step"] for r in read_history(find_run_files(wandb_dir(cfg))[0])] == [5]


def test_online_without_credentials_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc from `wandb login`
    with pytest.raises(UserError) as err:
        Tracker.start(make_cfg(tmp_path, mode="online"), rank=0, resume_step=None)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("tracking.mode=online: W&B init failed") and "API key" in msg


def test_plan_resume_rewinds_online_only_when_history_may_be_ahead():
    assert plan_resume("offline", 20, 50) == ("allow", None)  # rewind is server-side only
    assert plan_resume("online", 20, 50) == ("rewind", 20)
    assert plan_resume("online", 50, 50) == ("allow", None)  # clean resume: nothing to drop
    assert plan_resume("online", None, 30) == ("rewind", 0)  # restart with no checkpoint yet
    assert plan_resume("online", 20, None) == ("rewind", 20)  # other machine: cannot know, so rewind
    assert plan_resume("online", None, None) == ("allow", None)  # first session


def test_log_image_at_step_and_in_summary(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = tmp_path / "curve.png"
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 3])
    fig.savefig(png)
    plt.close(fig)
    cfg = make_cfg(tmp_path, name="img")
    tr = Tracker.start(cfg, rank=0, resume_step=None)
    tr.log({"loss": 1.0}, step=1)
    tr.log_image("plots/curve", png, step=2)
    tr.log_image("plots/final", png)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tr.log_image("plots/none", tmp_path / "missing.png")
    tr.finish()
    (f,) = find_run_files(wandb_dir(cfg))
    rows = read_history(f)
    assert [r["_step"] for r in rows] == [1, 2] and rows[1]["plots/curve"]["_type"] == "image-file"
    final = read_summary(f)["plots/final"]
    assert final["_type"] == "image-file" and (f.parent / "files" / final["path"]).is_file()


def test_reader_checks_checksums_and_tolerates_a_torn_tail(tmp_path):
    cfg = make_cfg(tmp_path, name="rd")
    tr = Tracker.start(cfg, rank=0, resume_step=None)
    for s in range(1, 200):
        tr.log({"loss": float(s), "note": "x" * 300}, step=s)  # > one 32 KiB block
    tr.finish()
    (f,) = find_run_files(wandb_dir(cfg))
    n = len(read_records(f))
    assert [r["_step"] for r in read_history(f)] == list(range(1, 200))
    assert last_step_in_files(wandb_dir(cfg), wandb_run_id(cfg)) == 199

    torn = tmp_path / "torn.wandb"
    torn.write_bytes(f.read_bytes()[: 40 * 1024 + 11])  # cut inside the second block
    assert 0 < len(read_records(torn)) < n

    bad = bytearray(f.read_bytes())
    bad[200] ^= 0xFF  # inside the first record's payload
    corrupt = tmp_path / "bad.wandb"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(WandbFileError, match="checksum"):
        read_records(corrupt)
    shutil.rmtree(tmp_path / "runs")
