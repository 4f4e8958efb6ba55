"""End to end through a real local Ray, real DeepSpeed engines and 2 gloo workers.

One straight ZeRO-3 run is the reference. Runs of the same config that are interrupted end with
the reference's losses (same data position, LR schedule and optimizer state): one with worker
deaths and a SIGTERM, restarted by Ray Train within the run; one stopped by crashes and resumed
with --resume on other world sizes and ZeRO stages.

The data is the way corpora come (issue: real workloads): this Python's standard-library sources
as documents in 3 Parquet shards (row groups of 8) and 2 JSONL shards, read by the `text` source's
record path (data/records.py), each rank reading its own windows from the shards (data.cache_mb=0).
So every kill / restart / resize / SIGTERM test here also proves that a resumed run sees exactly
the windows of the uninterrupted one, mid-epoch, on record shards.
"""

from __future__ import annotations

import json

import pytest

from e2e_dist.config import load_run_config
from e2e_dist.errors import UserError
from tests.helpers.listeners import ListenerSampler
from e2e_dist.tracking.offline_history import find_run_files, read_history

pytestmark = pytest.mark.slow

STEPS = 16


_CORPUS: list[str] = []


def record_corpus() -> str:
    """The test corpus (written once per session): 60 stdlib files as documents, in record shards."""
    if not _CORPUS:
        import atexit
        import shutil
        import tempfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        from e2e_dist.data.common import seeded_order
        from e2e_dist.data.text import stdlib_files

        root = tempfile.mkdtemp(prefix="e2e-records-")
        atexit.register(shutil.rmtree, root, True)
        files = [f for f in seeded_order(stdlib_files(), seed=0) if f.size < 20_000][:60]
        docs = [open(f.uri, encoding="utf-8", errors="replace").read() for f in files]
        for i in range(5):
            part = docs[i::5]
            if i < 3:
                pq.write_table(pa.table({"text": part, "n": list(range(len(part)))}), f"{root}/part-{i}.parquet",
                               row_group_size=8)
            else:
                with open(f"{root}/part-{i}.jsonl", "w") as f:
                    f.writelines(json.dumps({"text": d}) + "\n" for d in part)
        _CORPUS.append(root)
    return _CORPUS[0]


def tiny_cfg(tmp_path, name: str, zero: int, *extra: str):
    return load_run_config("tiny-text", [
        "data.source=text", f"data.paths=[{record_corpus()}]", "data.max_files=null",
        f"name={name}", f"storage.path={tmp_path}/runs", f"deepspeed.zero_stage={zero}",
        "data.cache_mb=0",  # every rank reads its own windows from the shards (no copy in memory)
        "model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.max_seq_len=64", "data.seq_len=64",
        "data.max_bytes=400000", "trainer.micro_batch_size=8", f"trainer.max_steps={STEPS}",
        "trainer.log_every=4", "trainer.eval_every=8", "trainer.eval_samples=32", "trainer.ckpt_every=8",
        "trainer.warmup_steps=2", "trainer.lr=0.003", "trainer.async_checkpoint=false", *extra,
    ])


def history(cfg) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for f in find_run_files(f"{cfg.storage.path}/{cfg.name}/wandb"):
        for row in read_history(f):
            assert row["_step"] not in rows or rows[row["_step"]] == row, "duplicate W&B step"
            rows[row["_step"]] = row
    return rows


def follows_reference(cfg, summary, reference, *, rel: float) -> dict[int, dict]:
    """The run ended where the uninterrupted reference did: every logged step once, the same losses
    (to `rel`), LRs and tokens; returns its history."""
    ref_cfg, ref, _ = reference
    assert summary.metrics["step"] == STEPS and summary.metrics["tokens_seen"] == ref.metrics["tokens_seen"]
    ref_hist, hist = history(ref_cfg), history(cfg)
    assert sorted(hist) == [4, 8, 12, 16]
    for step in (4, 8, 12, 16):
        assert hist[step]["loss"] == pytest.approx(ref_hist[step]["loss"], rel=rel), step
        assert hist[step]["lr"] == pytest.approx(ref_hist[step]["lr"], rel=1e-9), step
    assert summary.metrics["val_loss"] == pytest.approx(ref.metrics["val_loss"], rel=rel)
    return hist


@pytest.fixture(scope="module")
def reference_z3(ray_local, tmp_path_factory):
    from e2e_dist.train.launcher import run_training

    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_cfg(tmp, "ref-z3", 3)
    sampler = ListenerSampler()  # what every process of the run listens on, while it runs
    sampler.start()
    try:
        summary = run_training(cfg, quiet=True)
    finally:
        sampler.stop()
    return cfg, summary, sampler


def test_a_local_run_listens_on_loopback_only(reference_z3):
    """Ray, the Train workers, gloo and torch's rendezvous store: nothing on another address
    (torch's TCPStore alone listened on `*:<port>` before it was given a bound socket)."""
    sampler = reference_z3[2]
    assert sampler.samples > 5
    # the Train workers' own listeners were seen (rank 0's store, gloo), not only Ray's
    assert any("RayTrainWorker" in name for *_, name in sampler.seen), sampler.seen
    assert sampler.outside_loopback() == [], sorted(sampler.seen)


def test_zero3_trains_checkpoints_and_logs(reference_z3):
    cfg, summary, _ = reference_z3
    m = summary.metrics
    assert m["step"] == STEPS and m["world_size"] == 2 and m["zero_stage"] == 3
    hist = history(cfg)
    assert sorted(hist) == [4, 8, 12, 16]
    assert hist[16]["loss"] < hist[4]["loss"] - 0.3  # it learns
    assert hist[16]["loss"] == pytest.approx(m["loss"], rel=1e-6)  # W&B holds what the run reported
    assert "val_bpb" in hist[8] and "val_bpb" in hist[16] and "val_bpb" not in hist[4]
    assert m["tokens_seen"] == STEPS * 2 * 8 * 64
    # the final checkpoint is committed and holds both ranks' ZeRO shards
    manifest = json.loads(open(f"{summary.checkpoint_uri}/manifest.json").read())
    assert manifest["step"] == STEPS and manifest["world_size"] == 2 and manifest["zero_stage"] == 3
    assert manifest["save_id"], "commits are fenced by the worker group's attempt id (ray_compat.train_attempt_id)"
    files = [f["path"] for f in manifest["files"]]
    for rank in (0, 1):
        assert any(f"zero_pp_rank_{rank}_" in p and "optim_states" in p for p in files), files
        assert any(f"zero_pp_rank_{rank}_" in p and "model_states" in p for p in files), files
    assert m["sample"].startswith("def ")
    # Each rank's read tasks read its own windows only: half of what both read (read-ahead included),
    # and every window the run trained on was read by one rank, not both.
    assert m["data/samples_read_max_rank"] <= 0.55 * m["data/samples_read"], m
    assert m["data/samples_read"] >= STEPS * 2 * 8 and m["data/bytes_read"] > 0


def test_worker_deaths_and_a_sigterm_recover_to_the_same_result(reference_z3, tmp_path, monkeypatch):
    """Three interruptions in one run (async checkpoint uploads every 8 steps): rank 1 dies at step 6
    (before any checkpoint: the restarted group begins at 0); rank 1 gets SIGTERM at step 10 (a spot
    reclaim: every rank checkpoints just in time at the next log interval, step 12, between the
    regular step-8 and step-16 checkpoints, after step 8's upload has committed); rank 0 (the one
    holding W&B) dies at step 14. Ray Train restarts the group each time, each restart resumes from
    the newest *committed* checkpoint, and the run ends exactly where the uninterrupted one did,
    with one W&B history row per logged step."""
    from e2e_dist.checkpoint import list_checkpoints
    from e2e_dist.train.launcher import run_training
    from e2e_dist.tracking.offline_history import read_summary

    _, ref, _ = reference_z3
    cfg = tiny_cfg(tmp_path, "crashy-z3", 3, "trainer.async_checkpoint=true", "trainer.max_failures=3",
                   "trainer.keep_last=3")
    monkeypatch.setenv("E2E_DIST_FAULT", "crash@6:1,sigterm@10:1,crash@14:0")
    monkeypatch.setenv("E2E_DIST_FAULT_DIR", str(tmp_path))
    summary = run_training(cfg, quiet=True)
    assert sorted(p.name for p in tmp_path.glob("e2e-dist-fault-*")) == [
        "e2e-dist-fault-crashy-z3-crash-14-0", "e2e-dist-fault-crashy-z3-crash-6-1",
        "e2e-dist-fault-crashy-z3-sigterm-10-1"]
    assert summary.metrics["step"] == STEPS and summary.metrics["tokens_seen"] == ref.metrics["tokens_seen"]
    assert summary.metrics["val_loss"] == pytest.approx(ref.metrics["val_loss"], rel=2e-3)
    assert sorted(history(cfg)) == [4, 8, 12, 16]
    steps = sorted(c.step for c in list_checkpoints(cfg.run_uri, cfg.storage) if c.committed)
    assert steps == [8, 12, 16]  # 12 is the just-in-time one
    summary_rows = read_summary(find_run_files(f"{cfg.storage.path}/{cfg.name}/wandb")[-1])
    assert summary_rows["restarts/count"] == 3
    assert summary_rows["restarts/last_resumed_from_step"] == 12  # the rank-0 death resumed from the SIGTERM's


def test_resized_and_restaged_resumes_follow_the_uninterrupted_run(reference_z3, tmp_path, monkeypatch, capsys):
    """2 workers at ZeRO-2 -> 1 worker at ZeRO-3 -> 2 workers at ZeRO-1, each leg stopped by a crash
    after a committed checkpoint (max_failures=0: the run fails) and resumed with --resume (a plain
    start over the checkpoints is refused), the global batch held at 16 windows
    (1 worker accumulates 2 micro-batches). Every logged loss is the uninterrupted 2-worker ZeRO-3
    run's: same data (the position is world-size free), same weights and Adam moments (universal
    form, checked exactly in tests/test_checkpoint_universal.py), same LR schedule. Tolerance 1e-4:
    only the order of float32 gradient sums differs (2 ranks' all-reduce vs 1 rank's accumulation,
    ZeRO-3 vs ZeRO-1/2 flat buffers); a wrong window or a lost moment moves the loss by > 1e-2."""
    from e2e_dist.checkpoint import list_checkpoints
    from e2e_dist.train.launcher import run_training

    legs = [("2", "2", "crash@9:1"), ("1", "3", "crash@13:0"), ("2", "1", None)]
    monkeypatch.setenv("E2E_DIST_FAULT_DIR", str(tmp_path))
    for i, (workers, zero, fault) in enumerate(legs):
        cfg = tiny_cfg(tmp_path, "resized", int(zero), f"trainer.num_workers={workers}", "trainer.global_batch_size=16",
                       "trainer.ckpt_every=4", "trainer.keep_last=4")
        if fault:
            monkeypatch.setenv("E2E_DIST_FAULT", fault)
            with pytest.raises(UserError, match="run 'resized' failed") as failed:
                run_training(cfg, resume=i > 0, quiet=True)  # max_failures=0: the run stops
            # one line: the cause, then where it can go on from and how
            assert str(failed.value).endswith(f"; its newest committed checkpoint is step {8 if i == 0 else 12}: the "
                                              "same command with --resume continues from it (trainer.max_failures > 0 "
                                              "restarts it by itself)"), str(failed.value)
            if i == 0:  # a new run over committed checkpoints is refused, before anything starts
                with pytest.raises(UserError, match="already has checkpoints.*--resume"):
                    run_training(cfg, quiet=True)
        else:
            monkeypatch.delenv("E2E_DIST_FAULT")
            summary = run_training(cfg, resume=True, quiet=True)
    assert summary.metrics["world_size"] == 2
    hist = follows_reference(cfg, summary, reference_z3, rel=1e-4)
    # W&B stays one run: the world size of every logged step, and the resizes in the summary.
    assert [hist[s]["world_size"] for s in (4, 8, 12, 16)] == [2, 2, 1, 2]
    # the first row after each resize says so (its event), the others do not
    assert [hist[s].get("resize/from_world_size") for s in (4, 8, 12, 16)] == [None, None, 2, 1]
    from e2e_dist.tracking.offline_history import read_summary

    run_summary = read_summary(find_run_files(f"{cfg.storage.path}/{cfg.name}/wandb")[-1])
    assert run_summary["resizes/count"] == 2
    assert run_summary["resizes/world_sizes"] == [{"from_step": 0, "world_size": 2}, {"from_step": 8, "world_size": 1},
                                                  {"from_step": 12, "world_size": 2}]
    # Each resharded resume left its universal form committed next to the checkpoint it came from.
    infos = {c.step: c for c in list_checkpoints(cfg.run_uri, cfg.storage)}
    assert [infos[s].manifest["world_size"] for s in (8, 12, 16)] == [2, 1, 2]
    for step in (8, 12):
        assert (tmp_path / "runs" / "resized" / f"step_{step:08d}" / "universal" / "manifest.json").is_file()
    from e2e_dist.cli import main

    capsys.readouterr()
    assert main(["checkpoints", cfg.run_uri]) == 0
    rows = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()]
    assert [(r[0], r[2].split("  ")[0]) for r in rows] == [
        ("16", "2x ZeRO-1"), ("12", "1x ZeRO-3 +universal"), ("8", "2x ZeRO-2 +universal"), ("4", "2x ZeRO-2")]
