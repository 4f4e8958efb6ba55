"""Pixels -> classes and waveform -> characters, end to end through the same stack as text: real
local Ray, real DeepSpeed ZeRO-2 engines, 2 gloo workers, W&B offline, then `export` to one
safetensors file and `predict` from it with plain PyTorch (in process and through the CLI).

Both corpora are built-in: digits rendered from the installed fonts and scikit-learn's handwritten
ones, augmented in Ray Data tasks; the eSpeak NG spoken digits, generated once per checkout under
$E2E_DIST_CACHE (tests/conftest.py; needs `espeak-ng` on PATH).

The predictions are checked against the run's own validation numbers: each run evaluates its
whole validation split (trainer.eval_samples covers it), so `predict` on every val
file must reproduce the run's val accuracy / CER - proof that the exported file is the trained
model and that `predict` prepares inputs exactly as the data pipeline did.
"""

from __future__ import annotations

import json
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
VISION_STEPS = 300
VAL_ACC_MIN, HELD_OUT_ACC_MIN = 0.8, 0.9
"""Accuracy the shortened run must reach on its validation images, and on held-out-font digits over
every `make-digits` style (seen: 0.89 and 0.96; with the 2 lit styles, 2026-12-08: 0.89 and 0.95)."""


def test_vision_glyphs_zero2_then_predict_on_held_out_fonts_in_every_style(ray_local, tmp_path, monkeypatch, capsys):
    """tiny-vision (digit-glyphs: installed fonts + handwritten digits, augmented), shortened to 300
    steps with 2 augmented copies per glyph (preset: 1,000 steps, 8 copies), run as the demo runs:
    a relative storage path, progress lines on the console. Then `predict`:
    - on the validation images, written as PNGs (8-bit: exactly the pixels training saw), it
      reproduces the run's val accuracy: the export is the trained model, prepared as in training;
    - through the CLI, on digits from font designs training never saw, in the 11 styles of
      `data make-digits` (either polarity, 8-256 px, colour, transparent, 16-bit, EXIF, letterboxed,
      a shadow or a lamp up to 40% darker), calibrated by the temperature the run fitted.
    Seen here: val acc 0.89, held-out fonts 0.96 (89-99% per style), run wall 60 s (the preset:
    ~0.95 and ~0.99, BENCHMARKS.md section 12)."""
    from PIL import Image

    from e2e_dist.data.fonts import digit_fonts, split_fonts
    from e2e_dist.data.glyph_eval import STYLES, make_digit_styles
    from e2e_dist.data.glyphs import plan_glyphs, render_image
    from e2e_dist.export import export_checkpoint
    from e2e_dist.predict import load_predictor, predict_one
    from e2e_dist.train.launcher import run_training

    # A relative storage path, as in the demo: it means the directory the run was started from,
    # not the workers' own working directory.
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config("tiny-vision", [
        "name=vision", "storage.path=runs", f"trainer.max_steps={VISION_STEPS}", "data.variants=2",
        "trainer.log_every=50", f"trainer.eval_every={VISION_STEPS // 2}", f"trainer.ckpt_every={VISION_STEPS}",
    ])
    assert cfg.storage.path == str(tmp_path / "runs")
    summary = run_training(cfg)  # progress on: stdout is not a terminal here, so plain lines
    # Every logged step reaches the console exactly once, however fast the steps go (pushed by
    # rank 0, drained by the driver, the last one before the run returns).
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[vision] step ")]
    assert [line.split()[2] for line in progress] == [f"{s}/{VISION_STEPS}" for s in range(50, VISION_STEPS + 1, 50)]
    assert progress[0].endswith(f"next_ckpt={VISION_STEPS}") and "next_ckpt" not in progress[-1]
    assert summary.wandb_dir and summary.wandb_dir.startswith(str(tmp_path / "runs"))
    m = summary.metrics
    assert (m["step"], m["world_size"], m["zero_stage"]) == (VISION_STEPS, 2, 2)
    print(f"vision val_acc {m['val_acc']:.3f}; step {m['step_time_s']:.2f} s; run wall {summary.wall_s:.0f} s")
    assert m["val_acc"] >= VAL_ACC_MIN, m
    hist = history(cfg)
    assert sorted(hist) == list(range(50, VISION_STEPS + 1, 50))
    assert hist[VISION_STEPS]["val_acc"] == pytest.approx(m["val_acc"])
    assert hist[VISION_STEPS]["loss"] < hist[50]["loss"] - 1.0
    assert m["held_out_fonts"] > 0 and m["train_fonts"] > m["held_out_fonts"]
    exported = tmp_path / "vision.safetensors"
    assert export_checkpoint(summary.checkpoint_uri, str(exported))["step"] == VISION_STEPS

    # The validation images as PNG files through `predict`: the run's val accuracy again.
    plan = plan_glyphs(cfg.data)
    assert len(plan.val_rows) == m["val_rows"] <= cfg.trainer.eval_samples
    model, exported_cfg = load_predictor(str(exported))
    # The temperature the last evaluation fitted (calibrated confidence) travels to `predict`.
    assert m["val_loss_calibrated"] <= m["val_loss"] + 1e-9
    assert float(model.temperature) == pytest.approx(m["val_temperature"], rel=1e-5)
    correct = 0
    for i, r in enumerate(plan.val_rows):
        path = tmp_path / "val" / f"{i:04d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(render_image(r["kind"], r["ref"], r["label"], r["seed"], size=cfg.data.image_size,
                                     augment=True)).save(path)
        correct += predict_one(model, exported_cfg, str(path)) == str(r["label"])
    assert correct / len(plan.val_rows) == pytest.approx(m["val_acc"], abs=0.01)

    # Held-out font designs in every input style, through the CLI (plain PyTorch, a fresh process).
    _, held = split_fonts(digit_fonts(), cfg.data.held_out, cfg.data.seed)
    files = make_digit_styles(tmp_path / "held-out", held[::3])
    proc = run_cli("predict", str(exported), *(str(f) for f, _, _ in files), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [line[0] for line in lines] == [str(f) for f, _, _ in files]
    assert all(line[2].startswith("p=") and line[3].startswith("top3: ") for line in lines)
    right = {s: [] for s in STYLES}
    for (_, digit, style), line in zip(files, lines):
        right[style].append(line[1] == str(digit))
    per_style = {s: sum(v) / len(v) for s, v in right.items()}
    overall = sum(sum(v) for v in right.values()) / len(files)
    print(f"held-out fonts ({len(held[::3])} files): {overall:.3f} overall; "
          + ", ".join(f"{s} {a:.2f}" for s, a in per_style.items()))
    assert overall >= HELD_OUT_ACC_MIN, per_style


# ---------------------------------------------------------------------------------------- speech
SPEECH_STEPS = 300
SPEECH_CER_MAX, HELD_OUT_CER_MAX = 0.3, 0.35
"""Final val CER, and CER on held-out voices at three speeds, must be at most these (seen here with
eSpeak alone: 0.09 and 0.15, run wall 58 s; with Flite's voices in 40% of the clips and rooms,
phone lines and codecs in the augmentation, a harder val set: 0.22 and 0.27, run wall 46 s)."""


def test_speech_spoken_digits_lowers_cer_then_predict_on_held_out_voices(tmp_path):
    """tiny-speech (log-mel front end in the model, 62 training voice variants, augmented copies made
    in Ray Data), shortened to 300 steps with 2 copies per clip (preset: 1,000 steps, 4 copies),
    run as a user runs it: `e2e-dist train` in a fresh process with its own local Ray, output not
    a terminal (plain lines). Every console line is one of ours, each progress line once; what Ray,
    Ray Data and DeepSpeed printed is in the log file named at start and end.

    Then `predict`: on every validation clip (never trained on, not augmented) it reproduces the
    run's val CER (read back from the run's W&B files); through the CLI, on clips of voice variants
    training never heard, at 120, 160 and 200 words per minute, the CER stays under HELD_OUT_CER_MAX.
    """
    import os
    import tempfile

    from e2e_dist.data.images import cache_root
    from e2e_dist.data.speech import read_manifests, spoken_digits_folder
    from e2e_dist.data.synth_speech import make_speech_corpus, split_variants
    from e2e_dist.export import export_checkpoint
    from e2e_dist.models.ctc_speech import edit_distance
    from e2e_dist.predict import load_predictor, predict_one
    from e2e_dist.tracking.offline_history import read_summary
    from tests.helpers.console import foreign_lines

    sets = ["name=speech", f"storage.path={tmp_path}/runs", f"trainer.max_steps={SPEECH_STEPS}", "data.variants=2",
            "trainer.log_every=50", f"trainer.eval_every={SPEECH_STEPS // 2}", f"trainer.ckpt_every={SPEECH_STEPS}"]
    cfg = load_run_config("tiny-speech", sets)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    (tmp_path / "home").mkdir()
    env.update(HOME=str(tmp_path / "home"), RAY_AUTH_MODE="disabled", WANDB_MODE="offline", PYTHONIOENCODING="utf-8")
    with tempfile.TemporaryDirectory(prefix="e2econ-", dir="/tmp") as cwd:  # Ray's socket paths stay short
        # the corpus is generated into $E2E_DIST_CACHE on first use
        proc = subprocess.run([CLI, "train", "tiny-speech", *(a for kv in sets for a in ("--set", kv))],
                              capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert foreign_lines(proc.stdout) == [] and foreign_lines(proc.stderr) == [], out
    progress = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("[speech] step ")]
    assert progress == [f"{s}/{SPEECH_STEPS}" for s in range(50, SPEECH_STEPS + 1, 50)]  # each once
    assert proc.stderr.count("committed ") == 1  # rank 0's line (not once per rank)
    log_path = Path(proc.stderr.splitlines()[0].removeprefix("log file: "))
    assert log_path.parent == tmp_path / "runs" / "speech" / "logs" and f"log file       {log_path}" in proc.stdout
    logged = log_path.read_text()
    assert "(RayTrainWorker pid=" in logged and "ray.data" in logged
    assert "[e2e-dist] INFO committed" in logged  # ours are in the file too

    m = read_summary(find_run_files(f"{tmp_path}/runs/speech/wandb")[-1])  # the run's final metrics
    assert (m["step"], m["world_size"], m["zero_stage"]) == (SPEECH_STEPS, 2, 2)
    hist = history(cfg)
    cers = {s: row["val_cer"] for s, row in sorted(hist.items()) if "val_cer" in row}
    print(f"speech val CER by step: {cers}; step {m['step_time_s']:.2f} s; run {m['_runtime']:.0f} s")
    assert m["val_cer"] == pytest.approx(cers[SPEECH_STEPS])
    assert m["val_cer"] <= SPEECH_CER_MAX and m["val_cer"] < cers[min(cers)], cers
    assert m["train_rows"] == 2 * m["train_clips"]  # two augmented copies of each clip

    exported = tmp_path / "speech.safetensors"
    export_checkpoint(f"{tmp_path}/runs/speech", str(exported))  # the run dir: its newest committed checkpoint

    # Every validation clip through `predict`: the run's CER again.
    manifest = cache_root() / spoken_digits_folder(cfg.data) / "manifest.jsonl"
    train_variants, held = split_variants(cfg.data.held_out, cfg.data.seed)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    voices = {r["voice"].split("+")[1] for r in rows if r["engine"] == "espeak-ng"}
    assert voices <= {v.lstrip("+") for v in train_variants}  # no held-out voice in the training corpus
    assert {r["engine"] for r in rows} == {"espeak-ng", "flite"}  # Festival is held out
    val = val_split(cfg, read_manifests([str(manifest)], cfg.model.alphabet, None, False))
    assert len(val) == m["val_rows"]
    model, exported_cfg = load_predictor(str(exported))
    hyps = [predict_one(model, exported_cfg, u.uri) for u in val]
    assert all(isinstance(h, str) and set(h) <= set(cfg.model.alphabet) for h in hyps)
    cer = sum(edit_distance(h, u.text) for h, u in zip(hyps, val)) / sum(len(u.text) for u in val)
    assert cer == pytest.approx(m["val_cer"], abs=0.03)

    # Voices training never heard, at three speeds, through the CLI.
    clips, refs = [], []
    for i, speed in enumerate((120, 160, 200)):
        corpus = make_speech_corpus(tmp_path / f"held-{speed}", 12, seed=1000 + i, variants=held,
                                    speeds=(speed, speed)).parent
        for line in (corpus / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            clips.append(str(corpus / row["audio"]))
            refs.append(row["text"])
    proc = run_cli("predict", str(exported), *clips, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [line[0] for line in lines] == clips
    conf = [float(line[2].removeprefix("confidence=")) for line in lines]
    assert all(0 <= c <= 1 for c in conf)
    held_cer = sum(edit_distance(line[1], r) for line, r in zip(lines, refs)) / sum(len(r) for r in refs)
    print(f"held-out voices at 120/160/200 wpm: CER {held_cer:.3f}")
    assert held_cer <= HELD_OUT_CER_MAX
    # The confidence warns (issue 33): transcripts with errors are less sure than exact ones.
    wrong = [c for c, line, r in zip(conf, lines, refs) if line[1] != r]
    right = [c for c, line, r in zip(conf, lines, refs) if line[1] == r]
    assert not wrong or sum(wrong) / len(wrong) < sum(right) / max(len(right), 1), (wrong, right)
    # The same clips as one recording with pauses: cut at the pauses, about the same CER (issue 33).
    import numpy as np
    import soundfile as sf

    from e2e_dist.data.speech import decode_audio

    rng = np.random.default_rng(0)
    rate = cfg.data.sample_rate
    parts = [decode_audio(Path(c).read_bytes(), rate) for c in clips]
    gaps = [rng.normal(0, 1e-3, int(rng.uniform(0.2, 1.0) * rate)).astype(np.float32) for _ in parts]
    sf.write(tmp_path / "long.wav", np.concatenate([x for pair in zip(parts, gaps) for x in pair]), rate)
    long_text = predict_one(model, exported_cfg, str(tmp_path / "long.wav"))
    long_cer = edit_distance(long_text, " ".join(refs)) / len(" ".join(refs))
    print(f"the same clips as one recording: CER {long_cer:.3f}")
    assert long_cer <= 1.2 * held_cer + 0.02
