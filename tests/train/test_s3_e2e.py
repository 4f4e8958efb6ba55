"""Runs and checkpoints in S3, end to end: real local Ray, real DeepSpeed ZeRO-3, 2 gloo workers,
moto's S3 server over HTTP on 127.0.0.1 (spoken to with boto3/pyarrow exactly as AWS).

One 12-step ZeRO-3 run writes to `s3://<bucket>/runs` (checkpoints at steps 4, 8 and 12;
keep_last=2 deletes step 4 once step 12 has committed). The tests then look at what the bucket
holds, export its ZeRO-3 checkpoint and sample from the export in a separate `e2e-dist generate`
process, and resume the run after corrupting its newest checkpoint. The resume
tests read the run's state from storage each time (they do not assume which of them ran first);
they append to the shared run, so the read-only tests come first in this file.
The CLI error tests need no Ray at all: they must fail before Ray is started.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e_dist.config import RunConfig, load_run_config
from e2e_dist.tracking import wandb_dir, wandb_run_id
from tests.conftest import ROOT
from tests.fixtures.s3 import _boto3_client, _free_port, empty_and_delete_bucket, get_object, list_keys, make_bucket
from e2e_dist.tracking.offline_history import find_run_files, read_history, read_summary

pytestmark = pytest.mark.slow

CLI = str(ROOT / ".venv" / "bin" / "e2e-dist")
STEPS, CKPT_EVERY, MICRO, SEQ, WORLD = 12, 4, 8, 64, 2
TOKENS_PER_STEP = WORLD * MICRO * SEQ


def s3_cfg(run_root: str, name: str, *extra: str) -> RunConfig:
    """A tiny byte-level GPT on ZeRO-3 whose run lives in S3 (W&B files in the default place: a
    stable local folder of the run, copied to `<run>/wandb/` in the bucket)."""
    return load_run_config("tiny-text", [
        f"name={name}", f"storage.path={run_root}", "deepspeed.zero_stage=3",
        "model.n_layer=2", "model.d_model=64", "model.n_head=2", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}",
        "data.max_files=60", "data.max_bytes=400000", f"trainer.micro_batch_size={MICRO}",
        f"trainer.max_steps={STEPS}", "trainer.log_every=4", "trainer.eval_every=12", "trainer.eval_samples=32",
        f"trainer.ckpt_every={CKPT_EVERY}", "trainer.keep_last=2", "trainer.warmup_steps=2", "trainer.lr=0.003",
        *extra,
    ])


def committed_steps(cfg: RunConfig) -> list[int]:
    from e2e_dist.checkpoint import list_checkpoints

    return sorted(c.step for c in list_checkpoints(cfg.run_uri, cfg.storage) if c.committed)


def wandb_history(cfg: RunConfig) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for f in find_run_files(wandb_dir(cfg)):
        for row in read_history(f):
            assert row["_step"] not in rows, f"W&B step {row['_step']} logged twice"
            rows[row["_step"]] = row
    return rows


def last_wandb_summary(cfg: RunConfig) -> dict:
    return read_summary(find_run_files(wandb_dir(cfg))[-1])


@dataclass
class S3Run:
    cfg: RunConfig
    summary: object  # launcher.RunSummary of the first STEPS steps
    endpoint: str
    bucket: str


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_server, tmp_path_factory) -> Iterator[S3Run]:
    from e2e_dist.train.launcher import run_training

    bucket = make_bucket(s3_server.url, prefix="e2e-s3run")
    cfg = s3_cfg(f"{bucket}/runs", "s3-z3")
    summary = run_training(cfg, quiet=True)
    yield S3Run(cfg, summary, s3_server.url, bucket)
    if s3_server.running:
        empty_and_delete_bucket(s3_server.url, bucket)


# ------------------------------------------------------------------------------ what S3 holds
def test_bucket_holds_every_ranks_shards_parts_and_manifest(s3_run):
    cfg, summary, endpoint = s3_run.cfg, s3_run.summary, s3_run.endpoint
    assert summary.metrics["step"] == STEPS and summary.metrics["world_size"] == WORLD
    assert summary.metrics["zero_stage"] == 3
    assert summary.checkpoint_uri == f"{cfg.run_uri}/step_{STEPS:08d}"
    keys = list_keys(endpoint, cfg.run_uri)
    assert "config.yaml" in keys
    # keep_last=2: step 4 was deleted, but only after step 12 had committed.
    assert {k.split("/")[0] for k in keys if k.startswith("step_")} == {f"step_{s:08d}" for s in (8, 12)}
    for step in (STEPS - CKPT_EVERY, STEPS):
        d = f"step_{step:08d}/"
        ckpt = {k[len(d):]: size for k, size in keys.items() if k.startswith(d)}
        for rank in range(WORLD):
            assert f"ds/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in ckpt, sorted(ckpt)
            assert f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in ckpt, sorted(ckpt)
            assert f"_parts/rank_{rank:05d}.json" in ckpt, sorted(ckpt)
        manifest = json.loads(get_object(endpoint, f"{cfg.run_uri}/{d}manifest.json"))
        assert (manifest["step"], manifest["world_size"], manifest["zero_stage"]) == (step, WORLD, 3)
        # The manifest lists every object of the checkpoint (all but itself and the parts) with its size...
        listed = {f["path"]: f["size"] for f in manifest["files"]}
        assert listed == {k: s for k, s in ckpt.items() if k != "manifest.json" and not k.startswith("_parts/")}
        # ... and each rank's part lists exactly the files that rank uploaded, with the same checksums.
        for rank in range(WORLD):
            part = json.loads(get_object(endpoint, f"{cfg.run_uri}/{d}_parts/rank_{rank:05d}.json"))
            assert part["rank"] == rank and part["step"] == step
            assert any(f"zero_pp_rank_{rank}_" in f["path"] for f in part["files"])
            for f in part["files"]:
                assert listed[f["path"]] == f["size"]
    # The checksum in the manifest is the one of the bytes in the bucket.
    manifest = json.loads(get_object(endpoint, f"{summary.checkpoint_uri}/manifest.json"))
    shard = next(f for f in manifest["files"] if "zero_pp_rank_1_" in f["path"] and "optim" in f["path"])
    assert hashlib.sha256(get_object(endpoint, f"{summary.checkpoint_uri}/{shard['path']}")).hexdigest() == shard["sha256"]
    # No credential in what the run stored.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert secret not in get_object(endpoint, f"{cfg.run_uri}/config.yaml")
    assert secret not in get_object(endpoint, f"{summary.checkpoint_uri}/manifest.json")
    assert sorted(wandb_history(cfg)) == [4, 8, 12]


def test_wandb_files_are_local_and_next_to_the_run_in_s3(s3_run, tmp_path):
    """Not in Ray's session temp dir: a stable folder of the run (printed), and a copy in the bucket
    that `wandb sync` can use from anywhere, holding the same history."""
    cfg, summary, endpoint = s3_run.cfg, s3_run.summary, s3_run.endpoint
    local = Path(summary.wandb_dir)
    assert local.parent == wandb_dir(cfg) and "/.cache/ray" not in str(local) and "session_" not in str(local)
    assert summary.wandb_copy == f"{cfg.run_uri}/wandb/{local.name}"  # what the summary prints
    assert local.is_relative_to(Path.home() / ".cache" / "e2e-dist" / "wandb")
    run_id = wandb_run_id(cfg)
    stored = {k: v for k, v in list_keys(endpoint, cfg.run_uri).items() if k.startswith("wandb/")}
    wandb_file = f"wandb/{local.name}/run-{run_id}.wandb"
    assert wandb_file in stored and f"wandb/e2e-dist-tracking-{run_id}.json" in stored, sorted(stored)
    assert not any("/logs/" in k or "/tmp/" in k for k in stored)  # only what `wandb sync` needs
    copy = tmp_path / local.name / f"run-{run_id}.wandb"
    copy.parent.mkdir()
    copy.write_bytes(get_object(endpoint, f"{cfg.run_uri}/{wandb_file}"))
    assert [r["_step"] for r in read_history(copy)] == [4, 8, 12]
    assert copy.read_bytes() == (local / f"run-{run_id}.wandb").read_bytes()  # the final copy, complete


# ------------------------------------------------------------------------------ export + generate
def test_export_of_zero3_checkpoint_from_s3_equals_trained_weights(s3_run, tmp_path):
    """The reference is gathered without export.py: the checkpoint's objects downloaded with plain
    boto3 and consolidated with DeepSpeed's zero_to_fp32 here; and the run's own final sample (made
    by the loop from the ZeRO-3 parameters it gathered in memory) must come out of `e2e-dist
    generate` on the exported file byte for byte, which needs the very same weights."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors import safe_open

    from e2e_dist.export import export_checkpoint

    cfg, endpoint = s3_run.cfg, s3_run.endpoint
    source = f"{cfg.run_uri}/step_{STEPS:08d}"
    out = f"{s3_run.bucket}/exports/z3.safetensors"
    info = export_checkpoint(source, out, cfg.storage)
    assert info["step"] == STEPS and info["out"] == out

    # Reference: the raw shards of every rank, consolidated in this process.
    ref_dir = tmp_path / "ckpt"
    for rel in list_keys(endpoint, source):
        (ref_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (ref_dir / rel).write_bytes(get_object(endpoint, f"{source}/{rel}"))
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ref_dir), tag="ds")
    assert len(ref) > 5

    local = tmp_path / "z3.safetensors"
    local.write_bytes(get_object(endpoint, out))
    with safe_open(str(local), framework="pt") as f:
        tied = json.loads(f.metadata()["e2e_dist.tied"])
        got = {k: f.get_tensor(k) for k in f.keys()}
    got.update({alias: got[stored] for alias, stored in tied.items()})
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and got[k].shape == v.shape, k
        assert torch.equal(got[k], v.float()), k

    # `generate` in a fresh process (plain PyTorch, the file read from s3:// via AWS_ENDPOINT_URL),
    # with the loop's sampling settings: the same bytes as the trained model produced.
    sample = s3_run.summary.metrics["sample"]
    assert sample.startswith("def ") and len(sample) > 4
    # One thread, like the Ray worker that sampled: no last-bit differences from a parallel matmul.
    proc = subprocess.run([CLI, "generate", out, "--prompt", "def ", "--max-bytes", "160", "--seed", "0"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          env=_cli_env(tmp_path, OMP_NUM_THREADS="1"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == sample + "\n"


# ------------------------------------------------------------------------------ resume from S3
def test_resume_from_s3_skips_a_corrupt_newest_checkpoint_and_continues(s3_run, tmp_path, capfd):
    """--resume of a run whose oldest checkpoint keep-N already deleted and whose newest one is
    corrupt (same size, wrong bytes: only the checksum can tell), on a machine that never saw the
    run's W&B files (they come back from `<run>/wandb/` in the bucket): it continues from the
    previous commit with the token count and the W&B run carried over, and says what it skipped."""
    import shutil

    from e2e_dist import checkpoint as ckpt
    from e2e_dist.train.launcher import run_training

    base, endpoint = s3_run.cfg, s3_run.endpoint
    older, newest = committed_steps(base)
    assert (older, newest) == (STEPS - CKPT_EVERY, STEPS)  # step 4 already pruned
    victim = f"{base.run_uri}/step_{newest:08d}/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    blob = get_object(endpoint, victim)
    bucket, _, key = victim.removeprefix("s3://").partition("/")
    _boto3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(b ^ 0xFF for b in blob[:4096]) + blob[4096:])
    found, skipped = ckpt.find_latest_committed(base.run_uri, base.storage, verify_checksums=True)
    assert found.step == older and len(skipped) == 1 and "corrupt" in skipped[0]
    shutil.move(wandb_dir(base), tmp_path / "wandb-of-the-first-node")  # as if rank 0 ran elsewhere before

    target = newest + CKPT_EVERY
    cfg = base.model_copy(update={"trainer": base.trainer.model_copy(update={"max_steps": target})})
    capfd.readouterr()
    resumed = run_training(cfg, resume=True, quiet=True)
    m = resumed.metrics
    assert m["step"] == target and resumed.checkpoint_uri == f"{cfg.run_uri}/step_{target:08d}"
    assert m["tokens_seen"] == target * TOKENS_PER_STEP  # continued, not restarted from 0
    assert last_wandb_summary(cfg)["restarts/last_resumed_from_step"] == older
    hist = wandb_history(cfg)  # one W&B run (restored from the bucket), no step twice, the new steps appended
    assert sorted(hist) == [4, 8, 12, 16]
    # The skip was said out loud (rank 0's warning, forwarded by Ray to the driver's output).
    said, deadline = "", time.monotonic() + 20
    while time.monotonic() < deadline:
        cap = capfd.readouterr()
        said += cap.out + cap.err
        if f"step_{newest:08d}" in said and "corrupt" in said:
            break
        time.sleep(0.5)
    assert any(f"skipped {base.run_uri}/step_{newest:08d}" in line and "corrupt" in line
               for line in said.splitlines()), said[-3000:]
    # Re-doing step `newest` rewrote that checkpoint: everything kept now verifies, and keep_last=2
    # pruned only after the new commit.
    found, skipped = ckpt.find_latest_committed(cfg.run_uri, cfg.storage, verify_checksums=True)
    assert found.step == target and skipped == []
    assert committed_steps(cfg) == [newest, target]


# ------------------------------------------------------------------------------ CLI: one line, exit 2
def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", WANDB_MODE="offline", PYTHONIOENCODING="utf-8", **extra)
    return env


def _train_cli(tmp_path: Path, storage_path: str, *sets: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    args = [CLI, "train", "tiny-text", "--quiet", "--set", f"storage.path={storage_path}",
            "--set", "trainer.max_steps=2", *(x for s in sets for x in ("--set", s))]
    t0 = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    return proc, time.monotonic() - t0


@pytest.mark.parametrize("problem", ["bad-credentials", "missing-bucket", "unreachable-endpoint"])
def test_storage_problems_are_one_line_and_exit_2_before_ray_starts(problem, s3_server, s3_bucket, tmp_path):
    env = _cli_env(tmp_path)
    sets: list[str] = []
    path = f"{s3_bucket}/runs"
    if problem == "bad-credentials":
        expect = "credentials rejected"
        s3_server.set_auth(True)  # moto now checks keys, and it knows none of ours
    elif problem == "missing-bucket":
        path, expect = f"s3://e2e-missing-{uuid.uuid4().hex[:10]}/runs", "bucket does not exist"
    else:
        port = _free_port()  # nothing listens there
        sets, expect = [f"storage.endpoint_url=http://127.0.0.1:{port}"], f"127.0.0.1:{port} unreachable"
    try:
        proc, took = _train_cli(tmp_path, path, *sets, env=env)
    finally:
        if problem == "bad-credentials":
            s3_server.set_auth(False)
    print(f"{problem}: exit {proc.returncode} after {took:.1f} s: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("e2e-dist: error:") and expect in lines[0] and path in lines[0], lines[0]
    assert proc.stdout == ""
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in proc.stderr
    assert os.environ["AWS_ACCESS_KEY_ID"] not in proc.stderr
    # Before Ray: the CLI's private Ray instance would live under the working directory.
    assert not (tmp_path / ".cache" / "ray").exists()
    assert not any(tmp_path.glob("**/wandb"))
