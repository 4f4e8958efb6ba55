"""Sweeps through real Ray Tune: trials are real TorchTrainer + DeepSpeed runs (tiny GPT, 1 worker each,
two at once on 2 CPUs), W&B offline, read back from the run files.

- a 4-trial data-ablation sweep (the shipped tune_configs/data_ablation.yaml made tiny) finishes,
  writes results.jsonl, gives every trial its own W&B run, and its data sizes really differ; the
  scaling fit runs on it (its extrapolation check, `--holdout largest`, needs one trial more: the
  refusal is checked here, the prediction in test_scaling.py); `--resume` of the finished sweep
  redoes nothing;
- ASHA stops a trial with a useless learning rate early and that trial ends cleanly at its next
  report (W&B run finished with `stopped_early`, its checkpoints committed and intact), a broken
  trial is an `error` row (on S3 storage, so Tune state and results live in a bucket), and every
  placement group is freed after;
- `e2e-dist sweep` interrupted with Ctrl+C (SIGINT) after a finished trial resumes with
  `--resume` without touching the finished ones; a trial that then fails after keep-N pruning
  continues from its newest committed checkpoint on the next `--resume`.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from e2e_dist.data.text import plan_splits, stdlib_files
from e2e_dist.errors import ConfigError, UserError
from e2e_dist.sweep.results import load_results
from e2e_dist.sweep.spec import load_sweep
from e2e_dist.tracking.offline_history import (find_run_files, read_config, read_history, read_records, read_run,
                                        read_summary)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TUNE = ROOT / "tune_configs"
STEPS = 16
TINY = [  # a tiny model and a short run: the sweep machinery is under test, not the model
    "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.max_seq_len=64", "data.seq_len=64",
    "data.max_files=40", "trainer.micro_batch_size=8", f"trainer.max_steps={STEPS}", "trainer.log_every=4",
    "trainer.eval_every=8", "trainer.eval_samples=32", f"trainer.ckpt_every={STEPS}", "trainer.warmup_steps=2",
    "max_concurrent_trials=2", "resources_per_trial.num_workers=1", "resources_per_trial.cpus_per_worker=0.99",
]
SIZES = [32768, 65536, 131072, 262144]  # data.max_bytes (unique training bytes); 4: the fewest an L(D) fit takes


def run_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under a trial's run dir (checkpoints, config, W&B) -> (size, mtime_ns)."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run_dir.rglob("*") if p.is_file() and "debug" not in p.name}


# ------------------------------------------------------------------------ a finished ablation sweep
@pytest.fixture(scope="module")
def ablation(ray_local, tmp_path_factory):
    store = tmp_path_factory.mktemp("sweeps")
    spec = load_sweep(TUNE / "data_ablation.yaml", [f"storage.path={store}", *TINY,
                                                    f"search_space.data.max_bytes={{grid: {SIZES}}}"])
    from e2e_dist.sweep.runner import run_sweep

    out = io.StringIO()
    rows = run_sweep(spec, live=False, out=out)
    return spec, rows, out.getvalue()


def test_sweep_finishes_with_one_wandb_run_per_trial(ablation) -> None:
    spec, rows, printed = ablation
    expected = {cfg.name: (params, cfg) for params, cfg in spec.trial_configs()}
    assert sorted(r["trial"] for r in rows) == sorted(expected) and len(rows) == len(SIZES)
    assert load_results(spec.sweep_uri) == rows  # what run_sweep returns is what results.jsonl holds
    assert (Path(spec.sweep_uri) / "_tune" / "tuner.pkl").is_file()  # Tune's state lives with the sweep
    run_ids = set()
    for row in rows:
        params, cfg = expected[row["trial"]]
        assert row["status"] == "completed" and row["params"] == params
        m = row["metrics"]
        assert m["step"] == STEPS and m["run_name"] == row["trial"] and m["val_loss"] > 0
        assert m["val_loss_best"] <= m["val_loss"]  # the sweep's metric: the best of its evaluations
        files = find_run_files(Path(spec.sweep_uri) / row["trial"] / "wandb")
        assert len(files) == 1, files  # one W&B session, one run
        info = read_run(files[0])
        run_ids.add(info.run_id)
        assert info.group == spec.name and info.name == row["trial"]
        assert f"max_bytes={params['data.max_bytes']}" in info.tags
        config = read_config(files[0])
        assert config["data"]["max_bytes"] == params["data.max_bytes"]  # the swept value in the W&B config
        assert config["tracking"]["group"] == spec.name and config["name"] == row["trial"]
        history = read_history(files[0])
        assert [h["_step"] for h in history] == [4, 8, 12, 16]
        assert history[-1]["val_loss"] == pytest.approx(m["val_loss"], rel=1e-6)  # W&B holds what Tune got
    assert len(run_ids) == len(SIZES)  # no two trials share a run

    # The final table lists the trials best first.
    by_loss = [r["trial"] for r in sorted(rows, key=lambda r: r["metrics"]["val_loss_best"])]
    table = printed[printed.index("sorted by val_loss_best"):]
    assert [table.index(name) for name in by_loss] == sorted(table.index(name) for name in by_loss)


def test_data_ablation_trials_used_their_planned_data(ablation) -> None:
    spec, rows, _ = ablation
    by_size = sorted(rows, key=lambda r: r["params"]["data.max_bytes"])
    files = stdlib_files()
    for row in by_size:
        cfg = spec.run_config_for(row["params"])
        plan = plan_splits(files, cfg.data, "stdlib")[0]
        assert row["metrics"]["train_tokens"] == plan.windows * plan.seq_len  # what the subset really held
        assert row["metrics"]["tokens_seen"] == STEPS * 8 * 64  # same compute for every size
    tokens = [r["metrics"]["train_tokens"] for r in by_size]
    # The first max_bytes bytes (plus an end-of-file token per whole file), in whole windows.
    assert all(abs(tok / size - 1) < 0.05 for tok, size in zip(tokens, SIZES)), tokens


def test_scaling_on_the_finished_sweep(ablation, tmp_path, capsys) -> None:
    from e2e_dist.cli import main

    spec, rows, _ = ablation
    assert main(["scaling", spec.sweep_uri]) == 0
    out = capsys.readouterr().out
    assert "L(D) = E + B/D^beta" in out and "W&B:" in out
    report = json.loads((Path(spec.sweep_uri) / "scaling_fit.json").read_text())
    # The sweep's own metric (the best evaluation); every trial the same steps, so D is the subset.
    assert report["n_points"] == len(SIZES) and report["d_key"] == "train_tokens" and report["metric"] == "val_loss_best"
    # When each trial found its best evaluation (steps 8 and 16): a best at the last step means the
    # trial was still learning when it ended, and the report names it.
    best = {r["trial"]: r["metrics"]["val_loss_best_step"] for r in rows}
    assert set(best.values()) <= {8, 16} and all(r["metrics"]["step"] == STEPS for r in rows), best
    assert sorted(report["still_learning"]) == sorted(t for t, s in best.items() if s == STEPS)
    assert (Path(spec.sweep_uri) / "scaling_fit.png").stat().st_size > 1000
    # The plot went to W&B: a `<sweep>-scaling` run in the sweep's group.
    files = find_run_files(Path(spec.sweep_uri) / f"{spec.name}-scaling" / "wandb")
    assert len(files) == 1 and read_run(files[0]).group == spec.name
    summary = read_summary(files[0])
    assert summary["scaling/fit"]["_type"] == "image-file"
    assert summary["scaling/beta"] == pytest.approx(report["params"]["beta"])
    # The fit made again replaces the W&B run's files: still one offline folder (wandb sync uploads it once).
    assert main(["scaling", spec.sweep_uri]) == 0
    capsys.readouterr()
    files = find_run_files(Path(spec.sweep_uri) / f"{spec.name}-scaling" / "wandb")
    assert len(files) == 1 and read_summary(files[0])["scaling/beta"] == pytest.approx(report["params"]["beta"])

    # The extrapolation check would fit 3 points for 3 parameters: refused in one line, nothing lost.
    assert main(["scaling", spec.sweep_uri, "--holdout", "largest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs at least 4 finished trials, got 3 (after holding out largest)" in err
    assert json.loads((Path(spec.sweep_uri) / "scaling_fit.json").read_text()) == report

    # Too few completed trials for L(D): one clear line, exit code 2.
    few = tmp_path / "few"
    few.mkdir()
    (few / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert main(["scaling", str(few)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs at least" in err


def test_resume_of_a_finished_sweep_redoes_nothing(ablation) -> None:
    from e2e_dist.sweep.runner import run_sweep

    spec, rows, _ = ablation
    before = {r["trial"]: run_files(Path(spec.sweep_uri) / r["trial"]) for r in rows}
    again = run_sweep(spec, resume=True, live=False, out=io.StringIO())
    assert again == rows
    assert {r["trial"]: run_files(Path(spec.sweep_uri) / r["trial"]) for r in rows} == before


def test_refusals_before_anything_runs(ablation, tmp_path) -> None:
    from e2e_dist.sweep.runner import run_sweep

    spec, _, _ = ablation
    with pytest.raises(UserError, match="already exists .* pass --resume"):
        run_sweep(spec, live=False, out=io.StringIO())
    changed = load_sweep(TUNE / "data_ablation.yaml", [f"storage.path={Path(spec.sweep_uri).parent}", *TINY,
                                                       "trainer.max_steps=17",
                                                       f"search_space.data.max_bytes={{grid: {SIZES}}}"])
    with pytest.raises(ConfigError, match=r"--resume: the sweep changed .*max_steps: 16 -> 17"):
        run_sweep(changed, resume=True, live=False, out=io.StringIO())
    fresh = load_sweep(TUNE / "data_ablation.yaml", [f"storage.path={tmp_path}", *TINY])
    with pytest.raises(UserError, match="--resume: no sweep state under"):
        run_sweep(fresh, resume=True, live=False, out=io.StringIO())


def test_a_sweep_owes_the_trials_tune_never_started() -> None:
    """Ctrl+C between two trials (seen in the interrupt test below) leaves no trial unfinished in
    Tune's view; the sweep still owes the ones it never created, so it is interrupted, not done."""
    from e2e_dist.sweep.runner import trials_left

    spec = load_sweep(TUNE / "data_ablation.yaml", [*TINY, f"search_space.data.max_bytes={{grid: {SIZES}}}"])
    assert trials_left(spec, 4, []) == []
    assert trials_left(spec, 1, []) == ["(not started 1)", "(not started 2)", "(not started 3)"]
    assert trials_left(spec, 2, ["t2"]) == ["t2", "(not started 1)"]
    assert trials_left(spec, 3, ["t3"]) == ["t3"]


# ------------------------------------------------------------------------------------------ ASHA
def test_asha_stops_useless_trials_early(ray_local, s3_bucket, s3_server, tmp_path) -> None:
    """Two good learning rates run first (two at once); the useless one (1e-7) reaches ASHA's first
    rung after both good ones recorded far lower losses there, so it must stop, and end cleanly at
    its next report: W&B run finished (exit code 0, `stopped_early` in its summary), checkpoints all
    committed. A fourth trial has too little data and fails: an `error` row. Storage is S3: Tune's
    state and results live there."""
    import ray

    from e2e_dist.checkpoint import find_latest_committed, list_checkpoints
    from e2e_dist.sweep.runner import run_sweep

    max_steps, ckpt_every = 24, 8
    sweep = tmp_path / "asha.yaml"
    sweep.write_text(f"""
name: asha-test
base: tiny-text
search: grid
points:
  - {{trainer.lr: 0.01, data.max_bytes: 200000}}
  - {{trainer.lr: 0.005, data.max_bytes: 200000}}
  - {{trainer.lr: 1.0e-7, data.max_bytes: 200000}}
  - {{trainer.lr: 1.0e-8, data.max_bytes: 40}}
scheduler: {{type: asha, max_t: {max_steps // 4}, grace_period: 1, reduction_factor: 2}}
""")
    spec = load_sweep(sweep, [*TINY, f"trainer.max_steps={max_steps}", "trainer.eval_every=4",
                              f"trainer.ckpt_every={ckpt_every}", "trainer.warmup_steps=0",
                              f"storage.path={s3_bucket}/sweeps", f"storage.endpoint_url={s3_server.url}",
                              f"tracking.dir={tmp_path}/wb"])
    rows = {r["params"]["trainer.lr"]: r for r in run_sweep(spec, live=False, out=io.StringIO())}
    assert load_results(spec.results_uri, spec.base_config.storage) == sorted(rows.values(), key=lambda r: r["trial"])

    assert rows[1e-7]["status"] == "stopped" and rows[1e-7]["metrics"]["step"] < max_steps
    assert any(r["status"] == "completed" and r["metrics"]["step"] == max_steps for r in rows.values())
    assert rows[1e-8]["status"] == "error" and "fewer than one window" in rows[1e-8]["error"]
    # W&B: one run per trial that trained, in the shared W&B dir, each one finished (exit code 0).
    # A stopped trial trains on to its next logging step after rank 0 saw the stop (every 4 steps
    # here), reports there and finishes its run, saying so; its row keeps the result ASHA judged.
    wandb_dir = tmp_path / "wb" / "wandb"
    runs = {read_run(f).name: f for f in find_run_files(wandb_dir)}
    trained = {lr: r for lr, r in rows.items() if r["status"] != "error"}
    assert sorted(runs) == sorted(r["trial"] for r in trained.values()) and len(find_run_files(wandb_dir)) == 3
    configs = {cfg.name: cfg for _, cfg in spec.trial_configs()}
    for lr, r in trained.items():
        f = runs[r["trial"]]
        assert read_run(f).group == spec.name and read_config(f)["trainer"]["lr"] == lr
        exits = [rec.exit.exit_code for rec in read_records(f) if rec.WhichOneof("record_type") == "exit"]
        assert exits == [0], (r["trial"], exits)  # finished, not crashed
        last = max(h["_step"] for h in read_history(f))
        summary = read_summary(f)
        if r["status"] == "completed":
            assert last == max_steps and "stopped_early" not in summary
        else:
            decided = r["metrics"]["step"]
            assert summary["stopped_early"] == 1 and summary["stopped_by"] == "asha", summary
            assert summary["stop_decision_step"] == decided
            assert summary["stopped_at_step"] == last and decided < last <= max_steps and last % 4 == 0
        # Checkpoints: every directory committed (nothing cut mid-upload), the newest one verifies.
        cfg = configs[r["trial"]]
        infos = list_checkpoints(cfg.run_uri, cfg.storage)
        assert all(i.committed for i in infos), [(i.step, i.reason) for i in infos]
        newest, skipped = find_latest_committed(cfg.run_uri, cfg.storage, verify_checksums=True)
        assert not skipped and newest is not None and newest.step == last - last % ckpt_every, (r["trial"], last)

    # A stopped trial's Train run is aborted by its controller: its workers' placement group must be
    # freed (a leak would starve, then deadlock, the next trials on a small machine).
    deadline = time.time() + 90
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    # ... and soon: the trial reports at its next logging step after rank 0 saw the stop (polled
    # every 2 s), not at its next evaluation or checkpoint
    from e2e_dist.console import default_log_path

    logs = "".join(p.read_text() for p in default_log_path(spec.sweep_uri, spec.name).parent.glob(f"{spec.name}-*.log"))
    released = [float(m) for m in re.findall(r"its workers were released ([\d.]+) s after the decision", logs)]
    assert released and max(released) < 30, logs[-3000:]
    # the three trials of one data config prepared it once (sweep/shared_data.py); the 40-byte one failed in it
    assert "data prepared {'prepared': 1, 'reused': 2}" in logs, logs[-3000:]
    assert logs.count("reuses the data an earlier trial of the sweep prepared") == 2


# ----------------------------------------------------------------------- interrupt, fail, resume
def test_interrupted_sweep_resumes_without_redoing_finished_trials(ray_local, tmp_path, request) -> None:
    """The real CLI in a subprocess, a driver of the session's Ray cluster (`--address`, as on a
    real cluster), one trial at a time, checkpoints every 4 steps with keep_last=1:
    1. SIGINT once the first trial is finished (the second is then starting): exit 130;
    2. `--resume` with a drill that kills the second trial at step 14, after keep-N pruning deleted
       its older checkpoints: an `error` row, exit 1;
    3. `--resume` again: the failed trial continues from its newest committed checkpoint (Ray's run
       snapshot still lists the pruned ones; left in place, Ray 2.60 refuses to start the run: the
       same driver as `e2e-dist train`, fit_run, removes it).
    The finished trial is never run again."""
    from e2e_dist.train.faults import fault_marker_dir

    cwd = Path(tempfile.mkdtemp(prefix="e2es-", dir="/tmp"))
    store = tmp_path / "runs"
    args = [sys.executable, "-m", "e2e_dist.cli", "sweep", str(TUNE / "data_ablation.yaml"),
            "--address", f"127.0.0.1:{os.environ['RAY_GCS_SERVER_PORT']}",
            *(f"--set={o}" for o in [f"storage.path={store}", *TINY, "trainer.async_checkpoint=false",
                                     "trainer.ckpt_every=4", "trainer.keep_last=1",
                                     "search_space.data.max_bytes={grid: [65536, 131072]}", "max_concurrent_trials=1"])]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    results = store / "data-ablation" / "results.jsonl"

    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    request.addfinalizer(lambda: shutil.rmtree(cwd, ignore_errors=True))
    try:
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            if results.exists() and len(results.read_text().splitlines()) >= 1:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.3)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first_log = (tmp_path / "first.log").read_text()
    assert rc == 130, first_log[-3000:]
    assert "--resume" in first_log  # the CLI says how to continue
    done = load_results(str(store / "data-ablation"))
    assert [r["status"] for r in done] == ["completed"], done
    before = {r["trial"]: run_files(store / "data-ablation" / r["trial"]) for r in done}

    def unchanged() -> None:  # not one file of the finished trial (checkpoints, W&B) touched
        assert {r["trial"]: run_files(store / "data-ablation" / r["trial"]) for r in done} == before

    second = subprocess.run([*args, "--resume"], cwd=cwd, env={**env, "E2E_DIST_FAULT": "crash@14"},
                            capture_output=True, text=True, timeout=400)
    rows = load_results(str(store / "data-ablation"))
    (failed,) = [r for r in rows if r["trial"] not in before]
    run_dir = store / "data-ablation" / failed["trial"]
    request.addfinalizer(lambda: shutil.rmtree(fault_marker_dir(str(run_dir)), ignore_errors=True))
    assert second.returncode == 1 and "1 trial(s) failed" in second.stdout + second.stderr, \
        (second.stdout + second.stderr)[-3000:]
    assert failed["status"] == "error" and "failed" in failed["error"], failed
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000012"]  # 4 and 8 pruned
    assert "step_00000004" in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    unchanged()

    third = subprocess.run([*args, "--resume"], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    final = load_results(str(store / "data-ablation"))
    assert len(final) == 2 and all(r["status"] == "completed" and r["metrics"]["step"] == STEPS for r in final)
    unchanged()
    assert [r for r in final if r["trial"] in before] == done
    # The interrupted, then failed trial ended with one W&B run whose history reaches the last step
    # exactly once, and it continued from step 12 instead of starting over.
    files = find_run_files(run_dir / "wandb")
    steps = [h["_step"] for f in files for h in read_history(f)]
    assert len({read_run(f).run_id for f in files}) == 1 and steps.count(STEPS) == 1, steps
    assert sorted(set(steps)) == [4, 8, 12, 16]
    assert read_summary(files[-1])["restarts/last_resumed_from_step"] == 12
