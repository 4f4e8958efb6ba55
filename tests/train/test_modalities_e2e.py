"""Pixels -> classes and waveform -> characters, end to end through the same stack as text: real
local Ray, real DeepSpeed ZeRO-2 engines, 2 gloo workers, W&B offline, then `export` to one
safetensors file and `predict` from it with plain PyTorch (in process and through the CLI).

Both corpora are built-in and generated once per checkout under $E2E_DIST_CACHE (tests/conftest.py):
scikit-learn's digits as PNGs, and the eSpeak NG spoken digits (needs `espeak-ng` on PATH).

The predictions are checked against the run's own validation numbers: each run evaluates its
whole validation split (eval_batches x workers x micro-batch covers it), so `predict` on every val
file must reproduce the run's val accuracy / CER - proof that the exported file is the trained
model and that `predict` prepares inputs exactly as the data pipeline did.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from e2e_dist.config import RunConfig, load_run_config
from tests.conftest import ROOT
from e2e_dist.tracking.offline_history import find_run_files, read_history

pytestmark = pytest.mark.slow

CLI = str(ROOT / ".venv" / "bin" / "e2e-dist")


def history(cfg: RunConfig) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for f in find_run_files(f"{cfg.storage.path}/{cfg.name}/wandb"):
        for row in read_history(f):
            assert row["_step"] not in rows, f"W&B step {row['_step']} logged twice"
            rows[row["_step"]] = row
    return rows


def val_split(cfg: RunConfig, files: list) -> list:
    """The run's validation items, chosen the way the data sources choose them (hash split)."""
    from e2e_dist.data.common import seeded_order, split_by_hash

    ordered = seeded_order(files, seed=cfg.data.seed)[: cfg.data.max_files or None]
    return split_by_hash(ordered, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([CLI, *args], capture_output=True, text=True, encoding="utf-8", cwd=cwd,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)


# ---------------------------------------------------------------------------------------- vision
VISION_STEPS = 60


def test_vision_digits_zero2_reaches_85_percent_then_export_and_predict(ray_local, tmp_path):
    """tiny-vision, shortened: 60 steps at lr 0.01 (preset: 150 at 0.003). Seen here: val accuracy
    0.96 at step 60 (0.98-0.99 with 80 steps); chance is 0.1."""
    from e2e_dist.data.common import list_files
    from e2e_dist.data.images import IMAGE_SUFFIXES, cache_root, class_of
    from e2e_dist.export import export_checkpoint
    from e2e_dist.predict import predict
    from e2e_dist.train.launcher import run_training

    cfg = load_run_config("tiny-vision", [
        "name=vision", f"storage.path={tmp_path}/runs", f"trainer.max_steps={VISION_STEPS}", "trainer.lr=0.01",
        "trainer.warmup_steps=5", "trainer.log_every=10", "trainer.eval_every=30", f"trainer.ckpt_every={VISION_STEPS}",
    ])
    summary = run_training(cfg, quiet=True)
    m = summary.metrics
    assert (m["step"], m["world_size"], m["zero_stage"]) == (VISION_STEPS, 2, 2)
    print(f"vision val_acc {m['val_acc']:.3f}; step {m['step_time_s']:.2f} s; run wall {summary.wall_s:.0f} s")
    assert m["val_acc"] >= 0.85, m
    hist = history(cfg)
    assert sorted(hist) == [10, 20, 30, 40, 50, 60]
    assert hist[60]["val_acc"] == pytest.approx(m["val_acc"]) and hist[60]["val_acc"] > hist[30]["val_acc"]
    assert hist[60]["loss"] < hist[10]["loss"] - 1.0
    assert summary.checkpoint_uri.endswith(f"step_{VISION_STEPS:08d}")

    exported = tmp_path / "vision.safetensors"
    info = export_checkpoint(summary.checkpoint_uri, str(exported))
    assert info["step"] == VISION_STEPS and exported.is_file()

    # Every val PNG of the built-in digits through `predict`: the run's val accuracy again.
    val = val_split(cfg, list_files([str(cache_root() / "digits")], suffixes=IMAGE_SUFFIXES))
    assert len(val) == m["val_rows"]
    labels = [predict(str(exported), it.uri) for it in val]
    assert set(labels) <= {str(d) for d in range(10)}
    acc = sum(label == class_of(it) for label, it in zip(labels, val)) / len(val)
    assert acc == pytest.approx(m["val_acc"], abs=0.01)

    # ... and a few through the CLI (a fresh process: plain PyTorch, no Ray, no DeepSpeed).
    picks = val[:3]
    proc = run_cli("predict", str(exported), *(it.uri for it in picks), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split("\t")[:2] for line in proc.stdout.splitlines()] == [[it.uri, label] for it, label in
                                                                           zip(picks, labels[:3])]
    assert all(line.split("\t")[2].startswith("p=") for line in proc.stdout.splitlines())  # + top-3 probabilities


# ---------------------------------------------------------------------------------------- speech
SPEECH_STEPS = 200
SPEECH_CER_MAX = 0.85
"""Final val CER must be at most this (and 0.1 below the first evaluation's)."""


def test_speech_spoken_digits_lowers_cer_then_export_and_predict(ray_local, tmp_path):
    """tiny-speech, shortened to 200 steps: d_model 128, lr 0.002, betas (0.9, 0.98), no weight decay.

    CTC first learns to emit only blanks: val CER sits at 1.0 (an untrained model scores 2-5) until
    step ~100-125, then falls. Threshold: final val CER <= 0.85 and >= 0.1 below the first
    evaluation (step 50, the blank plateau at 1.0).
    Measured: this test's real runs (3 so far) are deterministic here: CER 1.0 / 0.92 / 0.63 / 0.50 at
    steps 50/100/150/200, run wall 238-325 s on 2 cores shared with other jobs (load average 14-30;
    1.2-1.6 s per step). A single-process stand-in of the same math (same data, model, optimizer,
    schedule; 4 seeds) gave 0.50, 0.60, 0.73, 0.76 at step 200 (0.71-0.88 at 150). Rejected as unreliable: global batch 16 (0.66, 0.87, 0.93 at 200), the
    preset's settings (lr 0.005-0.01, d_model 64: 0.67-0.81 at 200), fewer steps.
    """
    from e2e_dist.data.speech import read_manifests
    from e2e_dist.export import export_checkpoint
    from e2e_dist.models.ctc_speech import edit_distance
    from e2e_dist.predict import predict
    from e2e_dist.train.launcher import run_training

    cfg = load_run_config("tiny-speech", [
        "name=speech", f"storage.path={tmp_path}/runs", f"trainer.max_steps={SPEECH_STEPS}",
        "model.d_model=128", "trainer.lr=0.002", "trainer.warmup_steps=5", "trainer.betas=[0.9,0.98]",
        "trainer.weight_decay=0",
        "trainer.log_every=25", "trainer.eval_every=50", f"trainer.ckpt_every={SPEECH_STEPS}",
    ])
    summary = run_training(cfg, quiet=True)  # generates the corpus into $E2E_DIST_CACHE on first use
    m = summary.metrics
    assert (m["step"], m["world_size"], m["zero_stage"]) == (SPEECH_STEPS, 2, 2)
    hist = history(cfg)
    cers = {s: row["val_cer"] for s, row in sorted(hist.items()) if "val_cer" in row}
    print(f"speech val CER by step: {cers}; step {m['step_time_s']:.2f} s; run wall {summary.wall_s:.0f} s")
    first = cers[min(cers)]
    assert m["val_cer"] == pytest.approx(cers[SPEECH_STEPS])
    assert m["val_cer"] <= SPEECH_CER_MAX and m["val_cer"] <= first - 0.1, cers

    exported = tmp_path / "speech.safetensors"
    export_checkpoint(summary.run_uri, str(exported))  # the run dir: its newest committed checkpoint

    # Every held-out clip (the val split, never trained on) through `predict`: the run's CER again.
    from e2e_dist.data.images import cache_root

    manifest = cache_root() / "spoken-digits" / "manifest.jsonl"
    val = val_split(cfg, read_manifests([str(manifest)], cfg.model.alphabet, None, False))
    assert len(val) == m["val_rows"]
    hyps = [predict(str(exported), u.uri) for u in val]
    assert all(isinstance(h, str) and set(h) <= set(cfg.model.alphabet) for h in hyps)
    cer = sum(edit_distance(h, u.text) for h, u in zip(hyps, val)) / sum(len(u.text) for u in val)
    assert cer == pytest.approx(m["val_cer"], abs=0.03)

    proc = run_cli("predict", str(exported), val[0].uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, transcript, confidence = proc.stdout.rstrip("\n").split("\t")
    assert (path, transcript) == (val[0].uri, hyps[0]) and 0 < float(confidence.removeprefix("confidence=")) <= 1
